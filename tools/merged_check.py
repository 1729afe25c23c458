#!/usr/bin/env python3
"""A merged export judged by transformers + PEFT: the merged folder loaded by transformers gives
the logits of the base model with the PEFT adapter applied (f32, CPU).

Usage: python3 tools/merged_check.py BASE_DIR ADAPTER_DIR MERGED_DIR

Prints the largest absolute logit difference and exits 1 when it is 1e-4 or more.

  PY=$(tools/pyref-setup.sh | tail -1)
  for m in tiny-llama tiny-qwen2 tiny-qwen3 tiny-gpt2; do
    target/release/finetune export tests/fixtures/$m/peft-adapter /tmp/merged-$m --format merged \
      --model tests/fixtures/$m
    $PY tools/merged_check.py tests/fixtures/$m tests/fixtures/$m/peft-adapter /tmp/merged-$m
  done
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    base_dir, adapter_dir, merged_dir = argv
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        want = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    moved = (want - plain).abs().max().item()
    print(f"{merged_dir}: max |merged - PEFT(base + adapter)| = {diff:.3g} (the adapter moves logits by {moved:.3g})")
    return 0 if diff < 1e-4 and moved > 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
