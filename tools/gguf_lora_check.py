#!/usr/bin/env python3
"""Checks a FineTune GGUF LoRA with its real consumer: llama.cpp (llama-cpp-python) loads the base
model's GGUF with the adapter (`lora_path`) and must give the tuned logits FineTune computed for the
same ids (LOGITS, written by `cargo run --example adapter_logits -- HF_MODEL PEFT_ADAPTER OUT`), and
without the adapter the base logits; the adapter must also move the logits well beyond the
difference (a zero or misplaced adapter would not).

Usage: python3 tools/gguf_lora_check.py BASE.gguf LORA.gguf LOGITS.safetensors [TOL] [--quantized]

--quantized: BASE is a quantized GGUF (a QLoRA run on that very file); see main() for the criterion.

TOL (default 2e-3) is the largest allowed |llama.cpp - FineTune| logit difference. With an F32 base
GGUF (and the f32 KV cache this script asks for) the two engines still sum in different orders:
on SmolLM2-135M the base logits alone differ by 1.3e-3. An F16 base computes in f16 and needs
about 5e-2. The base GGUF comes from llama.cpp's
own convert_hf_to_gguf.py on the same Hugging Face folder (tools/pyref-setup.sh has it):

  PY=$(tools/pyref-setup.sh | tail -1); LCPP=$(ls -d ~/.cache/finetune/sdist/src/llama_cpp_python-*/vendor/llama.cpp)
  S=$(ls -d ~/.cache/finetune/converted/SmolLM2-135M-Instruct.Q4_1-*)   # FineTune's conversion
  PYTHONPATH=$LCPP/gguf-py $PY $LCPP/convert_hf_to_gguf.py $S --outtype f32 --outfile /tmp/smol-f32.gguf
  target/release/finetune train --model $S --data assets/demo/train.jsonl --out /tmp/smol-run \
    --steps 4 --lr 2e-3 --batch-size 2 --max-seq-len 64 --eval-every 0 --samples 0 \
    --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
  target/release/finetune export /tmp/smol-run/adapter /tmp/smol-lora.gguf --format gguf-lora
  target/debug/examples/adapter_logits $S /tmp/smol-run/adapter /tmp/smol-l.safetensors
  $PY tools/gguf_lora_check.py /tmp/smol-f32.gguf /tmp/smol-lora.gguf /tmp/smol-l.safetensors
(The tiny fixtures' tokenizers are not ones convert_hf_to_gguf.py recognises, so the check runs on
the real SmolLM2.)
Exit status 0 when everything matches, 1 otherwise.
"""
import sys

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file


def logits(model_path, lora_path, ids):
    # An f32 KV cache (llama.cpp's default is f16), so an F32 base computes in f32 throughout.
    llm = Llama(model_path=model_path, lora_path=lora_path, n_ctx=max(64, len(ids) + 8),
                logits_all=True, n_threads=2, type_k=0, type_v=0, verbose=False)
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main(base_gguf, lora_gguf, logits_path, tol, quantized=False):
    want = load_file(logits_path)
    ids = [int(i) for i in want["input_ids"][0]]
    base_want = want["base"][0]
    tuned_want = want["tuned"][0]
    base_got = logits(base_gguf, None, ids)[:, : base_want.shape[-1]]
    tuned_got = logits(base_gguf, lora_gguf, ids)[:, : tuned_want.shape[-1]]
    d_base = float(np.abs(base_got - base_want).max())
    d_tuned = float(np.abs(tuned_got - tuned_want).max())
    moved = float(np.abs(tuned_want - base_want).max())
    print(f"base max|diff| {d_base:.3e}  tuned max|diff| {d_tuned:.3e}  adapter moves logits by {moved:.3e}")
    if quantized:
        # A quantized base: llama.cpp rounds the activations to 8 bits for each product (Q8_0 /
        # Q8_1), FineTune multiplies the dequantized weights in f32, so the base logits already
        # differ by the file's own rounding. The LoRA must add no more than half that again, move
        # the logits far beyond it, and keep the greedy tokens where the base keeps them.
        agree_base = float((base_got.argmax(-1) == base_want.argmax(-1)).mean())
        agree_tuned = float((tuned_got.argmax(-1) == tuned_want.argmax(-1)).mean())
        print(f"quantized base: argmax agreement base {agree_base:.3f}, tuned {agree_tuned:.3f}")
        ok = (d_tuned <= 1.5 * d_base + tol and moved > 5 * d_base
              and agree_tuned >= agree_base - 1 / len(ids))
    else:
        ok = d_base <= tol and d_tuned <= tol and moved > 5 * tol
    print("GGUF LoRA check: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quantized"]
    if len(args) not in (3, 4):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args[0], args[1], args[2], float(args[3]) if len(args) == 4 else 2e-3,
                  quantized="--quantized" in sys.argv))
