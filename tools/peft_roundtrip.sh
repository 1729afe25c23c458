#!/usr/bin/env bash
# An adapter FineTune trains loads in transformers + PEFT and gives FineTune's logits (issue 19's
# "ours loads in PEFT" for every fixture architecture): 3 training steps on each fixture with the
# built binary, then examples/adapter_logits and tools/peft_check.py with PYTHON (a venv with
# torch, transformers and peft: tools/pyref-setup.sh).
#
#   PYTHON=~/.cache/finetune/pyref-v1/bin/python bash tools/peft_roundtrip.sh [FIXTURE...]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:?a python with torch, transformers and peft}
fixtures=("$@")
[ ${#fixtures[@]} -gt 0 ] || fixtures=(tiny-llama tiny-qwen2 tiny-qwen3 tiny-gpt2 tiny-gemma2 \
  tiny-gemma3 tiny-gemma3-vlm tiny-phi3 tiny-smollm3)
cargo build -q --bin finetune --example adapter_logits
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
for f in "${fixtures[@]}"; do
  out="$work/$f"
  target/debug/finetune train --model "tests/fixtures/$f" --data ../shared/data/wwdc25-train.jsonl \
    --out "$out" --steps 3 --max-seq-len 64 --batch-size 2 --lr 1e-2 > "$out.log" 2>&1
  target/debug/examples/adapter_logits "tests/fixtures/$f" "$out/adapter" "$out/logits.safetensors"
  echo "== $f"
  if ! "$py" tools/peft_check.py "tests/fixtures/$f" "$out/adapter" "$out/logits.safetensors" \
    2>/dev/null; then
    failed=1
  fi
done
exit $failed
