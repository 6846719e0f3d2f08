#!/bin/sh
# Build the example WASM modules next to their sources (needs: pip install ziglang).
set -eu
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x ../../.venv/bin/python ] && PYTHON=../../.venv/bin/python
fi
for src in *.c; do
    "$PYTHON" -m ziglang cc -target wasm32-wasi -O2 -s -o "${src%.c}.wasm" "$src"
    echo "built ${src%.c}.wasm"
done
