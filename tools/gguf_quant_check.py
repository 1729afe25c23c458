#!/usr/bin/env python3
"""Checks FineTune's quantized GGUF exports against llama.cpp's own quantizer: llama.cpp
(`llama_model_quantize`, what `llama-quantize` runs) quantizes FineTune's F32 export of the same
model to each type, and then

1. every tensor must have the type llama.cpp chose (the per-tensor mix of Q4_K_M / Q5_K_M, the
   output matrix in Q6_K, llama.cpp's fallbacks for rows that do not split into 256-blocks);
2. the quantized bytes are compared: the share of tensors whose bytes are identical is printed
   (Candle's quantizers follow ggml's reference ones; small rounding differences are possible);
3. llama.cpp runs both files on the same ids: their logits must agree within TOL (default 0.05;
   the two files hold the same quantized weights up to those rounding differences), and both
   must give the same greedy continuation.

Usage: python3 tools/gguf_quant_check.py F32.gguf DIR [TYPE ...]
  DIR holds FineTune's exports named <stem>-<TYPE>.gguf next to F32.gguf's <stem>-F32.gguf,
  e.g. /tmp/g/smol-F32.gguf and /tmp/g/smol-Q4_K_M.gguf. TYPEs default to Q8_0 Q6_K Q5_K_M
  Q4_K_M Q4_0. Needs llama-cpp-python and llama.cpp's gguf-py (PYTHONPATH=$LCPP/gguf-py).
Exit status 0 when everything holds, 1 otherwise.
"""
import os
import shutil
import sys
import tempfile

import numpy as np
import llama_cpp
from llama_cpp import Llama
from gguf import GGUFReader

FTYPES = {"F16": 1, "BF16": 32, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
IDS = [1, 504, 3458, 314, 253, 1345, 30, 378, 441, 1184, 28, 339, 1083, 2701, 30, 216]


def tensors(path):
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in r.tensors}


def run(path, n_new=12):
    llm = Llama(model_path=path, n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(IDS)
    logits = np.array(llm.scores[: len(IDS)], dtype=np.float32)
    llm.reset()
    out = []
    for t in llm.generate(IDS, temp=0.0, top_k=1):
        out.append(t)
        if len(out) >= n_new:
            break
    return logits, out


def main(f32, folder, types, tol=0.05):
    stem = os.path.basename(f32)[: -len("-F32.gguf")]
    ok = True
    tmp = tempfile.mkdtemp()
    for ty in types:
        ours = os.path.join(folder, f"{stem}-{ty}.gguf")
        ref = os.path.join(tmp, f"llamacpp-{ty}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[ty]
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(f32.encode(), ref.encode(), params)
        if rc != 0:
            print(f"{ty}: llama.cpp could not quantize {f32} (rc {rc})")
            ok = False
            continue
        a, b = tensors(ours), tensors(ref)
        wrong_type = [(n, a[n][0], b[n][0]) for n in b if n in a and a[n][0] != b[n][0]]
        missing = sorted(set(a) ^ set(b))
        same_bytes = sum(1 for n in b if n in a and a[n][1] == b[n][1])
        types_used = sorted({t for t, _ in a.values()})
        la, ga = run(ours)
        lb, gb = run(ref)
        d = float(np.abs(la - lb).max())
        good = not wrong_type and not missing and d <= tol and ga == gb
        print(f"{ty}: {len(a)} tensors, types {types_used}; types as llama.cpp: "
              f"{'yes' if not wrong_type else wrong_type[:4]}; identical bytes {same_bytes}/{len(b)}; "
              f"max|logits FineTune file - llama.cpp file| {d:.3e}; same greedy tokens: {ga == gb}"
              + ("" if good else "  FAILED"))
        if missing:
            print(f"  tensors in one file only: {missing[:6]}")
        ok &= good
        os.remove(ref)
    shutil.rmtree(tmp, ignore_errors=True)
    print("GGUF quantization check: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:] or list(FTYPES)))
