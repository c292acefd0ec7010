#!/usr/bin/env bash
# Checks the CUDA build without a GPU: it must link, carry sm_90 kernels, and, given a driver
# library that reports no usable GPU (the link stub, whose every call fails), stop with a clear
# error instead of crashing or hanging.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-toolchain.sh)"
bin=${CARGO_TARGET_DIR:-target/cuda}/release/lookout
[ -x "$bin" ] || { echo "check-cuda-build: $bin is missing; run scripts/build-cuda.sh" >&2; exit 1; }
size=$(stat -c %s "$bin")
stripped=$(mktemp)
strip -o "$stripped" "$bin"
echo "cuda binary: $((size / 1048576)) MiB, $(($(stat -c %s "$stripped") / 1048576)) MiB stripped"
rm -f "$stripped"
targets=$(strings "$bin" | grep -E '^\.target sm_' | sort -u | tr '\n' ' ')
echo "embedded PTX targets: $targets"
case "$targets" in *"sm_${CUDA_COMPUTE_CAP:-90}"*) ;; *) echo "check-cuda-build: no sm_${CUDA_COMPUTE_CAP:-90} kernels" >&2; exit 1 ;; esac
out=$(LD_LIBRARY_PATH="$CUDA_ROOT/lib/stubs:$CUDA_ROOT/lib" timeout 60 "$bin" analyze --device cuda \
  --model fixtures/models/tiny-tied --video fixtures/preprocess/clips/h264_short_30fps_256x144.mp4 --prompt hi 2>&1) && {
  echo "check-cuda-build: expected a failure without a GPU" >&2; exit 1; }
echo "$out" | grep -q "cannot open CUDA device 0" || { echo "check-cuda-build: unclear error: $out" >&2; exit 1; }
[ "$(echo "$out" | wc -l)" -eq 1 ] || { echo "check-cuda-build: expected one line: $out" >&2; exit 1; }
echo "cuda build without a GPU: $out"
