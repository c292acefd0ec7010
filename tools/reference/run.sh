#!/usr/bin/env bash
# Runs a reference script in a pinned virtual environment (made on first use under $LOOKOUT_REF_VENV).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${LOOKOUT_REF_VENV:-/opt/lookout-ref}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! cmp -s "$here/requirements.txt" "$venv/.lookout-requirements"; then
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/.lookout-requirements"
fi
script=$1; shift
if [ "$script" = "-" ]; then
  exec "$venv/bin/python" - "$@"
fi
exec "$venv/bin/python" "$here/$script" "$@"
