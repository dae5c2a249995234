#!/usr/bin/env bash
# The test command: set up the environments if needed (scripts/setup.sh), then run the suite:
# everything in .venv (real `llamafactory-cli train` runs on a tiny offline Qwen2-VL, on CPU), and the
# Unsloth collator tests against unsloth_zoo 2025.3.17, 2025.9.5, 2025.10.13, 2025.11.6 and 2026.10.9 (one per era). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VLPATCH_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
VLPATCH_STRICT=llamafactory "$VENV/bin/python" -m pytest -ra "$@"
if [ "${VLPATCH_SKIP_UNSLOTH:-0}" != "1" ]; then
  for v in .venv-uz2503 .venv-uz2509 .venv-uz2510 .venv-uz2511 .venv-uz2610; do
    echo "== Unsloth collator tests in $v"
    VLPATCH_STRICT=unsloth_zoo "$v/bin/python" -m pytest -ra tests/test_unsloth_collator.py tests/test_core.py "$@"
  done
fi
