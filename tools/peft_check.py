#!/usr/bin/env python3
"""Checks a FineTune adapter with its real consumer: transformers + PEFT load MODEL_DIR and
ADAPTER_DIR (PeftModel.from_pretrained) and must give the logits FineTune computed for the same
ids (LOGITS, written by `cargo run --example adapter_logits`), both without and with the adapter;
the adapter must also change the logits (a zero adapter would pass trivially).

Usage: python3 tools/peft_check.py MODEL_DIR ADAPTER_DIR LOGITS.safetensors
Exit status 0 when everything matches (max |diff| <= 1e-4 in f32), 1 otherwise.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOL = 1e-4


def main(model_dir, adapter_dir, logits_path):
    want = load_file(logits_path)
    ids = want["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    base.eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    tuned.eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
    d_base = (base_logits - want["base"]).abs().max().item()
    d_tuned = (tuned_logits - want["tuned"]).abs().max().item()
    moved = (want["tuned"] - want["base"]).abs().max().item()
    print(f"base max|diff| {d_base:.3e}  tuned max|diff| {d_tuned:.3e}  adapter moves logits by {moved:.3e}")
    ok = d_base <= TOL and d_tuned <= TOL and moved > 100 * TOL
    print("PEFT check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
