#!/usr/bin/env bash
# Chaos: a camera that flaps. One monitor on GStreamer's RTSP server (640x360 H.264, 15 fps)
# with the tiny fixture model; the camera is killed FLAPS times (default 10), down for DOWN
# seconds (default 3) each time. For each flap: the time from the camera being back to the
# monitor's next analysed window, and whether the monitor stayed a monitor (running, windows
# going up, failures counted). Prints p50/max and the monitor's counters at the end.
# Usage: benches/flapping.sh [FLAPS] [DOWN]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
flaps="${1:-10}"; down="${2:-3}"
cargo build -q --release --locked -p ws-gateway --bin lookout
. benches/common.sh
work=$(mktemp -d)
rtsp_port=$(free_port); http_port=$(free_port)
camera() {
  /usr/bin/python3 tools/rtsp_server.py --port "$rtsp_port" > "$work/rtsp.log" 2>&1 &
  rtsp=$!
  for _ in $(seq 100); do grep -q READY "$work/rtsp.log" && return 0; sleep 0.05; done
  echo "the camera did not start" >&2; return 1
}
camera
target/release/lookout serve --model fixtures/models/tiny-tied --port "$http_port" --data-dir "$work/data" \
  --rtsp-max-backoff-s 1 > "$work/lookout.log" 2>&1 &
lookout=$!
trap 'kill $rtsp $lookout 2>/dev/null || true; rm -rf "$work"' EXIT
wait_ready "$http_port"
api="http://127.0.0.1:$http_port"
id=$(curl -s -X POST -H 'content-type: application/json' "$api/v1/monitors" -d "{\"name\":\"flapping\",
  \"source\":{\"kind\":\"rtsp\",\"url\":\"rtsp://127.0.0.1:$rtsp_port/h264\"},\"prompt\":\"What is there?\",
  \"window\":{\"seconds\":1,\"fps\":2,\"min_pixels\":4096,\"max_pixels\":16384},\"generation\":{\"max_tokens\":4}}" |
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
field() { curl -s "$api/v1/monitors/$id" | /usr/bin/python3 -c "import json,sys; m=json.load(sys.stdin); print($1)"; }
windows() { field 'm["counters"]["windows"]'; }
for _ in $(seq 200); do [ "$(windows)" -gt 0 ] && break; sleep 0.1; done
times=()
for i in $(seq "$flaps"); do
  kill -9 $rtsp; wait $rtsp 2>/dev/null || true
  sleep "$down"
  before=$(windows)
  camera
  t0=$(date +%s%N)
  for _ in $(seq 600); do [ "$(windows)" -gt "$before" ] && break; sleep 0.05; done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  times+=("$ms")
  printf 'flap %2d: camera back -> next window %d ms (state %s)\n' "$i" "$ms" "$(field 'm["state"]')"
done
printf '%s\n' "${times[@]}" | sort -n | /usr/bin/python3 -c '
import sys; v=[int(x) for x in sys.stdin]; print(f"{len(v)} flaps: camera back -> next analysed window p50 {v[len(v)//2]} ms, max {v[-1]} ms")'
echo "monitor at the end: $(field 'm["state"], m["counters"]')"
