#!/usr/bin/env bash
# Model speed: Lookout's candle engine against transformers on the same random-weight model, the
# same synthetic clip and the same machine.
#
#   benches/model.sh [small|2b] [cpu|cuda]
#
# Makes .bench/<shape>-model with tools/reference/make_bench_model.py (random weights, Qwen3-VL
# layout), runs inference/benches/model.rs (vision ms per frame pair, prefill tokens/s, TTFT,
# decode tokens/s; it also writes its exact inputs), then tools/reference/bench_model.py on those
# inputs, and prints both with the ratios. Environment: LOOKOUT_BENCH_PAIRS (4),
# LOOKOUT_BENCH_SIDE (448), LOOKOUT_BENCH_DECODE (64), LOOKOUT_BENCH_DTYPE (f32).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
shape=${1:-small}
device=${2:-cpu}
. benches/common.sh
mkdir -p .bench
model=$(bench_model "$shape")
features=()
[ "$device" = cpu ] || features=(--features cuda)
LOOKOUT_BENCH_MODEL=$model LOOKOUT_BENCH_DEVICE=$device LOOKOUT_BENCH_DTYPE=${LOOKOUT_BENCH_DTYPE:-f32} LOOKOUT_BENCH_INPUTS=$PWD/.bench/bench-inputs.safetensors \
  cargo bench -q --locked -p inference "${features[@]}" --bench model > .bench/lookout-model.json
tools/reference/run.sh bench_model.py "$model" .bench/bench-inputs.safetensors "${LOOKOUT_BENCH_DTYPE:-f32}" "$device" \
  2>/dev/null > .bench/transformers-model.json
tools/reference/run.sh - <<'PY'
import json
r = json.loads(open(".bench/lookout-model.json").read().strip().splitlines()[-1])
p = json.loads(open(".bench/transformers-model.json").read().strip().splitlines()[-1])
print(f"model bench: {r['prompt_tokens']} prompt tokens, {r['frame_pairs']} frame pairs, "
      f"threads lookout {r['threads']} / transformers {p['threads']}")
print(f"{'metric':<26}{'lookout':>12}{'transformers':>14}{'ratio':>8}")
for key, better in [("vision_ms_per_pair", "lower"), ("prefill_tok_s", "higher"), ("ttft_ms", "lower"),
                    ("decode_tok_s", "higher")]:
    ratio = p[key] / r[key] if better == "lower" else r[key] / p[key]
    print(f"{key:<26}{r[key]:>12.2f}{p[key]:>14.2f}{ratio:>7.2f}x")
print("(ratio > 1 means Lookout is faster)")
print(f"kernels: lookout: {r.get('kernels', '?')}; transformers: {p.get('kernels', '?')}")
PY
