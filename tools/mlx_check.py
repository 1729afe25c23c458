#!/usr/bin/env python3
"""Checks a FineTune MLX adapter with its real consumer: mlx-lm loads MODEL_DIR with
MLX_ADAPTER_DIR (mlx_lm.load(..., adapter_path=...), in f32) and must give the tuned logits
FineTune computed for the same ids (LOGITS, written by `cargo run --example adapter_logits`), and
without the adapter the base logits; the adapter must also change the logits (a zero adapter
would pass trivially).

mlx-lm cannot read a few things in transformers-5 model folders, so the model (never the adapter)
goes through small shims, each printed as a note: `rope_theta` nested in `rope_parameters` (llama,
qwen2 read only the top-level key; Gemma 3's per-layer-type entries; Phi-3's LongRoPE, which
mlx-lm wants as `rope_scaling` with `type`), and for gpt2 the missing `n_ctx` and the
`transformer.` weight prefix (mlx-lm's gpt2 sanitize expects the prefix-less keys of the original
checkpoints). What mlx-lm itself does differently is the caller's to align: its Gemma 2 has no
sliding window, its Phi-3 always uses the long LongRoPE factors.

Usage: python3 tools/mlx_check.py MODEL_DIR MLX_ADAPTER_DIR LOGITS.safetensors
(mlx-lm runs on Linux: `pip install "mlx[cpu]" mlx-lm safetensors numpy`.)
Exit status 0 when everything matches (max |diff| <= 1e-4 in f32), 1 otherwise.
"""
import json
import os
import sys
import tempfile

import mlx.core as mx
import numpy as np
from mlx_lm import load
from safetensors.numpy import load_file

TOL = 1e-4


def model_shims(model_dir, tmp):
    """Returns (model dir to load, model_config overrides) for what mlx-lm misreads."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    overrides = {}
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        overrides["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            overrides["rope_scaling"] = rope
    if isinstance(rope.get("full_attention"), dict):
        # Gemma 3: one entry per layer type; mlx-lm reads rope_theta, rope_local_base_freq and
        # the global rope_scaling at the top level.
        full, local = rope["full_attention"], rope.get("sliding_attention") or {}
        overrides["rope_theta"] = full.get("rope_theta", 1_000_000.0)
        overrides["rope_local_base_freq"] = local.get("rope_theta", 10_000.0)
        if full.get("rope_type", "default") != "default":
            overrides["rope_scaling"] = full
    if config.get("model_type") == "phi3" and rope.get("rope_type") in ("longrope", "su"):
        # mlx-lm's phi3 wants `type` in rope_scaling and partial_rotary_factor at the top.
        overrides["rope_scaling"] = dict(rope, type=rope["rope_type"])
        if "partial_rotary_factor" in rope:
            overrides["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if config.get("model_type") != "gpt2":
        return model_dir, overrides
    if "n_ctx" not in config:
        overrides["n_ctx"] = config["n_positions"]
    files = sorted(f for f in os.listdir(model_dir) if f.startswith("model") and f.endswith(".safetensors"))
    weights = {}
    for f in files:
        weights.update(mx.load(os.path.join(model_dir, f)))
    if not any(k.startswith("transformer.") for k in weights):
        return model_dir, overrides
    # Stage a copy whose weights lack the `transformer.` prefix (lm_head is tied, so dropped).
    for f in os.listdir(model_dir):
        if not (f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".index.json"))):
            os.symlink(os.path.abspath(os.path.join(model_dir, f)), os.path.join(tmp, f))
    stripped = {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}
    mx.save_safetensors(os.path.join(tmp, "model.safetensors"), stripped)
    print("note: gpt2 weights staged without the `transformer.` prefix")
    return tmp, overrides


def logits(model_dir, overrides, ids, adapter_dir=None):
    model, _ = load(model_dir, model_config=overrides, adapter_path=adapter_dir)
    model.set_dtype(mx.float32)
    out = model(mx.array(ids))
    mx.eval(out)
    return np.array(out.astype(mx.float32))


def main(model_dir, adapter_dir, logits_path):
    mx.set_default_device(mx.cpu)
    want = load_file(logits_path)
    ids = want["input_ids"].astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        load_dir, overrides = model_shims(model_dir, tmp)
        if overrides:
            print(f"note: model_config overrides {overrides}")
        base_logits = logits(load_dir, overrides, ids)
        tuned_logits = logits(load_dir, overrides, ids, adapter_dir)
    d_base = np.abs(base_logits - want["base"]).max()
    d_tuned = np.abs(tuned_logits - want["tuned"]).max()
    moved = np.abs(want["tuned"] - want["base"]).max()
    print(f"base max|diff| {d_base:.3e}  tuned max|diff| {d_tuned:.3e}  adapter moves logits by {moved:.3e}")
    ok = d_base <= TOL and d_tuned <= TOL and moved > 10 * TOL
    print("MLX check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
