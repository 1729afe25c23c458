#!/usr/bin/env bash
# Runs every fuzz target for SECONDS from its corpus (fuzz/corpus/TARGET, read-only: new inputs go
# to a temporary folder) and fails on the first crash, timeout (10 s per input) or input using
# more than 2 GB. Run from fuzz/ with RUSTC_BOOTSTRAP=1 on a stable toolchain.
#
#   bash tools/smoke.sh CARGO_FUZZ SECONDS [TARGET...]
set -euo pipefail
fuzz=${1:?path to cargo-fuzz}; secs=${2:?seconds per target}; shift 2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_json safetensors gguf pytorch_bin adapter_config jsonl chat_template)
"$fuzz" fuzz build -O --fuzz-dir .
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  echo "== $t: ${secs} s"
  set +e
  "$fuzz" fuzz run -O --fuzz-dir . "$t" "$scratch" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    > "$scratch.log" 2>&1
  status=$?
  set -e
  grep -a -E '^(stat::|#[0-9]+[[:space:]]*DONE|==[0-9]+==|SUMMARY)|ERROR|panicked|crash-|timeout-|oom-' "$scratch.log" || true
  rm -rf "$scratch" "$scratch.log"
  if [ "$status" != 0 ]; then
    echo "fuzz target $t failed (exit $status); the input is under fuzz/artifacts/$t" >&2
    exit 1
  fi
done
