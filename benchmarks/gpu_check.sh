#!/usr/bin/env bash
# One prepared GPU check (run on a machine with CUDA): the test suite with cuda visible, the benchmark
# suite on cuda, and short latent trainings (U-Net and DiT, class-conditional MNIST-5k, bf16 autocast)
# with their step rate and conditional accuracy / classifier-FID. Logs go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
AE=${AE:-ldm_scratch/weights/ae_mnist_f4}
nvidia-smi -L | tee "$OUT/machine.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee -a "$OUT/machine.txt"
timeout ${TEST_S:-200} python3 -m pytest -q -x tests --ignore=tests/test_notebooks.py --ignore=tests/test_demo.py \
  -p no:cacheprovider 2>&1 | tail -12 | tee "$OUT/tests.txt"
for den in unet dit; do
  preset=$([ $den = unet ] && echo small-latent || echo dit-small-latent)
  start=$(date +%s.%N)
  timeout ${TRAIN_S:-100} python3 -m ldm_scratch train-diffusion --space latent --autoencoder "$AE" --data mnist5k \
    --conditioning class --denoiser $den --preset $preset --steps ${STEPS:-3000} --batch-size 64 --lr 5e-4 \
    --ema-decay 0.995 --eval-per-class 50 --sample-every 100000 --ckpt-every 100000 --out "$OUT/latent_$den" 2>&1 \
    | grep -v "it/s\|s/it" | tail -4
  echo "$den $preset: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s incl. encode + eval" | tee -a "$OUT/latent.txt"
  cat "$OUT/latent_$den/eval.json" 2>/dev/null | tee -a "$OUT/latent.txt"
  rm -rf "$OUT/latent_$den/checkpoint.pt" "$OUT/latent_$den/latents.pt"
done
timeout ${BENCH_S:-150} python3 -m ldm_scratch bench --device cuda --out "$OUT/bench" 2>&1 | tail -60 > "$OUT/bench_log.txt"
