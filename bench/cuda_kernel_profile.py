"""Per-kernel GPU time of one FineTune training step, from Nsight Compute (ncu) on the lent GPU.

    python3 bench/cuda_kernel_profile.py BIN MODEL_DIR [BATCH SEQ_LEN RANK] [--count N] [--out DIR]

Runs `BIN bench` for one step (no warm-up) under `ncu --metrics gpu__time_duration.sum` (kernels
are serialised, so this is device time per kernel, not the overlapped step time) and prints the
kernels by total time, with their count. The raw CSV goes to DIR.
"""
import argparse, csv, io, os, subprocess, sys, collections

p = argparse.ArgumentParser()
p.add_argument("bin"); p.add_argument("model")
p.add_argument("rest", nargs="*", type=int, default=[4, 512, 16])
p.add_argument("--count", type=int, default=20000)
p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
p.add_argument("--top", type=int, default=40)
a = p.parse_args()
batch, seq, rank = (a.rest + [4, 512, 16][len(a.rest):])[:3]
rand = "/tmp/ft-random-" + os.path.basename(a.model.rstrip("/"))
cmd = ["ncu", "--clock-control", "none", "--metrics", "gpu__time_duration.sum",
       "--launch-count", str(a.count), "--csv", "--page", "raw",
       a.bin, "bench", "--model", a.model, "--random-dir", rand, "--device", "cuda",
       "--batch", str(batch), "--seq-len", str(seq), "--rank", str(rank), "--steps", "1", "--warmup", "0"]
r = subprocess.run(cmd, capture_output=True, text=True)
open(os.path.join(a.out, "ncu-raw.csv"), "w").write(r.stdout)
open(os.path.join(a.out, "ncu-stderr.txt"), "w").write(r.stderr)
lines = [l for l in r.stdout.splitlines() if l.startswith('"')]
rows = list(csv.reader(io.StringIO("\n".join(lines))))
if not rows:
    print(r.stdout[-3000:], r.stderr[-3000:]); sys.exit(1)
head = rows[0]
name_i = head.index("Kernel Name")
t_i = head.index("gpu__time_duration.sum")
tot = collections.defaultdict(float); cnt = collections.Counter()
for row in rows[1:]:
    try:
        v = float(row[t_i].replace(",", ""))
    except ValueError:
        continue  # the units row
    unit = rows[1][t_i]
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(unit, 1e-3)
    k = row[name_i][:90]
    tot[k] += v * scale; cnt[k] += 1
all_us = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {all_us/1e3:.1f} ms of device time in total")
for k, us in sorted(tot.items(), key=lambda x: -x[1])[: a.top]:
    print(f"{us/1e3:8.2f} ms {cnt[k]:6d}x {us/cnt[k]:8.1f} us  {k}")
