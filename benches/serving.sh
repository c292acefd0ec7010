#!/usr/bin/env bash
# The engine serving several streams at once (continuous batching, chunked prefill, vision reuse),
# through its real scheduler, each figure against its baseline measured in the same run.
#
#   benches/serving.sh [tiny|small|2b] [cpu|cuda]
#
# `tiny` is the committed fixture; `small` and `2b` are made with tools/reference/make_bench_model.py
# (random weights). Parts and sizes: see the header of inference/benches/serving.rs
# (LOOKOUT_BENCH_PARTS=concurrency,vss,overlap,live, LOOKOUT_BENCH_REQUESTS, LOOKOUT_BENCH_TOKENS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. benches/common.sh
shape=${1:-small}
device=${2:-cpu}
model=$(bench_model "$shape")
features=()
[ "$device" = cpu ] || features=(--features cuda)
LOOKOUT_BENCH_MODEL=$model LOOKOUT_BENCH_DEVICE=$device cargo bench -q --locked -p inference "${features[@]}" --bench serving
