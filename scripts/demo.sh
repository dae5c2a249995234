#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo on the bundled example: the real
# `llamafactory-cli train` on examples/data, vanilla then with VLPATCH=1. Output under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
VLPATCH_SKIP_UNSLOTH=1 bash scripts/setup.sh
exec "${VLPATCH_VENV:-.venv}/bin/python" examples/demo.py
