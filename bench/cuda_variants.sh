#!/usr/bin/env bash
# One FineTune `bench` per environment variant on the lent GPU, same job, for A/B checks of
# switches that only matter there (FINETUNE_CUDA_POOL_TRIM=1, FINETUNE_KERNELS=composed, ...).
#
#   bash bench/cuda_variants.sh BIN MODEL_DIR BATCH SEQ_LEN RANK STEPS 'ENV=1 ...' ['ENV=...' ...]
# An empty string is the default build. Prints one line per variant: tokens/s and the step split
# (synced, and the host's issue time).
set -euo pipefail
bin=$1; model=$2; batch=$3; seq=$4; rank=$5; steps=$6; shift 6
rand=/tmp/ft-random-$(basename "$model")
"$bin" bench --model "$model" --random-dir "$rand" --device cuda --batch 1 --seq-len 16 --steps 1 --warmup 0 >/dev/null
for variant in "$@"; do
  env $variant "$bin" bench --model "$model" --random-dir "$rand" --device cuda --batch "$batch" \
    --seq-len "$seq" --rank "$rank" --steps "$steps" --warmup 3 --json |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
v = sys.argv[1] or "default"
ms = lambda k: d[k] * 1e3
print("%-60s %8.0f tok/s  fwd %6.1f ms (host %6.1f)  bwd %6.1f ms (host %6.1f)  opt %5.1f ms" % (
    v, d["tokens_per_sec"], ms("forward_secs"), ms("forward_host_secs"), ms("backward_secs"),
    ms("backward_host_secs"), ms("optimizer_secs")))' "$variant"
done
