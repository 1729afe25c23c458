#!/usr/bin/env bash
# Side-by-side CPU benchmark: FineTune (`finetune bench`) and transformers + PEFT
# (bench/peft_bench.py) on the same model and job, alternated for several rounds; PEFT runs both in
# f32 and in bf16 (weights in bf16, as FineTune's default), and the ratio is taken against the
# faster of the two (issue 22). Prints each run, the CPU, and the medians with the ratios. Creates
# bench/.venv (torch, transformers, peft) on first use unless PYTHON names one.
#
#   bash bench/compare.sh MODEL_DIR [ROUNDS] [BATCH] [SEQ_LEN] [RANK] [STEPS]
#   FT_ARGS="--checkpointing" bash bench/compare.sh ...     # extra flags for `finetune bench`
#   FT_BIN=path/to/finetune PYTHON=path/to/python bash bench/compare.sh ...  # no build, no venv
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model folder}; rounds=${2:-3}; batch=${3:-4}; seq=${4:-256}; rank=${5:-8}; steps=${6:-5}
venv=bench/.venv
py=${PYTHON:-$venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers peft safetensors
fi
if [ -z "${FT_BIN:-}" ]; then cargo build --release -q; fi
echo "finetune bench flags: ${FT_ARGS:-(none)}"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores)"
bin=${FT_BIN:-${CARGO_TARGET_DIR:-target}/release/finetune}
out=$(mktemp)
for r in $(seq 1 "$rounds"); do
  "$bin" bench --model "$model" --batch "$batch" --seq-len "$seq" --rank "$rank" --steps "$steps" --warmup 2 --json ${FT_ARGS:-} \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"impl":"finetune","tokens_per_sec":d["tokens_per_sec"],"step_secs":d["step_secs"],"peak_rss_bytes":d["peak_rss_bytes"]}))' | tee -a "$out"
  for dt in f32 bf16; do
    "$py" bench/peft_bench.py --model "$model" --batch "$batch" --seq-len "$seq" --rank "$rank" --steps "$steps" --warmup 2 --dtype "$dt" \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); d["impl"]+="-"+d["dtype"]; print(json.dumps(d))' | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda impl, k: statistics.median(r[k] for r in rows if r["impl"] == impl)
ft = "finetune"
for dt in ("f32", "bf16"):
    p = "transformers+peft-" + dt
    print(f"PEFT {dt}: median {med(p,'tokens_per_sec'):.1f} tokens/s, peak RSS {med(p,'peak_rss_bytes')/1e6:.0f} MB")
pt = max(("transformers+peft-f32", "transformers+peft-bf16"), key=lambda p: med(p, "tokens_per_sec"))
print(f"faster PEFT baseline: {pt}")
print(f"median tokens/s: FineTune {med(ft,'tokens_per_sec'):.1f}, PEFT {med(pt,'tokens_per_sec'):.1f}, "
      f"ratio {med(ft,'tokens_per_sec')/med(pt,'tokens_per_sec'):.2f}x")
print(f"median peak RSS: FineTune {med(ft,'peak_rss_bytes')/1e6:.0f} MB, PEFT {med(pt,'peak_rss_bytes')/1e6:.0f} MB, "
      f"ratio {med(ft,'peak_rss_bytes')/med(pt,'peak_rss_bytes'):.2f}x")
PY
