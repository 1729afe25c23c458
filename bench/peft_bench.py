"""Reference benchmark: the same LoRA training job FineTune's `finetune bench` runs, done by
transformers + PEFT on CPU in float32. Random token batches (B x T, every position trained), LoRA on
every linear projection, AdamW, a warm-up, then timed steps; prints one JSON line with the median
step time, tokens/s and peak RSS.

    python bench/peft_bench.py --model DIR --batch 4 --seq-len 256 --rank 8 --steps 5 --warmup 2
"""
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.config.use_cache = False
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), generator=g) for _ in range(4)]
    times = []
    for step in range(a.warmup + a.steps):
        ids = batches[step % len(batches)]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens = a.batch * a.seq_len
    print(json.dumps({
        "impl": "transformers+peft",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tokens_per_sec": tokens / step,
        "step_secs": step,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }))


if __name__ == "__main__":
    main()
