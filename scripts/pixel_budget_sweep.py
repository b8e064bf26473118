"""Which pixel U-Net, batch and learning rate give notebook 04's class-conditional DDPM the best digits per
wall-minute?

Notebook 04 trains a pixel-space U-Net on MNIST-5k to a time budget with a step ceiling. On a CPU with native
bf16 the budget buys its steps; on one without (AVX2-only laptops, fp32) a step of the `small` preset at batch 64
takes about 2 s on 2 cores, and the budget buys a fraction of them. This script trains notebook 04's model
(T = 1000, condition dropout 0.1, EMA decay 0.99, seed 0) once per configuration for the same wall time and scores
each the way the notebook's table does: DDIM 30 at w = 3, conditional accuracy and classifier-FID beside the
real-vs-real floor at the same n.

    OMP_NUM_THREADS=2 python scripts/pixel_budget_sweep.py --minutes 3 --out runs/pixel_budget \
        --configs ch32/b64/lr1e-3 ch32/b32/lr1e-3 ch16/b64/lr2e-3

A configuration is ch<width>/b<batch>/lr<rate>: the `small` preset at that base width (norm groups 8).
Writes OUT/sweep.json and prints a table. One process, one run after the other; quote idle-machine times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from ldm_scratch.config import UNET_PRESETS, DiffusionConfig, get_preset
from ldm_scratch.data import MNIST5k
from ldm_scratch.device import default_device, describe_machine, resolve_precision
from ldm_scratch.evaluation import evaluate
from ldm_scratch.metrics import load_classifier
from ldm_scratch.stage2 import DiffusionTask, diffusion_train_config
from ldm_scratch.train import Trainer

SEED = 0
CONFIG = re.compile(r"ch(\d+)/b(\d+)/lr([0-9.e-]+)$")


def parse(text: str) -> tuple[int, int, float]:
    m = CONFIG.match(text)
    if not m:
        raise SystemExit(f"bad configuration {text!r}: write ch<width>/b<batch>/lr<rate>, e.g. ch32/b64/lr1e-3")
    return int(m[1]), int(m[2]), float(m[3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--minutes", type=float, default=3.0, help="wall-time budget of each run")
    p.add_argument("--steps", type=int, default=5000, help="step ceiling of each run")
    p.add_argument("--per-class", type=int, default=20, help="samples per digit in the score")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    configs = [parse(c) for c in args.configs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = default_device()
    precision = resolve_precision("auto", device)
    print(describe_machine(device), flush=True)
    train = MNIST5k("train")
    classifier = load_classifier()

    rows = []
    for ch, batch, lr in configs:
        ucfg = dataclasses.replace(get_preset(UNET_PRESETS, "small"), num_classes=10, ch=ch, norm_groups=8)
        torch.manual_seed(SEED)
        task = DiffusionTask(ucfg, DiffusionConfig(num_timesteps=1000), p_uncond=0.1, seed=SEED, guidance_scale=3.0,
                             precision=precision)
        cfg = diffusion_train_config(steps=args.steps, batch_size=batch, lr=lr, ema_decay=0.99, seed=SEED,
                                     precision=precision, sample_every=0, ckpt_every=0, max_minutes=args.minutes)
        trainer = Trainer(task, cfg, train, out / f"ch{ch}_b{batch}_lr{lr:g}")
        t0 = time.time()
        history = trainer.fit()
        minutes = (time.time() - t0) / 60
        trainer.ema.swap(task.ema_module())  # sample with the EMA weights
        unet = task.unet.to(device).eval()
        t0 = time.time()
        r = evaluate(unet, task.diffusion, args.per_class, num_steps=30, guidance_scale=3.0, precision=precision,
                     generator=torch.Generator().manual_seed(SEED), classifier=classifier)
        row = {"ch": ch, "batch": batch, "lr": lr, "params": unet.num_params(), "steps": trainer.step,
               "minutes": round(minutes, 2), "s_per_step": round(60 * minutes / trainer.step, 3),
               "loss_last50": float(np.mean([h["model_loss"] for h in history[-50:]])),
               "cond_acc": r["cond_acc"], "fid": r["fid"], "fid_floor": r["fid_real_vs_real"],
               "eval_s": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "sweep.json").write_text(json.dumps({"machine": describe_machine(device), "rows": rows}, indent=1))

    print(f"\n{'config':>18} {'params':>9} {'steps':>6} {'s/step':>7} {'loss':>7} {'acc':>6} {'FID':>7} {'floor':>6} "
          f"{'eval s':>7}")
    for r in rows:
        print(f"{'ch%d/b%d/lr%g' % (r['ch'], r['batch'], r['lr']):>18} {r['params']:>9,d} {r['steps']:>6} "
              f"{r['s_per_step']:>7.3f} {r['loss_last50']:>7.4f} {r['cond_acc']:>6.3f} {r['fid']:>7.1f} "
              f"{r['fid_floor']:>6.1f} {r['eval_s']:>7.1f}")


if __name__ == "__main__":
    main()
