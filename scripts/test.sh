#!/usr/bin/env bash
# The test suite: set up .venv with the test extras, then run pytest (notebooks run in quick mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export LDM_QUICK=1 MPLBACKEND=Agg PYTHONHASHSEED=0
# One pytest worker per core (pytest-xdist), each with ONE torch thread: most tests are small, Python-bound ops
# that a second thread does not speed up, and two threads per process on a shared core busy-wait. On 2 cores
# this took the suite from 21.3 to 14.1 min. LDM_TEST_WORKERS=1 runs it in one process (torch's threads).
cores=$(nproc 2>/dev/null || echo 1)
workers=${LDM_TEST_WORKERS:-$(( cores < 8 ? cores : 8 ))}
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS=1
  # --maxschedchunk 1: each worker is handed the next test when it is nearly idle (a chunk would tie a run of
  # tests to one worker); tests/conftest.py puts the longest ones first, so the workers finish together
  exec .venv/bin/python -m pytest -q -n "$workers" --dist load --maxschedchunk 1 tests "$@"
fi
exec .venv/bin/python -m pytest -q tests "$@"
