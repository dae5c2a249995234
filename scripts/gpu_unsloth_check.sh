#!/usr/bin/env bash
# The GPU check on a device machine: installs the wheels carried in .whl/ (git-ignored, downloaded beforehand
# for CPython 3.12 manylinux x86_64) into a scratch target directory, then runs the `gpu` tests:
# `python -m pytest -m gpu tests/test_gpu_unsloth.py` (each stage in its own process: scripts/gpu_unsloth_check.py).
# torchvision (.whl/opt/) is installed only where it does not import already, and so are pytest and what it
# needs (.whl/opt/: pytest, pluggy, iniconfig).
# Output: stdout, and $OUT (install.txt, log.txt, and what the test writes: environment.txt, <stage>.log,
# result_<stage>.json, vlpatch_report*.jsonl, summary.json, summary.txt).
# unsloth's FastVisionModel needs bitsandbytes even for 16-bit LoRA. Its wheel (43 MB, a library per CUDA
# release) and unsloth's (29 MB, with its web UI) do not fit beside the others in one device call (64 MiB):
# `python3 scripts/gpu_slim_wheels.py .whl .whlgpu` (and `.whl2 .whlgpu` for bitsandbytes) writes copies
# with only the CUDA 13.0 library and without the UI, 18 MB in all; then GPU_CHECK_WHEELS=.whlgpu.
# Without bitsandbytes the stages fall back to a plain transformers model with peft LoRA (still unsloth's
# trainer and collator) and the qlora stage is skipped.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/out/gpu_unsloth_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
{
  echo "== install $(date +%T): $WHEELS -> $SITE ($("$PY" -V 2>&1), $(command -v "$PY"))"
  wheels=("$WHEELS"/*.whl)
  if "$PY" -c "import torchvision" 2>/dev/null; then
    echo "torchvision already importable: $("$PY" -c 'import torchvision; print(torchvision.__version__, torchvision.__file__)' 2>&1)"
  else
    echo "torchvision does not import here: adding the carried wheel"
    wheels+=("$WHEELS"/opt/torchvision-*.whl)
  fi
  if "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest already importable: $("$PY" -c 'import pytest; print(pytest.__version__, pytest.__file__)' 2>&1)"
  else
    echo "pytest does not import here: adding the carried wheels"
    wheels+=("$WHEELS"/opt/pytest-*.whl "$WHEELS"/opt/pluggy-*.whl "$WHEELS"/opt/iniconfig-*.whl)
  fi
  "$PY" - "${wheels[@]}" <<'EOF'
import importlib.metadata as md, os, sys
for w in sys.argv[1:]:
    name = os.path.basename(w).split("-")[0]
    try:
        print(f"  NOTE: carried {os.path.basename(w)} shadows the installed {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {os.path.basename(w)} ({os.path.getsize(w) // 1024} KiB)")
EOF
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"; then
    echo "pip install failed: unpacking the wheels with zipfile instead"
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" "${wheels[@]}"
  fi
  echo "== installed $(date +%T): $(ls "$SITE" | grep -c dist-info) distributions in $SITE"
} 2>&1 | tee "$OUT/install.txt"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
TIMEOUT="${GPU_CHECK_TIMEOUT:-450}"
export GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-$((TIMEOUT - 30))}"  # the test stops starting stages before the kill
PYTHONUNBUFFERED=1 timeout -k 10 "$TIMEOUT" "$PY" -m pytest -m gpu tests/test_gpu_unsloth.py -v -s -rs -p no:cacheprovider \
  2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt" 2>/dev/null || echo "no summary written"
exit "$rc"
