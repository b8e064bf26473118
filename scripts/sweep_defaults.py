"""Choose the denoisers' training defaults by measurement (README "Training defaults").

One run trains a class-conditional latent denoiser on the shipped `mnist-f4` latents with one optimiser
setting (lr, betas, lr warm-up) and keeps several weight averages side by side, so every EMA variant is
scored on the very same training trajectory:

    raw            the trained weights themselves
    fixed-0.999    decay 0.999 from step 0 (the old default: 9% of the initial weights left after 2,400 steps)
    fixed-0.995    decay 0.995 from step 0
    warmup-0.999   decay min(0.999, (1 + n) / (10 + n))   (ema.py)
    warmup-0.9999  decay min(0.9999, (1 + n) / (10 + n))  (the new default)

At each snapshot step (two run lengths by default) every average is scored on 50 samples per digit at
guidance 3 with deterministic DDIM at 8 and 50 steps (and, with --eta1, stochastic DDIM at 50): conditional
accuracy and classifier-FID (metrics.py's MNIST classifier), and the same samples' Frechet distance under a
second, independent network (metrics.second_eye_distance), each beside its real-vs-real floor at n = 500.

    python scripts/sweep_defaults.py --denoiser unet --lr 5e-4 --out runs/sweep/unet_lr5e-4
    python scripts/sweep_defaults.py --denoiser dit --preset dit-small-latent --lr 3e-3 --out runs/sweep/dit_lr3e-3

Writes OUT/sweep.json (one row per snapshot x average x sampler), prints a table, and saves the default
average's pipeline as OUT/pipeline. Step counts, not
minutes, are what the runs share: lr, betas and the averages do not change the time a step takes, so equal
steps are equal wall time (the README converts steps to minutes at the idle-machine step time).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_scratch.__main__ import build_parser
from ldm_scratch.cli.stage3 import prepare_latent
from ldm_scratch.ema import EMA
from ldm_scratch.metrics import real_vs_real_fid, second_eye_distance
from ldm_scratch.stage2 import eval_labels, reference_digits, score_digits
from ldm_scratch.train import Trainer

AVERAGES = {"fixed-0.999": (0.999, False), "fixed-0.995": (0.995, False),
            "warmup-0.999": (0.999, True), "warmup-0.9999": (0.9999, True)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--denoiser", choices=("unet", "dit"), default="unet")
    p.add_argument("--preset", default=None, help="default: text-latent (unet) or dit-small-latent (dit)")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--snapshots", type=int, nargs="+", default=(1000, 3000), help="steps at which to score")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eta1", action="store_true", help="also score stochastic DDIM (eta 1) at 50 steps")
    p.add_argument("--averages", nargs="+", default=["raw", *AVERAGES], choices=["raw", *AVERAGES])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p.parse_args()


def main() -> None:
    a = parse()
    preset = a.preset or {"unet": "text-latent", "dit": "dit-small-latent"}[a.denoiser]
    steps = max(a.snapshots)
    argv = ["train-diffusion", "--space", "latent", "--autoencoder", "ldm_scratch/weights/ae_mnist_f4",
            "--data", "mnist5k", "--conditioning", "class", "--denoiser", a.denoiser, "--preset", preset,
            "--steps", str(steps), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--betas", *map(str, a.betas), "--lr-warmup-steps", str(a.lr_warmup_steps),
            "--weight-decay", str(a.weight_decay), "--ema-decay", "0",  # the averages live here, not in the Trainer
            "--sample-every", "0", "--ckpt-every", "0", "--seed", str(a.seed), "--out", a.out]
    task, train_cfg, data = prepare_latent(build_parser().parse_args(argv))
    averages = {k: EMA(task.ema_group, *AVERAGES[k]) for k in a.averages if k != "raw"}
    labels = eval_labels(a.per_class)
    samplers = [("ddim", 8, 0.0), ("ddim", 50, 0.0)] + ([("ddim", 50, 1.0)] if a.eta1 else [])
    n = len(labels)
    floors = {"fid_real_vs_real": real_vs_real_fid(n), "eye_real_vs_real": real_vs_real_fid(n, eye=second_eye_distance)}
    rows: list[dict] = []
    out = Path(a.out)
    train_time = [0.0]

    def score(step: int) -> None:
        pipe = task.pipeline
        for name in a.averages:
            if name != "raw":
                averages[name].swap(task.ema_group)
            try:
                for sampler, k, eta in samplers:
                    start = time.time()
                    x = pipe(class_labels=labels, num_inference_steps=k, guidance_scale=a.guidance, sampler=sampler,
                             eta=eta, output_type="tensor", generator=torch.Generator().manual_seed(a.seed)).images
                    row = {"step": step, "average": name, "sampler": f"{sampler}-{k} eta {eta:g}",
                           **score_digits(x, labels), "eye": second_eye_distance(x, reference_digits(n)), **floors,
                           "sample_s": time.time() - start, "train_min": train_time[0] / 60}
                    rows.append(row)
                    print(f"step {step:5d} {name:14s} {row['sampler']:16s} acc {row['cond_acc']:.3f} "
                          f"FID {row['fid']:7.1f} (floor {floors['fid_real_vs_real']:.1f}) "
                          f"eye {row['eye']:7.2f} (floor {floors['eye_real_vs_real']:.2f})", flush=True)
            finally:
                if name != "raw":
                    averages[name].swap(task.ema_group)
        task.ema_group.train()
        (out / "sweep.json").write_text(json.dumps({"args": vars(a), "preset": preset, "rows": rows}, indent=1))

    class SweepTrainer(Trainer):
        def train_step(self, batch):  # the Trainer's step, then every average, then (maybe) a score
            start = time.time()
            logs = super().train_step(batch)
            for ema in averages.values():
                ema.update(task.ema_group)
            train_time[0] += time.time() - start
            if self.step + 1 in a.snapshots:  # self.step counts the steps done before this one
                rng = torch.get_rng_state()
                score(self.step + 1)
                torch.set_rng_state(rng)
            return logs

    SweepTrainer(task, train_cfg, data, out).fit()
    if "warmup-0.9999" in averages:  # the default average's pipeline, for scripts/sampler_steps.py
        folder = task.finish(out, averages["warmup-0.9999"], step=steps, grid=False)
        print(f"saved {folder} (the default average, warmup-0.9999)")


if __name__ == "__main__":
    main()
