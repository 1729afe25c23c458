#!/usr/bin/env bash
# QLoRA against bf16 LoRA on the same job, side by side (issue 18): `finetune bench` with float
# bf16 base weights, then with `--quantize Q` (default q4_k), alternated for ROUNDS rounds, each run
# a fresh process (peak memory is per process). Prints every run and the medians: tokens/s, peak
# memory (bytes held by tensors on CUDA; the process's peak RSS on the CPU) and the ratios.
# A model folder with only config.json gets random weights (kept in /tmp between runs).
# BENCH_FLAGS adds flags to every timed run of both (e.g. "--checkpointing").
#
#   bash bench/qlora_memory.sh BIN MODEL_DIR DEVICE [ROUNDS] [BATCH] [SEQ_LEN] [QUANT] [STEPS]
set -euo pipefail
bin=${1:?finetune binary}; model=${2:?model folder}; device=${3:?cpu or cuda}
rounds=${4:-2}; batch=${5:-4}; seq=${6:-512}; quant=${7:-q4_k}; steps=${8:-5}
rand=/tmp/ft-random-$(basename "$model")
out=$(mktemp)
"$bin" bench --model "$model" --random-dir "$rand" --device "$device" --dtype bf16 --batch 1 \
  --seq-len 16 --steps 1 --warmup 0 >/dev/null
for r in $(seq 1 "$rounds"); do
  for q in none "$quant"; do
    extra=()
    [ "$q" = none ] || extra=(--quantize "$q")
    "$bin" bench --model "$model" --random-dir "$rand" --device "$device" --dtype bf16 \
      --batch "$batch" --seq-len "$seq" --steps "$steps" --warmup 2 --json ${BENCH_FLAGS:-} "${extra[@]}" \
      | python3 -c 'import json,sys; q=sys.argv[1]; d=json.load(sys.stdin); print(json.dumps({"quant":q,"tokens_per_sec":d["tokens_per_sec"],"device_peak_allocated":d["device_peak_allocated"],"peak_rss_bytes":d["peak_rss_bytes"],"estimate":d["estimate"]["total"],"what":d["quant"],"device":d["device"]}))' "$q" \
      | tee -a "$out"
  done
done
python3 - "$out" "$quant" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
q = sys.argv[2]
def med(which, k):
    v = [r[k] for r in rows if r["quant"] == which and r[k] is not None]
    return statistics.median(v) if v else None
mem = "device_peak_allocated" if rows[0]["device_peak_allocated"] else "peak_rss_bytes"
f_t, q_t = med("none", "tokens_per_sec"), med(q, "tokens_per_sec")
f_m, q_m = med("none", mem), med(q, mem)
print(f"{rows[0]['device']}: {next(r['what'] for r in rows if r['quant'] == q)}")
print(f"median tokens/s: bf16 LoRA {f_t:.0f}, QLoRA {q} {q_t:.0f} ({q_t/f_t:.2f}x)")
print(f"median {mem}: bf16 LoRA {f_m/1e9:.2f} GB (estimate {med('none','estimate')/1e9:.2f}), "
      f"QLoRA {q_m/1e9:.2f} GB (estimate {med(q,'estimate')/1e9:.2f}): {q_m/f_m:.2f}x")
PY
