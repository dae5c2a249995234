#!/usr/bin/env bash
# Create (or reuse) the environments of the smoke sessions named in compat_matrix.yaml (`smoke:`).
# Idempotent: a second run only checks. Arguments: session names, a distribution, or `demo`
# (`python scripts/sessions.py list` shows them); none: every session.
#   .venv-torch   torch, torchvision, torchaudio only (about 2 minutes and 4.7 GB, once), shared by
#                 every other environment through a .pth file
#   .venv         LLaMA-Factory 0.9.5 + vlpatch: the main environment, used by the demo
#   .venv-lf09N   LLaMA-Factory 0.9.N, .venv-uzYYMM one unsloth_zoo release per era (see the matrix)
# VLPATCH_TORCH_SPEC replaces the torch stack (e.g. "torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv-torch/bin/python ] || "$PY" -m venv .venv-torch
# the session runner reads the matrix with PyYAML
.venv-torch/bin/python -c "import yaml" 2>/dev/null || .venv-torch/bin/python -m pip install -q pyyaml 2> >(grep -v "is ignored: it is neither" >&2)
[ "${1:-}" = "--bootstrap" ] && exit 0  # scripts/test.sh: the runner sets up each session itself
exec .venv-torch/bin/python scripts/sessions.py setup "$@"
