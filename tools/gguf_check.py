#!/usr/bin/env python3
"""Checks a FineTune GGUF export with its real consumer, llama.cpp (llama-cpp-python):

1. logits: llama.cpp runs the GGUF on the ids in LOGITS (written by
   `cargo run --example adapter_logits -- HF_MODEL PEFT_ADAPTER LOGITS`) and must give FineTune's
   logits for them (`tuned`, or `base` with --base) within TOL, and the argmax at every position;
2. tokenizer: llama.cpp's tokenizer, from the GGUF's metadata alone, must encode every test string
   exactly as the Hugging Face tokenizer of HF_MODEL does (its tokenizer.json, which FineTune
   trains with, run by the `tokenizers` library: special tokens parsed in the text, BOS/EOS as the
   tokenizer adds them). transformers 5 may replace a tokenizer.json's pre-tokenizer with its
   class's own (model_type qwen2 gets Qwen's digit-splitting regex even when tokenizer.json has
   GPT-2's, as the tiny-qwen2 fixture does); where AutoTokenizer differs it is reported, not failed;
3. --generate N: greedy generation of N tokens from the first ids must run and give N tokens (or
   stop at an end token), for quantized files whose logits are only close.

Usage: python3 tools/gguf_check.py FILE.gguf HF_MODEL LOGITS.safetensors [--tol 1e-3 | --rtol R] [--base]
       [--generate N] [--no-logits] [--no-tokenizer]
Exit status 0 when everything holds, 1 otherwise.
"""
import argparse
import sys

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing   \n\n\ttabs\tand newlines\n",
    "Numbers: 3.14159, 1234567890, 2026-12-05, 100%",
    "Unicode: héllo wörld — naïve café; 日本語のテキスト; emoji 🤖🚀; Ελληνικά; русский",
    "def f(x):\n    return x ** 2  # square\n",
    "don't won't I'm you're they've we'll it's",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "",
    "a",
    "   ",
    "URL https://example.com/a?b=c&d=e and email a.b@c.de",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("hf_model")
    ap.add_argument("logits")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=None,
                    help="tolerance relative to the largest |logit| (for F16 files: llama.cpp "
                         "rounds activations to f16 at every matmul)")
    ap.add_argument("--base", action="store_true")
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--no-logits", action="store_true")
    ap.add_argument("--no-tokenizer", action="store_true")
    a = ap.parse_args()

    want = load_file(a.logits)
    ids = [int(i) for i in want["input_ids"][0]]
    ref = want["base" if a.base else "tuned"][0]
    # f32 KV cache so an F32 file computes in f32 throughout.
    llm = Llama(model_path=a.gguf, n_ctx=max(256, len(ids) + a.generate + 8), logits_all=True,
                n_threads=2, type_k=0, type_v=0, verbose=False)
    ok = True
    if not a.no_logits:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)[:, : ref.shape[-1]]
        diff = float(np.abs(got - ref).max())
        argmax = float((got.argmax(-1) == ref.argmax(-1)).mean())
        tol = a.tol if a.rtol is None else a.rtol * float(np.abs(ref).max())
        good = diff <= tol and argmax == 1.0
        print(f"logits: max|llama.cpp - FineTune| {diff:.3e} (tol {tol:.3g}; max|logit| {float(np.abs(ref).max()):.1f}), argmax agreement {argmax:.3f}"
              + ("" if good else "  FAILED"))
        ok &= good
    if not a.no_tokenizer:
        import os

        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.hf_model)
        file_tok = Tokenizer.from_file(os.path.join(a.hf_model, "tokenizer.json"))
        bad = 0
        for t in TEXTS:
            hf = file_tok.encode(t).ids
            if tok(t)["input_ids"] != hf:
                print(f"note: transformers' {type(tok).__name__} encodes {t!r} unlike its tokenizer.json")
            lc = llm.tokenize(t.encode(), add_bos=True, special=True)
            if hf != lc:
                bad += 1
                print(f"tokenizer: {t!r}\n  HF        {hf}\n  llama.cpp {lc}")
            back = llm.detokenize([i for i in lc if i not in (tok.bos_token_id, tok.eos_token_id)]).decode("utf-8", "replace")
            if t and back.strip() != t.strip() and "<|" not in t:
                print(f"tokenizer: {t!r} decodes back as {back!r}")
        print(f"tokenizer: {len(TEXTS) - bad}/{len(TEXTS)} test strings encode exactly as the HF tokenizer")
        ok &= bad == 0
    if a.generate:
        llm.reset()
        out = []
        for tok_id in llm.generate(ids[:4], temp=0.0, top_k=1):
            out.append(tok_id)
            if len(out) >= a.generate or llm.token_eos() == tok_id:
                break
        print(f"generate: {len(out)} tokens {out[:16]}")
        ok &= len(out) > 0
    print("GGUF check: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
