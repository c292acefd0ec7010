#!/usr/bin/env bash
# Runs the lookout binary (release build), installing what is missing first.
#   scripts/run.sh sample --video clip.mp4 --out clip.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p ws-gateway --bin lookout
exec target/release/lookout "$@"
