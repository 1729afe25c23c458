#!/usr/bin/env bash
# Runs this FineTune job with mlx-lm (written by `finetune job export --to mlx-lm`).
#   MAX_STEPS   iterations (default: the job's)
#   MODEL       the base model (Hub id or folder; default: the job's)
#   PYTHON      the Python with mlx-lm installed (default: python3)
# Across several Macs: put the hosts in hosts.json and run
#   mlx.launch --hostfile hosts.json -- python -m mlx_lm lora --config lora.yaml
# (each Mac needs this folder and the model at the same path; see mlx-lm's LORA.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
args=(--config "$here/lora.yaml" --data "$here/data" --adapter-path "${OUT:-$here/output}/adapter")
if [ -n "${MAX_STEPS:-}" ]; then args+=(--iters "$MAX_STEPS"); fi
if [ -n "${MODEL:-}" ]; then args+=(--model "$MODEL"); fi
cd "$here"
exec "$py" -m mlx_lm lora "${args[@]}"
