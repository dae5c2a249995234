#!/usr/bin/env bash
# Create (or reuse) the test environments. Idempotent: a second run only checks.
#   .venv-torch       torch, torchvision, torchaudio only (about 2 minutes and 4.7 GB, once)
#   .venv             LLaMA-Factory + vlpatch (the main environment, used by the demo)
#   .venv-uz2503      unsloth_zoo 2025.3.17 (first image taken inline in __call__) + transformers 4.49.0
#   .venv-uz2509      unsloth_zoo 2025.9.5 (first image in _extract_images_for_example) + transformers 4.57.1
#   .venv-uz2510      unsloth_zoo 2025.10.13 (first image in _extract_images_videos_for_example) + transformers 4.57.1
#   .venv-uz2511      unsloth_zoo 2025.11.6 (first image in _extract_images_videos_for_example; prompt/completion
#                     path reads the images column only without messages) + transformers 4.57.1
#   .venv-uz2610      unsloth_zoo 2026.10.9 (newest) + transformers 5.6.0
# Every environment sees .venv-torch's packages through a .pth file: one torch stack for all.
# VLPATCH_LF_VERSION / VLPATCH_TORCH_SPEC / VLPATCH_VENV change the main environment;
# VLPATCH_SKIP_UNSLOTH=1 leaves the unsloth environments out (the demo does not need them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLPATCH_VENV:-.venv}"
PY="${PYTHON:-python3}"
LF_VERSION="${VLPATCH_LF_VERSION:-0.9.5}"
TORCH_SPEC="${VLPATCH_TORCH_SPEC:-torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip install, quiet, with this machine's noise about local indexes filtered out of stderr; fails as pip fails
pip_q() { local venv=$1; shift; "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

TORCH_VENV="${VENV}-torch"
purelib() { "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

# make_env VENV STAMP_KEY PACKAGES...: create VENV on top of the shared torch stack, install once
make_env() {
  local venv=$1 key=$2; shift 2
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  (cd "$(purelib "$TORCH_VENV")" && pwd) > "$(purelib "$venv")/_vlpatch_torch_base.pth"
  local stamp="$venv/.vlpatch-setup-$(echo "$key" | tr ' =<>,' '_____')"
  if [ ! -f "$stamp" ]; then
    local start; start=$(date +%s)
    pip_q "$venv" "$@"
    touch "$stamp"
    echo "setup: $venv ($key) installed in $(( $(date +%s) - start ))s"
  fi
  pip_q "$venv" -e ".[test]"  # vlpatch itself, editable: the tests run this checkout
}

# torch, torchvision and torchaudio together (LLaMA-Factory >= 0.9.4 imports torchaudio at import time)
[ -x "$TORCH_VENV/bin/python" ] || "$PY" -m venv "$TORCH_VENV"
torch_stamp="$TORCH_VENV/.vlpatch-setup-$(echo "$TORCH_SPEC" | tr ' =<>,' '_____')"
if [ ! -f "$torch_stamp" ]; then
  start=$(date +%s)
  pip_q "$TORCH_VENV" $TORCH_SPEC
  touch "$torch_stamp"
  echo "setup: $TORCH_VENV ($TORCH_SPEC) installed in $(( $(date +%s) - start ))s"
fi
make_env "$VENV" "llamafactory $LF_VERSION $TORCH_SPEC" "llamafactory==$LF_VERSION"
"$VENV/bin/python" -c "import vlpatch, llamafactory, transformers, torch; print('setup:', '$VENV', 'vlpatch', vlpatch.__version__, '| llamafactory', llamafactory.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"

if [ "${VLPATCH_SKIP_UNSLOTH:-0}" != "1" ]; then
  make_env .venv-uz2503 "unsloth_zoo 2025.3.17" "unsloth_zoo==2025.3.17" "transformers==4.49.0" "trl==0.15.2" "datasets<3.3" "numpy<2" "pyarrow<20"
  make_env .venv-uz2509 "unsloth_zoo 2025.9.5" "unsloth_zoo==2025.9.5" "transformers==4.57.1" "trl==0.23.0" "datasets>=3.4.1,<4.0"
  make_env .venv-uz2510 "unsloth_zoo 2025.10.13" "unsloth_zoo==2025.10.13" "transformers==4.57.1" "trl==0.23.0" "datasets>=3.4.1,<4.0"
  make_env .venv-uz2511 "unsloth_zoo 2025.11.6" "unsloth_zoo==2025.11.6" "transformers==4.57.1" "trl==0.23.0" "datasets>=3.4.1,<4.0"
  make_env .venv-uz2610 "unsloth_zoo 2026.10.9" "unsloth_zoo==2026.10.9" "transformers==5.6.0" "datasets>=3.4.1,<4.0"
  for v in .venv-uz2503 .venv-uz2509 .venv-uz2510 .venv-uz2511 .venv-uz2610; do
    "$v/bin/python" -c "import importlib.metadata as m, torch; print('setup:', '$v', 'unsloth_zoo', m.version('unsloth_zoo'), '| transformers', m.version('transformers'), '| torch', torch.__version__)"
  done
fi
