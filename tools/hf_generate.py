#!/usr/bin/env python3
"""Greedy token ids from transformers' generate(do_sample=False), for comparing FineTune's
generation token for token (tests/generate.rs, `hf_greedy_ids_match`).

Usage: python3 tools/hf_generate.py MODEL_DIR [ADAPTER_DIR] PROMPT N

Prints one JSON line: {"model", "adapter", "prompt", "prompt_ids", "new_ids"}. The prompt is raw
text tokenized as the tokenizer does by default (add_special_tokens=True); with ADAPTER_DIR the
model is wrapped in PEFT's PeftModel (LoRA unmerged). Exactly N new tokens are generated: EOS
stopping is switched off (the logits are untouched, so the ids are greedy's), which makes the
comparison independent of stop rules. The rest of generation_config.json (e.g. a repetition
penalty) applies as transformers applies it; f32 on the CPU.

Compare:
  for m in tiny-llama tiny-qwen2 tiny-qwen3 tiny-gpt2; do
    python3 tools/hf_generate.py tests/fixtures/$m "Hello there" 32
    python3 tools/hf_generate.py tests/fixtures/$m tests/fixtures/$m/peft-adapter "Hello there" 32
  done > hf_ids.jsonl
  FINETUNE_HF_IDS=hf_ids.jsonl cargo test --test generate -- --ignored hf_greedy_ids_match
"""
import copy
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv):
    if len(argv) == 3:
        model_dir, adapter_dir, (prompt, n) = argv[0], None, argv[1:]
    elif len(argv) == 4:
        model_dir, adapter_dir, prompt, n = argv
    else:
        print(__doc__, file=sys.stderr)
        return 2
    n = int(n)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # transformers 5 fills every None field of the generation_config passed to generate() from
    # model.generation_config, so EOS must be cleared on the model's own config as well.
    model.generation_config.eos_token_id = None
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    gen = copy.deepcopy(model.generation_config)
    gen.do_sample = False
    gen.eos_token_id = None
    gen.max_new_tokens = n
    gen.min_new_tokens = None
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    new = out[0, ids.shape[1]:].tolist()
    print(json.dumps({
        "model": model_dir,
        "adapter": adapter_dir,
        "prompt": prompt,
        "prompt_ids": ids[0].tolist(),
        "new_ids": new,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
