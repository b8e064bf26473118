#!/usr/bin/env bash
# The test suite: set up .venv with the test extras, then run pytest (notebooks run in quick mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export LDM_QUICK=1 MPLBACKEND=Agg PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q tests "$@"
