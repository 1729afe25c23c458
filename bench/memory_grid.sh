#!/usr/bin/env bash
# Peak RSS vs the estimate over a grid of shapes (SmolLM2-135M at /work/smollm2-135m; edit the path).
# Prints: batch seq dtype checkpointing keep-every, measured bytes, estimated bytes, error, tokens/s.
for spec in "1 128 f32 0 0" "2 256 f32 0 0" "4 256 f32 0 0" "1 512 f32 0 0" "4 256 bf16 0 0" "2 128 bf16 0 0" "4 256 f32 1 0" "4 256 bf16 1 0" "4 256 bf16 1 3" "2 512 bf16 1 3" "2 512 bf16 0 0"; do
  set -- $spec
  ck=""; [ "$4" = 1 ] && ck="--checkpointing --checkpoint-keep-every $5"
  ${FT_BIN:-target/release/finetune} bench --model ${MODEL:-/work/smollm2-135m} --batch $1 --seq-len $2 --rank 8 --steps 2 --warmup 1 --dtype $3 $ck --json | python3 -c "import json,sys; d=json.load(sys.stdin); m=d['peak_rss_bytes']; e=d['estimate']['total']; print('$spec', m, e, f'{100*(e/m-1):+.1f}%', round(d['tokens_per_sec'],1))"
done
