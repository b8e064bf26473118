#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what it needs.
#   bash scripts/setup.sh          runtime packages (requirements.txt)
#   bash scripts/setup.sh --dev    plus the test extras (requirements-dev.txt)
# torch is installed FIRST and pinned: a bare `torch` can pull a multi-GB CUDA build. To pick the
# CPU wheel from PyTorch's own index on your laptop, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  fi
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
python -m pip install -q -r "$req" 2>&1 | grep -v "^WARNING: Location" || true
# the package itself, editable (pyproject.toml): `import ldm_scratch` from anywhere, and the `ldm-scratch` command
if ! log=$(python -m pip install -q --no-deps -e . 2>&1); then echo "$log"; echo "pip install -e . failed"; exit 1; fi
python -c "import torch, numpy, matplotlib, einops, tqdm, skimage; print(f'environment ready: torch {torch.__version__}, {torch.get_num_threads()} threads')"
