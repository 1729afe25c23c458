#!/usr/bin/env bash
# GPU side-by-side: FineTune (`finetune bench --device cuda`, bf16 base weights) and PyTorch +
# transformers + PEFT (bench/peft_bench.py --device cuda --dtype bf16) on the same job, alternated
# for several rounds; prints every run and the medians with the ratio. Run on the lent GPU machine
# (see BENCHMARKS.md for the device call): the release binary built with `--features cuda` is
# carried gzipped, PEFT as a wheel. A model folder with only config.json gets random weights.
#
#   bash bench/cuda_compare.sh BIN MODEL_DIR [ROUNDS] [BATCH] [SEQ_LEN] [RANK] [STEPS] [PEAK_TFLOPS]
set -euo pipefail
bin=${1:?finetune binary}; model=${2:?model folder}; rounds=${3:-3}; batch=${4:-4}; seq=${5:-512}
rank=${6:-16}; steps=${7:-10}; peak=${8:-989}
rand=/tmp/ft-random-$(basename "$model")
out=$(mktemp)
"$bin" bench --model "$model" --random-dir "$rand" --device cuda --batch 1 --seq-len 16 --steps 1 --warmup 0 >/dev/null
for r in $(seq 1 "$rounds"); do
  "$bin" bench --model "$model" --random-dir "$rand" --device cuda --batch "$batch" --seq-len "$seq" \
    --rank "$rank" --steps "$steps" --warmup 3 --peak-tflops "$peak" --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"impl":"finetune","tokens_per_sec":d["tokens_per_sec"],"step_secs":d["step_secs"],"forward_secs":d["forward_secs"],"backward_secs":d["backward_secs"],"optimizer_secs":d["optimizer_secs"],"mfu":d["mfu"],"flops_per_token":d["flops_per_token"],"device_bytes":d["device_bytes"],"device_peak_allocated":d["device_peak_allocated"],"estimate_bytes":d["estimate"]["total"],"peak_rss_bytes":d["peak_rss_bytes"]}))' | tee -a "$out"
  python3 bench/peft_bench.py --model "$model" --device cuda --dtype bf16 --batch "$batch" --seq-len "$seq" \
    --rank "$rank" --steps "$steps" --warmup 3 | tee -a "$out"
done
python3 - "$out" "$peak" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
peak = float(sys.argv[2])
med = lambda impl, k: statistics.median(r[k] for r in rows if r["impl"] == impl)
ft, pt = "finetune", "transformers+peft"
fpt = next(r["flops_per_token"] for r in rows if r["impl"] == ft)
f, p = med(ft, "tokens_per_sec"), med(pt, "tokens_per_sec")
print(f"median tokens/s: FineTune {f:.0f} (MFU {100*f*fpt/1e12/peak:.1f}%), PEFT {p:.0f} "
      f"(MFU {100*p*fpt/1e12/peak:.1f}%), ratio {f/p:.2f}x  [{fpt/1e9:.2f} GFLOP/token, peak {peak} TFLOP/s]")
print(f"FineTune step split (median s): forward {med(ft,'forward_secs'):.4f}, backward {med(ft,'backward_secs'):.4f}, "
      f"optimizer {med(ft,'optimizer_secs'):.4f}; device memory in use up to {med(ft,'device_bytes')/1e9:.2f} GB")
print(f"peak allocated: FineTune {med(ft,'device_peak_allocated')/1e9:.2f} GB (estimate {med(ft,'estimate_bytes')/1e9:.2f} GB), "
      f"PEFT {med(pt,'peak_device_bytes')/1e9:.2f} GB, ratio {med(ft,'device_peak_allocated')/med(pt,'peak_device_bytes'):.2f}x")
PY
