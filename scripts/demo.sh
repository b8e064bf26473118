#!/usr/bin/env bash
# The main job, end to end on the shipped data: set up .venv, then `python -m ldm_scratch demo`.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ldm_scratch demo "$@"
