#!/usr/bin/env python3
"""Reference CPU generation speed: transformers (f32) or llama.cpp (llama-cpp-python, a GGUF).

Usage:
  python bench/generate_ref.py --engine transformers --model DIR [--prompt-tokens 128] [--new-tokens 128] [--threads T]
  python bench/generate_ref.py --engine llamacpp --gguf FILE.gguf [--model DIR] [...]

Prints one JSON line:
  {"engine","model","prompt_tokens","new_tokens","threads","prefill_tok_s","decode_tok_s","dtype","cpu"}

Method (the same for both engines):
  * The prompt is a fixed English paragraph repeated and tokenized, the ids truncated to exactly
    --prompt-tokens (no BOS / special tokens are added). With --model the Hugging Face tokenizer of
    DIR makes the ids (so both engines see the same ids); llamacpp without --model uses the GGUF's.
  * prefill = one forward of all prompt tokens into an empty KV cache, logits for the last position
    only (transformers: logits_to_keep=1; llama.cpp: logits_all=False).
  * decode = --new-tokens single-token steps, each feeding the previous greedy (argmax) token with the
    KV cache and taking the argmax of its logits. EOS is never checked, so exactly M steps run.
    decode_tok_s = M / (time of the M steps).
  * One warmup run (prefill + decode) first, then 3 timed runs; the median of each phase is reported.
  * Python per-step overhead (argmax on the logits, the loop) is inside the decode time for both.

Set up the environment with tools/pyref-setup.sh (it prints the python to use).
"""
import argparse
import json
import os
import statistics
import sys
import time

PARAGRAPH = (
    "The history of the river valley is written in its stones. Long before the first farmers arrived, "
    "glaciers carved the wide basin and left behind a scattering of boulders, gravel banks and quiet "
    "lakes. Over thousands of years the forests returned, and with them came deer, wolves and the "
    "people who hunted them. Villages grew along the water, where fish were plentiful and the soil was "
    "rich enough to feed a family through the long winter. Traders followed the river south to the "
    "sea, carrying furs, salt and iron tools, and they brought back stories of distant cities. "
)

RUNS = 3
LAST_IDS = []  # greedy ids of the last run (filled with --print-ids)

GGUF_FILE_TYPES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
    11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
    17: "q5_k_m", 18: "q6_k", 32: "bf16",
}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def prompt_ids_hf(model_dir, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = PARAGRAPH
    while True:
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) >= n:
            return ids[:n]
        text += PARAGRAPH


def prompt_ids_llama(llm, n):
    text = PARAGRAPH
    while True:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(ids) >= n:
            return ids[:n]
        text += PARAGRAPH


def bench_transformers(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    ids = prompt_ids_hf(args.model, args.prompt_tokens)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    model.eval()
    prompt = torch.tensor([ids], dtype=torch.long, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # Only the last position's logits in prefill (as llama.cpp with logits_all=False).
    keep = {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        try:
            with torch.inference_mode():
                model(input_ids=prompt[:, :2], use_cache=True, **{name: 1})
            keep = {name: 1}
            break
        except TypeError:
            continue

    # transformers >= 5.2x names the KV cache `cache` (in and out); older ones `past_key_values`.
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def one_run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, **keep)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            past = getattr(out, cache_kw)
            got = []
            for _ in range(args.new_tokens):
                if args.print_ids:
                    got.append(int(nxt))
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
                past = getattr(out, cache_kw)
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
        LAST_IDS[:] = got
        return t1 - t0, t2 - t1

    return one_run, args.dtype


def bench_llamacpp(args):
    import numpy as np
    from llama_cpp import Llama

    n_ctx = args.prompt_tokens + args.new_tokens + 16
    llm = Llama(
        model_path=args.gguf,
        n_ctx=n_ctx,
        n_batch=max(512, args.prompt_tokens),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        flash_attn=args.flash_attn,
        verbose=False,
    )
    ids = prompt_ids_hf(args.model, args.prompt_tokens) if args.model else prompt_ids_llama(llm, args.prompt_tokens)
    ftype = llm.metadata.get("general.file_type")
    dtype = GGUF_FILE_TYPES.get(int(ftype), f"file_type {ftype}") if ftype is not None else "unknown"

    # With logits_all=False, Llama.eval() does not copy logits into llm.scores; read the last
    # output row straight from the context (a view, no copy).
    import llama_cpp

    n_vocab = llm.n_vocab()

    def last_argmax():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def one_run():
        llm.reset()  # n_tokens = 0; eval() drops the KV cache from there on
        t0 = time.perf_counter()
        llm.eval(ids)
        nxt = last_argmax()
        t1 = time.perf_counter()
        got = []
        for _ in range(args.new_tokens):
            if args.print_ids:
                got.append(nxt)
            llm.eval([nxt])
            nxt = last_argmax()
        t2 = time.perf_counter()
        LAST_IDS[:] = got
        return t1 - t0, t2 - t1

    return one_run, dtype


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["transformers", "llamacpp"], required=True)
    p.add_argument("--model", help="Hugging Face model folder (required for transformers; tokenizer for llamacpp)")
    p.add_argument("--gguf", help="GGUF file for --engine llamacpp (e.g. an F16 conversion)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="transformers: cpu or cuda")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="transformers: weights dtype")
    p.add_argument("--flash-attn", action="store_true",
                   help="llamacpp: enable flash attention (llama-cpp-python's default is off)")
    p.add_argument("--print-ids", action="store_true",
                   help="also print the greedy ids of the last run to stderr (a correctness check)")
    args = p.parse_args()
    if args.engine == "transformers" and not args.model:
        p.error("--engine transformers needs --model DIR")
    if args.engine == "llamacpp" and not args.gguf:
        p.error("--engine llamacpp needs --gguf FILE")

    one_run, dtype = (bench_transformers if args.engine == "transformers" else bench_llamacpp)(args)
    try:
        with open("/proc/loadavg") as f:
            load0 = f.read().split()[:3]
    except OSError:
        load0 = None
    one_run()  # warmup
    prefill, decode = [], []
    for _ in range(RUNS):
        a, b = one_run()
        prefill.append(a)
        decode.append(b)
    if args.print_ids:
        print(f"ids: {json.dumps(LAST_IDS)}", file=sys.stderr)
    if load0:
        # threads == all cores on a busy machine makes the spin-waiting thread pools of both engines
        # collapse (10-50x): compare only numbers taken with nothing else running (the 1-minute
        # load average lags, so it still counts a benchmark run just before this one).
        print(f"loadavg at start: {' '.join(load0)}", file=sys.stderr)
    print(f"prefill s: {[round(x, 4) for x in prefill]}  decode s: {[round(x, 4) for x in decode]}", file=sys.stderr)
    print(json.dumps({
        "engine": args.engine,
        "model": args.gguf if args.engine == "llamacpp" else args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "prefill_tok_s": round(args.prompt_tokens / statistics.median(prefill), 2),
        "decode_tok_s": round(args.new_tokens / statistics.median(decode), 2),
        "dtype": dtype,
        "cpu": cpu_model(),
    }))


if __name__ == "__main__":
    main()
