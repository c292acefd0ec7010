#!/usr/bin/env bash
# Live ingest cost per stream: GStreamer's RTSP server (tools/rtsp_server.py) serves a 1280x720
# 30 fps H.264 test pattern on 127.0.0.1; the bench pulls it with retina over TCP, decodes every
# frame with libav and converts frames to RGB (at the service's 2 fps, then every frame), and
# prints frames/s decoded and the CPU of its own process. Usage: benches/live.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
seconds="${1:-20}"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
/usr/bin/python3 tools/rtsp_server.py --port "$port" > /tmp/lookout-rtsp-bench.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q READY /tmp/lookout-rtsp-bench.log && break; sleep 0.1; done
for path in h264-720p h264-720p-busy; do
  echo "== /$path"
  cargo bench -q -p ingest --bench live --locked -- "rtsp://127.0.0.1:$port/$path" "$seconds"
done
