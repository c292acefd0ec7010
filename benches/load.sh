#!/usr/bin/env bash
# Load: CLIENTS WebSocket clients (default 50) on one looped watch of the fixture clip with the
# tiny fixture model, STALLED of them (default 10) never reading, for SECONDS (default 60): the
# server's RSS, threads and file descriptors over time, tokens per reading client against the
# owner's, and how many stalled clients the server dropped (ws-gateway/benches/load.rs).
#
#   benches/load.sh [SECONDS] [CLIENTS] [STALLED]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
seconds="${1:-60}"; clients="${2:-50}"; stalled="${3:-10}"
cargo build -q --release --locked -p ws-gateway --bin lookout
cargo bench -q --locked -p ws-gateway --bench load --no-run
. benches/common.sh
work=$(mktemp -d)
port=$(free_port)
target/release/lookout serve --model fixtures/models/tiny-tied --port "$port" --data-dir "$work/data" \
  > "$work/lookout.log" 2>&1 &
lookout=$!
trap 'kill $lookout 2>/dev/null || true; rm -rf "$work"' EXIT
wait_ready "$port"
LOOKOUT_BASE="127.0.0.1:$port" LOOKOUT_PID=$lookout \
  cargo bench -q --locked -p ws-gateway --bench load -- "$seconds" "$clients" "$stalled"
