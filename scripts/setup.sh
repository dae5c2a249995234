#!/usr/bin/env bash
# Set up the tools and the main environment. Idempotent: a second run only checks.
#   .venv-tools   nox, uv and PyYAML (pip, a few seconds): what runs the smoke sessions (noxfile.py)
#   .venv         the torch stack, LLaMA-Factory 0.9.5 (the session marked `demo: true` in
#                 sessions.yaml) and vlpatch itself, editable, with its test extras: installed by uv
# `--tools`: the tools only (scripts/test.sh; nox makes each session's environment under .nox/).
# VLPATCH_TORCH_SPEC replaces the torch stack (e.g. "torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=hardlink UV_COMPILE_BYTECODE=1
if ! .venv-tools/bin/python -c "import nox, uv, yaml" 2>/dev/null; then
  "$PY" -m venv .venv-tools
  .venv-tools/bin/python -m pip install -q "nox==2026.10.20" "uv==0.13.9" "pyyaml>=6" 2> >(grep -v "is ignored: it is neither" >&2)
fi
[ "${1:-}" = "--tools" ] && exit 0
mapfile -t reqs < <(.venv-tools/bin/python scripts/sessions.py requirements demo)
[ -x .venv/bin/python ] || .venv-tools/bin/uv venv -q -p "$PY" .venv
start=$(date +%s)
.venv-tools/bin/uv pip install -q --python .venv/bin/python "${reqs[@]}" -e ".[test]"
echo "setup: .venv ready in $(( $(date +%s) - start ))s ($(.venv/bin/python -c 'import importlib.metadata as m; print("llamafactory", m.version("llamafactory"), "| transformers", m.version("transformers"), "| torch", m.version("torch"))'))"
