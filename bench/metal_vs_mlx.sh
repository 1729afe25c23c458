#!/usr/bin/env bash
# Training speed on a Mac: FineTune on Metal beside mlx-lm's LoRA trainer (`mlx_lm lora`), same
# model, data, batch, sequence length, rank, targets and steps, in one run; prints both tokens/s
# and the ratio. Made for Apple silicon; DEVICE=cpu runs FineTune on the CPU instead (mlx-lm then
# runs on whatever MLX has: `pip install "mlx[cpu]" mlx-lm` works on Linux), which is how the
# script itself was checked without a Mac.
#
#   bench/metal_vs_mlx.sh MODEL_DIR [DATA.jsonl]
#   STEPS=20 BATCH=4 SEQ=256 RANK=8 DTYPE=bf16 PY=python3 bench/metal_vs_mlx.sh ~/models/SmolLM2-135M-Instruct
#
# MODEL_DIR is a Hugging Face folder both read (safetensors + tokenizer). DATA defaults to the
# WWDC25 set in ../shared/data (prompt/completion JSONL, which both tools take). When mlx-lm is
# not installed (`PY -c "import mlx_lm"` fails) FineTune's figure is printed alone, with a note.
# Both train the projections q_proj and v_proj of every layer with LoRA rank RANK, alpha 2·RANK,
# no dropout, learning rate 1e-4, batch BATCH of rows cut at SEQ tokens.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?model folder (Hugging Face layout)}
DATA=${2:-../shared/data/wwdc25-train.jsonl}
STEPS=${STEPS:-20}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
RANK=${RANK:-8}
DTYPE=${DTYPE:-bf16}
DEVICE=${DEVICE:-metal}
PY=${PY:-python3}
BIN=${FT_BIN:-target/release/finetune}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "machine: $(uname -sm); $(sysctl -n machdep.cpu.brand_string 2>/dev/null || grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
[ -x "$BIN" ] || cargo build --release --bin finetune

"$BIN" bench --model "$MODEL" --data "$DATA" --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" \
  --seq-len "$SEQ" --rank "$RANK" --steps "$STEPS" --json > "$OUT/finetune.json"

if ! "$PY" -c "import mlx_lm" 2>/dev/null; then
  echo "mlx-lm is not installed for $PY (pip install mlx-lm): FineTune's figure alone"
  exit 0
fi
# mlx-lm reads a folder with train.jsonl and valid.jsonl.
mkdir -p "$OUT/data"
cp "$DATA" "$OUT/data/train.jsonl"
head -n 20 "$DATA" > "$OUT/data/valid.jsonl"
cat > "$OUT/lora.yaml" <<EOF
model: "$MODEL"
train: true
data: "$OUT/data"
fine_tune_type: lora
num_layers: -1
batch_size: $BATCH
iters: $STEPS
learning_rate: 1e-4
max_seq_length: $SEQ
steps_per_report: 5
steps_per_eval: 100000
val_batches: 1
adapter_path: "$OUT/mlx-adapter"
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: $RANK
  scale: 2.0
  dropout: 0.0
EOF
"$PY" -m mlx_lm lora --config "$OUT/lora.yaml" > "$OUT/mlx.log" 2>&1 || { tail -20 "$OUT/mlx.log"; exit 1; }

"$PY" - "$OUT/finetune.json" "$OUT/mlx.log" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
ft = json.loads(text[text.index("{"):])
ft_tps = ft.get("tokens_per_sec")
log = re.sub(r"\x1b\[[0-9;]*m", "", open(sys.argv[2]).read())
# mlx-lm reports its training speed every steps_per_report iterations: "Tokens/sec N" in older
# versions, a table row "iter  train_loss  tok/s  tokens" in 0.32. The first report includes the
# warm-up, so the later ones are averaged.
rates = [float(x) for x in re.findall(r"Tokens/sec[ :]+([0-9.]+)", log)]
if not rates:
    for line in log.splitlines():
        m = re.match(r"\s*\d+\s+[0-9.]+\s*\S?\s+([0-9.]+)\s+[0-9.]+k?\s*$", line)
        if m:
            rates.append(float(m.group(1)))
mlx_tps = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else (rates[0] if rates else None)
print(f"FineTune ({ft.get('device')}, {ft.get('dtype')}): {ft_tps} tokens/s")
print(f"mlx-lm: {mlx_tps} tokens/s (reports: {rates})")
if ft_tps and mlx_tps:
    print(f"FineTune / mlx-lm: {float(ft_tps) / mlx_tps:.2f}x")
EOF
