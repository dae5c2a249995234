#!/usr/bin/env bash
# Create (or reuse) .venv with the torch stack, LLaMA-Factory and vlpatch. Idempotent: a second run
# only checks. Override the versions with VLPATCH_LF_VERSION / VLPATCH_TORCH_SPEC / VLPATCH_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLPATCH_VENV:-.venv}"
PY="${PYTHON:-python3}"
LF_VERSION="${VLPATCH_LF_VERSION:-0.9.5}"
TORCH_SPEC="${VLPATCH_TORCH_SPEC:-torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_q() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
stamp="$VENV/.vlpatch-setup-$(echo "$LF_VERSION $TORCH_SPEC" | tr ' =<>' '____')"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  # torch, torchvision and torchaudio together (LLaMA-Factory >= 0.9.4 imports torchaudio at import time)
  pip_q $TORCH_SPEC
  pip_q "llamafactory==$LF_VERSION"
  "$VENV/bin/python" -c "import torch, torchvision, torchaudio, llamafactory" >/dev/null
  touch "$stamp"
  echo "setup: torch stack + llamafactory $LF_VERSION installed in $(( $(date +%s) - start ))s"
fi
# vlpatch itself, every time (cheap): editable, so the tests run this checkout; installs vlpatch_autoenable.pth
pip_q -e ".[test]"
"$VENV/bin/python" -c "import vlpatch, llamafactory, transformers, torch; print('setup: vlpatch', vlpatch.__version__, '| llamafactory', llamafactory.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
