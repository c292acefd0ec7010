#!/usr/bin/env bash
# Installs what building and testing Lookout needs on a Debian bookworm machine.
# Idempotent: when everything is present it only checks and returns (a second or two).
set -euo pipefail

packages=(
  pkg-config clang libclang-dev
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev libswresample-dev
  ffmpeg
  # Live-source tests: GStreamer's RTSP server (driven from Python) and a real browser.
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
  chromium
  # Alert tests: a real MQTT broker (started by the tests on a free port, not as a service).
  mosquitto
  # Several-node tests: a real PostgreSQL server (started by the tests in a temporary directory
  # on a free port, not as a service).
  postgresql
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
  done
  # The wire types (and later the web UI) compile for the browser.
  rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$' ||
    rustup target add wasm32-unknown-unknown >/dev/null
fi

# The web UI: wasm-bindgen-cli pinned to the frontend's wasm-bindgen (see frontend/Cargo.toml).
WASM_BINDGEN_VERSION=0.2.130
if ! wasm-bindgen --version 2>/dev/null | grep -q " $WASM_BINDGEN_VERSION$"; then
  echo "setup: installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes, once)" >&2
  cargo install -q wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
fi

# Browser tests: playwright-core drives Debian's chromium (no browser download).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v npm >/dev/null 2>&1; then
  if [ ! -d "$root/tests/browser/node_modules/playwright-core" ]; then
    (cd "$root/tests/browser" && npm ci --no-audit --no-fund --silent)
  fi
else
  echo "setup: npm not found; the browser tests need Node.js and npm" >&2
fi

# API tests with the OpenAI Python SDK: a pinned virtual environment (made once).
sdk=${LOOKOUT_SDK_VENV:-/opt/lookout-sdk}
if ! cmp -s "$root/tools/sdk/requirements.txt" "$sdk/.lookout-requirements" 2>/dev/null; then
  echo "setup: installing the OpenAI Python SDK into $sdk" >&2
  python3 -m venv "$sdk"
  "$sdk/bin/pip" install -q --disable-pip-version-check -r "$root/tools/sdk/requirements.txt"
  cp "$root/tools/sdk/requirements.txt" "$sdk/.lookout-requirements"
fi
