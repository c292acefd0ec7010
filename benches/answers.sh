#!/usr/bin/env bash
# Constrained answers: llguidance's mask and consume cost per token for a choice, a regex and a
# JSON schema, with the fixture tokenizer and with a Qwen-sized (151,643-token) vocabulary, and
# end-to-end decode speed of constrained requests against unconstrained ones on the fixture
# model, all in one run (inference/benches/answers.rs).
#
#   benches/answers.sh                                    # trains the large BPE once (.bench/)
#   LOOKOUT_BENCH_TOKENIZER=/path/to/Qwen3-VL/tokenizer.json benches/answers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p .bench
cargo bench -q --locked -p inference --bench answers | tee .bench/answers.json
