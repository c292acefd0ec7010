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
inference_bench serving "${1:-small}" "${2:-cpu}"
