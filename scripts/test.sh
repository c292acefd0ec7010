#!/usr/bin/env bash
# The test command: installs what is missing, runs every test of the workspace (real RTSP server,
# real WebRTC peers, real sockets), then the browser tests of the embedded web UI in headless
# chromium (screenshots in target/browser-artifacts/). Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
# The browser tests run the debug `lookout` binary the workspace tests built.
cargo build -p ws-gateway --bin lookout --locked
node tests/browser/e2e.mjs
