# Sourced on the lent GPU machine before running a carried CUDA binary: puts the CUDA libraries
# that PyTorch bundles (cuBLAS, cuRAND, NVRTC for CUDA 13) and the toolkit's, where present, on
# the loader path, and unpacks the carried binaries (.gz or .xz) from .dev/bin into /tmp.
lib=$(python3 -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH="$lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
for f in .dev/bin/*.gz .dev/bin/*.xz; do
  [ -e "$f" ] || continue
  out=/tmp/$(basename "${f%.*}")
  case "$f" in *.xz) xz -dc "$f" >"$out" ;; *) gunzip -c "$f" >"$out" ;; esac
  chmod +x "$out"
done
