#!/usr/bin/env bash
# The test command: the smoke suite in every session of compat_matrix.yaml (`smoke:`), each in its own
# environment (created if needed, as scripts/setup.sh does): LLaMA-Factory 0.9.1 (must be refused) to
# 0.9.5, one unsloth_zoo release per era plus the newest. Prints a table with the time each session
# took. Arguments before `--` select sessions (`python scripts/sessions.py list`), after it go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --bootstrap
exec .venv-torch/bin/python scripts/sessions.py test "$@"
