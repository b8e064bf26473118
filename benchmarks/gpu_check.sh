#!/usr/bin/env bash
# One prepared GPU check (run on a machine with CUDA): the test suite with cuda visible, a short
# stage-1 learning-rate sweep on cuda in bf16 (step counts identical to the CPU demo, so the result
# transfers), and the autoencoder throughput on cuda. Logs go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi -L | tee "$OUT/machine.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee -a "$OUT/machine.txt"
timeout 120 python3 -m pytest -q -x tests --ignore=tests/test_notebooks.py --ignore=tests/test_unet.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
for lr in ${LRS:-2e-4 1e-3}; do
  timeout 75 python3 -m ldm_scratch train-autoencoder --preset small-f8 --data photos --image-size 64 \
    --steps 1500 --batch-size 16 --disc-start 1000 --lr "$lr" --precision bf16 --out "$OUT/ae_lr$lr" \
    --sample-every 100000 --ckpt-every 100000 2>&1 | tail -2
  python3 - "$OUT/ae_lr$lr/model" "$lr" <<'PY' | tee -a "$OUT/sweep.txt"
import sys, torch
from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.stage1 import evaluate_photo
m = AutoencoderKL.from_pretrained(sys.argv[1], map_location="cuda")
with torch.no_grad():
    for name in ("astronaut", "coffee"):
        print(f"lr {sys.argv[2]} {name}", {k: round(v, 3) for k, v in evaluate_photo(m, name).items()})
PY
done
timeout 45 python3 benchmarks/bench_autoencoder.py 2>&1 | tail -6 | tee "$OUT/bench.txt"
rm -rf "$OUT"/ae_lr*/checkpoint.pt
