#!/usr/bin/env bash
# Alerts on this machine, with the tiny fixture model (random weights, CPU), Debian's mosquitto
# and a webhook receiver on 127.0.0.1:
#   1. N incidents (default 100): from the window's cut (its last frame in) to the alert
#      message, the webhook received and the MQTT notification received, p50/p99;
#   2. decode tokens per window with and without stop_when_decided (WINDOWS windows each,
#      default 20), on a choice of two long options.
# Usage: benches/alerts.sh [N] [WINDOWS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
n="${1:-100}"; windows="${2:-20}"
cargo build -q --release --locked -p ws-gateway --bin lookout
cargo bench -q --locked -p ws-gateway --bench alerts --no-run
. benches/common.sh
work=$(mktemp -d)
mqtt_port=$(free_port); http_port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mqtt_port" > "$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker=$!
target/release/lookout serve --model fixtures/models/tiny-tied --port "$http_port" --data-dir "$work/data" \
  --allow-private-webhooks --mqtt-url "mqtt://127.0.0.1:$mqtt_port" > "$work/lookout.log" 2>&1 &
lookout=$!
trap 'kill $broker $lookout 2>/dev/null || true; rm -rf "$work"' EXIT
wait_ready "$http_port"
upload=$(curl -s -F file=@fixtures/preprocess/clips/h264_25fps_480x270.mkv "http://127.0.0.1:$http_port/v1/uploads" |
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
export LOOKOUT_BASE="127.0.0.1:$http_port" LOOKOUT_MQTT_PORT=$mqtt_port LOOKOUT_UPLOAD=$upload
echo "== alert latency over $n incidents"
cargo bench -q --locked -p ws-gateway --bench alerts -- latency "$n"
echo "== decode tokens saved by stop_when_decided"
cargo bench -q --locked -p ws-gateway --bench alerts -- saved "$windows"
