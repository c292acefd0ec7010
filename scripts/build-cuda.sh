#!/usr/bin/env bash
# Builds the CUDA release binary (target/cuda/release/lookout) on a machine without a GPU:
# installs the toolchain (scripts/cuda-toolchain.sh), then `cargo build --release --features cuda`.
# The binary needs, at run time, the NVIDIA driver (libcuda.so.1, R580 or newer for CUDA 13.0) and
# libcublas.so.13, libcublasLt.so.13, libcudart.so.13 and libcurand.so.10: see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
eval "$(scripts/cuda-toolchain.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --locked --features cuda -p ws-gateway --bin lookout "$@"
ls -la "$CARGO_TARGET_DIR/release/lookout"
