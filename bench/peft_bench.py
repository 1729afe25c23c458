"""Reference benchmark: the same LoRA training job FineTune's `finetune bench` runs, done by
transformers + PEFT (CPU float32 by default; `--device cuda --dtype bf16` on a GPU). Random token
batches (B x T, every position trained), LoRA on every linear projection, AdamW, a warm-up, then
timed steps; prints one JSON line with the median step time, tokens/s and peak memory (RSS, and the
CUDA allocator's peak on a GPU). A model folder with only config.json gets random weights.

    python bench/peft_bench.py --model DIR --batch 4 --seq-len 256 --rank 8 --steps 5 --warmup 2
"""
import argparse
import json
import resource
import statistics
import time

import glob
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="base weights' dtype")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if glob.glob(os.path.join(a.model, "*.safetensors")) or glob.glob(os.path.join(a.model, "*.bin")):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model), dtype=dtype)
    model.to(a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    model.config.use_cache = False
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), generator=g).to(a.device)
               for _ in range(4)]
    times = []
    for step in range(a.warmup + a.steps):
        ids = batches[step % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
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
        "peak_device_bytes": torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else None,
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "dtype": a.dtype,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }))


if __name__ == "__main__":
    main()
