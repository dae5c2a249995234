#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo on the bundled example: the real
# `llamafactory-cli train` on examples/data, vanilla then with VLPATCH=1. Output under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # .venv: torch, LLaMA-Factory 0.9.5 (the session marked `demo: true`), vlpatch
exec .venv/bin/python examples/demo.py
