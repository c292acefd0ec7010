#!/usr/bin/env bash
# Clip preprocessing: `lookout sample` against the Python reference, on one core.
#
#   benches/preprocess.sh [VIDEO]
#
# Without VIDEO it makes .bench/clip_1080p30_60s.mp4 (60 s of 1080p30 H.264 High with B-frames,
# ffmpeg's testsrc2). Both sides sample it at fps 2 with the reference defaults, pinned to CPU 0
# with one decoder thread and one torch thread, and write their tensors to safetensors. The
# script checks that the outputs agree (same frames and grid, pixels within 2/127.5) and prints
# the wall times and their ratio. The Python reference runs in tools/reference/run.sh's pinned
# virtual environment (made on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p .bench
video=${1:-.bench/clip_1080p30_60s.mp4}
if [ ! -f "$video" ]; then
  echo "making $video" >&2
  ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=size=1920x1080:rate=30:duration=60 \
    -pix_fmt yuv420p -c:v libx264 -preset veryfast -profile:v high -bf 3 -g 250 "$video"
fi
cargo build --release --locked -q -p ws-gateway --bin lookout
runs=${RUNS:-3}

now() { date +%s.%N; }
rust_best=""
for i in $(seq "$runs"); do
  sync
  t0=$(now)
  taskset -c 0 target/release/lookout sample --video "$video" --decode-threads 1 --out .bench/rust.safetensors > .bench/rust.json
  t=$(echo "$(now) - $t0" | bc)
  echo "lookout sample run $i: ${t} s" >&2
  if [ -z "$rust_best" ] || [ "$(echo "$t < $rust_best" | bc)" = 1 ]; then rust_best=$t; fi
done

sync
t0=$(now)
OMP_NUM_THREADS=1 TORCHCODEC_NUM_THREADS=1 taskset -c 0 tools/reference/run.sh bench_preprocess.py "$video" .bench/python.safetensors 2 > .bench/python.json 2>/dev/null
py_wall=$(echo "$(now) - $t0" | bc)

tools/reference/run.sh - <<PY
import json
import numpy as np
from safetensors.numpy import load_file
r = json.load(open(".bench/rust.json")); p = json.load(open(".bench/python.json"))
assert r["frame_indices"] == p["frame_indices"], "frame indices differ"
assert r["grid_thw"] == p["grid_thw"], "grids differ"
a = load_file(".bench/rust.safetensors")["pixel_values_videos"]
b = load_file(".bench/python.safetensors")["pixel_values_videos"]
assert a.shape == b.shape, (a.shape, b.shape)
d = np.abs(a.astype(np.float64) - b.astype(np.float64))
print(f"outputs agree: {len(r['frame_indices'])} frames, grid {r['grid_thw']}, "
      f"pixels max diff {d.max() * 127.5:.2f}/127.5, mean {d.mean() * 127.5:.4f}/127.5")
rust = float("$rust_best"); py_wall = float("$py_wall"); py_work = p["work_s"]
print(f"lookout sample (best of $runs, whole process): {rust:.2f} s")
print(f"python reference, whole process:               {py_wall:.2f} s  (imports {p['imports_s']:.2f} s, "
      f"fetch_video {p['fetch_video_s']:.2f} s, processor {p['processor_s']:.2f} s, save {p['save_s']:.2f} s)")
print(f"speed-up: {py_wall / rust:.1f}x whole process, {py_work / rust:.1f}x against the reference's work alone")
PY
