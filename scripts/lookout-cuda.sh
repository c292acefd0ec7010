#!/usr/bin/env bash
# Runs the CUDA build of lookout with its CUDA libraries on LD_LIBRARY_PATH.
#
#   scripts/lookout-cuda.sh analyze --device cuda --dtype bf16 --model DIR --video clip.mp4 --prompt "..."
#
# The binary needs the NVIDIA driver's libcuda.so.1 (R580 or newer for CUDA 13.0) from the system,
# and libcublas.so.13, libcublasLt.so.13, libcudart.so.13 and libcurand.so.10. Those are found in,
# in order: $LOOKOUT_CUDA_LIBS, a Python environment's NVIDIA wheels (PyTorch installs them under
# site-packages/nvidia/cu13/lib), or the toolchain that scripts/cuda-toolchain.sh installed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${LOOKOUT_BIN:-$here/target/cuda/release/lookout}
libs=${LOOKOUT_CUDA_LIBS:-}
if [ -z "$libs" ]; then
  libs=$(python3 - <<'PY' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for base in (spec.submodule_search_locations if spec else []):
    lib = os.path.join(base, "cu13", "lib")
    if os.path.exists(os.path.join(lib, "libcublas.so.13")):
        print(lib)
        break
PY
)
fi
if [ -z "$libs" ] && [ -e "${LOOKOUT_CUDA_ROOT:-$HOME/.cache/lookout/cuda-13.0}/nvidia/cu13/lib/libcublas.so.13" ]; then
  libs=${LOOKOUT_CUDA_ROOT:-$HOME/.cache/lookout/cuda-13.0}/nvidia/cu13/lib
fi
if [ -z "$libs" ]; then
  echo "lookout-cuda: cannot find libcublas.so.13; set LOOKOUT_CUDA_LIBS to the folder holding the CUDA 13 libraries" >&2
  exit 1
fi
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
exec "$bin" "$@"
