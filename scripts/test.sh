#!/usr/bin/env bash
# The test command: the smoke suite, one nox session per tested upstream release (sessions.yaml,
# `smoke:`, see noxfile.py): LLaMA-Factory 0.9.1 (must be refused) to 0.9.5, one unsloth_zoo release per
# era plus the newest. Each session's environment is made by uv under .nox/ (reused after). Prints a
# table with the time each session took. Arguments before `--` select sessions (a session, a distribution
# or `demo`; `python scripts/sessions.py list`), after it go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tools
exec .venv-tools/bin/python scripts/sessions.py test "$@"
