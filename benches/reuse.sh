#!/usr/bin/env bash
# Vision reuse across sliding windows: vision time per window with the reuse cache against every
# window encoded whole, same pixels, same run (outputs checked equal bit for bit).
#
#   benches/reuse.sh [tiny|small|2b] [cpu|cuda]
#
# `tiny` is the committed fixture; `small` and `2b` are made with tools/reference/make_bench_model.py
# (random weights). Environment: LOOKOUT_BENCH_WINDOW_PAIRS (4), LOOKOUT_BENCH_STRIDE_PAIRS (1),
# LOOKOUT_BENCH_WINDOWS (12), LOOKOUT_BENCH_SIDE (448), LOOKOUT_BENCH_DTYPE (f32).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. benches/common.sh
inference_bench reuse "${1:-small}" "${2:-cpu}"
