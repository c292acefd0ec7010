#!/usr/bin/env bash
# Several nodes on one PostgreSQL (Debian's, started by the bench in a temporary directory), with
# the tiny fixture model on CPU:
#   1. takeover: two nodes, four monitors; TRIES (default 10) times the busier node is killed
#      with SIGKILL: time until the other runs every monitor, p50 and max, against the lease
#      time LEASE_S (default 2);
#   2. writes: three nodes' stores write fenced events as fast as they can for SECONDS
#      (default 10): events per second into PostgreSQL;
#   3. history: EVENTS (default 1000000) events of one monitor; history queries through a
#      node's HTTP API (newest, time range, cursor, rare and common words), p50/p99.
# Usage: benches/cluster.sh [TRIES] [LEASE_S] [SECONDS] [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tries="${1:-10}"; lease="${2:-2}"; seconds="${3:-10}"; events="${4:-1000000}"
cargo build -q --release --locked -p ws-gateway --bin lookout
cargo bench -q --locked -p ws-gateway --bench cluster --no-run
export LOOKOUT_BIN="$PWD/target/release/lookout"
echo "== takeover after kill -9 ($tries tries, lease $lease s)"
cargo bench -q --locked -p ws-gateway --bench cluster -- takeover "$tries" "$lease"
echo "== event writes by three nodes ($seconds s)"
cargo bench -q --locked -p ws-gateway --bench cluster -- writes "$seconds"
echo "== history queries over $events events"
cargo bench -q --locked -p ws-gateway --bench cluster -- history "$events"
