#!/usr/bin/env bash
# The test command: set up .venv if needed (scripts/setup.sh), then run the whole pytest suite,
# including real `llamafactory-cli train` runs on a tiny offline Qwen2-VL, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VLPATCH_VENV:-.venv}"
export VLPATCH_STRICT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -ra "$@"
