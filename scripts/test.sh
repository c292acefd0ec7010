#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo test --workspace --locked "$@"
