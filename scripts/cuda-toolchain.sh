#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from PyPI's NVIDIA wheels (no system CUDA needed) and
# prints the environment for `cargo build --features cuda`.
#
#   eval "$(scripts/cuda-toolchain.sh)"
#
# Idempotent and cached: wheels go to $LOOKOUT_CUDA_CACHE (default ~/.cache/lookout/cuda-wheels),
# the toolkit to $LOOKOUT_CUDA_ROOT (default ~/.cache/lookout/cuda-13.0). Everything is pinned to
# the 13.0 series: a CUDA 13.0 driver (R580) cannot load PTX from a newer nvcc.
# The stub libcuda.so.1 made here is only on the link path (lib64/stubs); at run time the real
# driver's libcuda.so.1 is used.
set -euo pipefail
cache=${LOOKOUT_CUDA_CACHE:-$HOME/.cache/lookout/cuda-wheels}
root_base=${LOOKOUT_CUDA_ROOT:-$HOME/.cache/lookout/cuda-13.0}
root=$root_base/nvidia/cu13
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)
stamp=$root_base/.lookout-wheels
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${wheels[*]}" ]; then
  mkdir -p "$cache" "$root_base"
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$cache" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    "${wheels[@]}" >&2
  for w in "${wheels[@]}"; do
    name=${w%%==*}; version=${w##*==}
    file=$(ls "$cache"/"${name//-/_}"-"$version"-*.whl | head -1)
    python3 -m zipfile -e "$file" "$root_base" >&2
  done
  chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
  # Unversioned names for the linker, lib64 as toolkits lay it out.
  (cd "$root/lib" && for f in *.so.*; do base=${f%%.so.*}.so; [ -e "$base" ] || ln -s "$f" "$base"; done)
  [ -e "$root/lib64" ] || ln -s lib "$root/lib64"
  # A link-time stub of the driver API, generated from cuda.h's names.
  mkdir -p "$root/lib/stubs"
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$root/include/cuda.h" | sort -u |
    awk '{printf "int %s(void) { return 999; }\n", $1}' > "$root/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -o "$root/lib/stubs/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$root/lib/stubs/cuda_stub.c"
  ln -sf libcuda.so.1 "$root/lib/stubs/libcuda.so"
  echo "${wheels[*]}" > "$stamp"
fi
cat <<ENV
export CUDA_ROOT=$root
export CUDA_PATH=$root
export CUDA_HOME=$root
export PATH=$root/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-2}
export LIBRARY_PATH=$root/lib/stubs:$root/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export RUSTFLAGS="\${RUSTFLAGS:-} -L native=$root/lib/stubs -L native=$root/lib"
ENV
