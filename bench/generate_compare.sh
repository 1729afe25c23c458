#!/usr/bin/env bash
# Generation speed side by side, in one run on one machine: FineTune's `bench --generate` (f32 and
# the dtype it picks by itself), transformers (f32, CPU) and llama.cpp (llama-cpp-python, the F16
# GGUF) on the same model, prompt ids and decode length; prints each JSON line and the ratios.
#
#   bench/generate_compare.sh [MODEL_DIR] [F16_GGUF]
#   PROMPT=128 NEW=128 RUNS=3 bench/generate_compare.sh ~/.cache/finetune/converted/SmolLM2-... x-f16.gguf
#
# The Python side comes from tools/pyref-setup.sh (cached under ~/.cache/finetune). Every engine
# uses all the machine's cores; run it on an idle machine (the load average is printed).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?model folder (Hugging Face layout)}
GGUF=${2:-}
PROMPT=${PROMPT:-128}
NEW=${NEW:-128}
RUNS=${RUNS:-3}
THREADS=${THREADS:-$(nproc)}
BIN=${FT_BIN:-target/release/finetune}
PY=${PY:-$(bash tools/pyref-setup.sh 2>/dev/null | tail -1)}
OUT=$(mktemp -d)

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($THREADS threads); load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN" bench --generate --model "$MODEL" --prompt-tokens "$PROMPT" --new-tokens "$NEW" --steps "$RUNS" \
  --dtype f32 --json | tee "$OUT/finetune-f32.json"
"$BIN" bench --generate --model "$MODEL" --prompt-tokens "$PROMPT" --new-tokens "$NEW" --steps "$RUNS" \
  --json | tee "$OUT/finetune-auto.json"
"$PY" bench/generate_ref.py --engine transformers --model "$MODEL" --prompt-tokens "$PROMPT" \
  --new-tokens "$NEW" --threads "$THREADS" 2>/dev/null | tee "$OUT/transformers.json"
if [ -n "$GGUF" ]; then
  "$PY" bench/generate_ref.py --engine llamacpp --gguf "$GGUF" --model "$MODEL" --prompt-tokens "$PROMPT" \
    --new-tokens "$NEW" --threads "$THREADS" 2>/dev/null | tee "$OUT/llamacpp.json"
fi
python3 - "$OUT" <<'EOF'
import json, os, sys
d = sys.argv[1]
load = lambda n: json.load(open(os.path.join(d, n))) if os.path.exists(os.path.join(d, n)) else None
refs = {"transformers (f32)": load("transformers.json"), "llama.cpp (F16 GGUF)": load("llamacpp.json")}
for name in ("finetune-f32.json", "finetune-auto.json"):
    ft = load(name)
    label = f"FineTune {ft['dtype']}"
    for ref_name, ref in refs.items():
        if ref is None:
            continue
        print(f"{label:14s} vs {ref_name:22s} prefill {ft['base']['prefill_tok_s'] / ref['prefill_tok_s']:5.2f}x"
              f"   decode {ft['base']['decode_tok_s'] / ref['decode_tok_s']:5.2f}x"
              f"   (decode {ft['base']['decode_tok_s']:.1f} vs {ref['decode_tok_s']:.1f} tok/s)")
EOF
rm -rf "$OUT"
