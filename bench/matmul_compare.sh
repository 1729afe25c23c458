#!/usr/bin/env bash
# The CPU's bf16 products side by side in one run (issue 22): FineTune's kernel (AMX-BF16 where
# the CPU and OS allow, then AVX512-BF16 with FINETUNE_NO_AMX=1) against torch's bf16 matmul
# (oneDNN, the library PEFT trains with) on SmolLM2-135M's training shapes, same thread count.
#
#   PYTHON=~/.cache/finetune/pyref-v1/bin/python bash bench/matmul_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:?a python with torch}
threads=${THREADS:-$(nproc)}
grep -m1 'model name' /proc/cpuinfo || true
cargo build -q --release --example bf16_matmul
echo "== FineTune, best kernel"
RAYON_NUM_THREADS=$threads target/release/examples/bf16_matmul
echo "== FineTune, FINETUNE_NO_AMX=1"
FINETUNE_NO_AMX=1 RAYON_NUM_THREADS=$threads target/release/examples/bf16_matmul
echo "== torch $("$py" -c 'import torch; print(torch.__version__)') bf16 matmul (oneDNN), $threads threads"
"$py" - "$threads" <<'PY'
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
for m, k, n, what in [(1024, 576, 576, "q/o proj"), (1024, 576, 192, "k/v proj"),
                      (1024, 576, 1536, "gate/up proj"), (1024, 1536, 576, "down proj"),
                      (1024, 576, 49152, "LM head")]:
    a = torch.randn(m, k).to(torch.bfloat16)
    w = torch.randn(n, k).to(torch.bfloat16)
    y = a @ w.t()
    reps = int(min(200, max(2, 2e10 / (2 * m * n * k))))
    t = time.perf_counter()
    for _ in range(reps):
        y = a @ w.t()
    s = (time.perf_counter() - t) / reps
    print(f"{what:<13} {m}x{k} · {k}x{n}: {s*1e3:.3f} ms, {2*m*n*k/s/1e9:.0f} GFLOP/s")
PY
