#!/usr/bin/env bash
# Monitors at scale on this machine, with the tiny fixture model (random weights, CPU):
#   1. N monitors (default 16) on GStreamer's RTSP server (640x360 at 15 fps H.264, one shared
#      encoder so the camera side costs the same for any N), for SECONDS (default 60): the
#      server's CPU and memory per monitor and windows analysed vs skipped per minute;
#   2. the store alone: EVENTS (default 100000) events inserted one at a time (p50/p99), then
#      plain and full-text history queries over them (p50/p99).
# Usage: benches/monitors.sh [SECONDS] [N] [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
seconds="${1:-60}"; n="${2:-16}"; events="${3:-100000}"
cargo build -q --release --locked -p ws-gateway --bin lookout
cargo bench -q --locked -p ws-gateway --bench monitors --no-run
. benches/common.sh
work=$(mktemp -d)
rtsp_port=$(free_port); http_port=$(free_port)
/usr/bin/python3 tools/rtsp_server.py --port "$rtsp_port" --shared > "$work/rtsp.log" 2>&1 &
rtsp=$!
target/release/lookout serve --model fixtures/models/tiny-tied --port "$http_port" --data-dir "$work/data" \
  --max-connections 64 > "$work/lookout.log" 2>&1 &
lookout=$!
trap 'kill $rtsp $lookout 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 150); do grep -q READY "$work/rtsp.log" && break; sleep 0.2; done
wait_ready "$http_port"
echo "== $n monitors on RTSP, ${seconds} s"
LOOKOUT_BASE="127.0.0.1:$http_port" LOOKOUT_PID=$lookout \
  cargo bench -q --locked -p ws-gateway --bench monitors -- live "rtsp://127.0.0.1:$rtsp_port/h264" "$seconds" "$n"
kill $lookout 2>/dev/null || true
echo "== history of $events events"
cargo bench -q --locked -p ws-gateway --bench monitors -- history "$events"
