#!/usr/bin/env bash
# Runs this FineTune job with accelerate (written by `finetune job export --to trl`).
#   NUM_PROCESSES   processes (GPUs); default: the GPUs torch sees, else 1
#   MAX_STEPS       optimizer steps (default: the job's)
#   CPU=1           run on the CPU (a dry run: f32, gloo)
#   ACCELERATE      ddp (default), fsdp (models that do not fit one GPU) or zero3 (DeepSpeed ZeRO-3)
#   MODEL           the base model (Hub id or folder; default: the job's)
#   PYTHON          the Python with requirements.txt installed (default: python3)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
n=${NUM_PROCESSES:-$("$py" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
if [ "${CPU:-0}" = 1 ] && [ "$n" -gt 1 ]; then
  # accelerate's --cpu runs one process; several CPU processes are DDP over gloo via torchrun.
  exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$n" "$here/train.py"
fi
extra=()
if [ "${CPU:-0}" = 1 ]; then extra+=(--cpu); fi
exec "$py" -m accelerate.commands.launch --config_file "$here/accelerate/${ACCELERATE:-ddp}.yaml" \
  --num_processes "$n" "${extra[@]}" "$here/train.py"
