#!/usr/bin/env bash
# The test command: installs what is missing, runs every test of the workspace (real RTSP server,
# real WebRTC peers, real sockets), then the browser tests of the embedded web UI in headless
# chromium (screenshots in target/browser-artifacts/). Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
# The browser tests run the debug `lookout` binary the workspace tests built (a no-op check here:
# `cargo build -p ws-gateway` would resolve features without the dev-dependencies and rebuild
# some 50 crates for nothing).
cargo test --workspace --locked --no-run -q
node tests/browser/e2e.mjs
