"""Stage-2 commands: `train-diffusion` (a class-conditional pixel DDPM, Ho et al. 2020, with
classifier-free guidance, Ho & Salimans 2022) and `sample` (a PNG grid from a saved model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ldm_scratch.cli import Command
from ldm_scratch.cli.flags import CHOICES, add_config_flags, apply_flags, build_data
from ldm_scratch.config import UNET_PRESETS, DiffusionConfig, TrainConfig, UNetConfig, get_preset
from ldm_scratch.device import default_device
from ldm_scratch.stage2 import SAMPLERS, SPACES


# ----------------------------------------------------------------------------- train-diffusion, sample
# The U-Net presets built for 1 x 32 x 32 pixels (the "-latent" ones expect the autoencoder's latents).
PIXEL_PRESETS = ("tiny", "small")


def add_train_diffusion(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", choices=SPACES, default="pixel",
                   help="pixel: a DDPM on the images themselves (latent: stage 3)")
    p.add_argument("--data", choices=("mnist5k",), default="mnist5k")
    p.add_argument("--image-size", type=int, default=None, help="padded size of the digits (default 32)")
    p.add_argument("--preset", choices=PIXEL_PRESETS, default="tiny")
    p.add_argument("--p-uncond", type=float, default=0.1, help="condition dropout, for classifier-free guidance")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="for the sample grids and the evaluation")
    p.add_argument("--sample-steps", type=int, default=30, help="DDIM steps of the sample grids")
    p.add_argument("--eval-per-class", type=int, default=0,
                   help=">0: after training, score 10 x K samples (conditional accuracy, classifier-FID)")
    p.add_argument("--out", default="runs/diffusion", help="run folder: checkpoint, logs, grids, model/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    for cls in (UNetConfig, DiffusionConfig, TrainConfig):
        add_config_flags(p, cls)


def train_diffusion(args: argparse.Namespace) -> dict:
    """Train a class-conditional pixel DDPM and save OUT/model/ (EMA weights); returns a summary."""
    from ldm_scratch.stage2 import DiffusionTask, diffusion_train_config, evaluate, load_diffusion_model
    from ldm_scratch.train import Trainer
    if args.space != "pixel":
        raise ValueError("--space latent arrives with stage 3 (it denoises a trained autoencoder's latents); "
                         "valid for now: --space pixel")
    train_cfg = apply_flags(diffusion_train_config(), args)  # Adam betas (0.9, 0.999) unless --betas
    data = build_data(args.data, args.image_size, train_cfg.seed)
    x, _ = data[0]
    n_classes = int(data.labels.max()) + 1
    # The data decides the channels, the size and (unless --num-classes 0: unconditional) the classes.
    unet_cfg = dataclasses.replace(apply_flags(get_preset(UNET_PRESETS, args.preset, "U-Net"), args),
                                   in_channels=x.shape[0], out_channels=x.shape[0], sample_size=x.shape[-1],
                                   num_classes=n_classes if args.num_classes is None else args.num_classes)
    if unet_cfg.num_classes not in (0, n_classes):
        raise ValueError(f"--num-classes must be 0 (unconditional) or {n_classes} (the classes of {args.data}); "
                         f"got {unet_cfg.num_classes}")
    torch.manual_seed(train_cfg.seed)  # the initial weights, too, follow from --seed
    task = DiffusionTask(unet_cfg, apply_flags(DiffusionConfig(), args), p_uncond=args.p_uncond,
                         seed=train_cfg.seed, guidance_scale=args.guidance_scale, precision=train_cfg.precision,
                         sample_steps=args.sample_steps)
    trainer = Trainer(task, train_cfg, data, args.out)
    start = time.time()
    trainer.fit(resume=args.resume)
    summary: dict[str, Any] = {"steps": trainer.step, "minutes": (time.time() - start) / 60,
                               "precision": trainer.precision, "params": task.unet.num_params()}
    if trainer.stopped == "interrupted" or not trainer.is_main:
        return summary
    folder = task.finish(args.out, trainer.ema, step=trainer.step)
    print(f"saved {folder} ({'EMA' if trainer.ema else 'raw'} weights) after {trainer.step} steps "
          f"({summary['minutes']:.1f} min); grid: {Path(args.out) / 'samples' / 'final.png'}")
    if args.eval_per_class > 0:
        unet, diffusion, _ = load_diffusion_model(folder, trainer.device)
        res = evaluate(unet, diffusion, args.eval_per_class, args.sample_steps, args.guidance_scale,
                       torch.Generator(trainer.device).manual_seed(train_cfg.seed), precision=trainer.precision)
        print(f"conditional accuracy {res['cond_acc']:.3f}; classifier-FID {res['fid']:.2f} "
              f"(real vs real at n={res['n']}: {res['fid_real_vs_real']:.2f})")
        (Path(args.out) / "eval.json").write_text(json.dumps({**summary, **res}, indent=2) + "\n")
        summary.update(res)
    return summary


def add_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model folder (OUT/model from train-diffusion)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class-labels", type=int, nargs="+", default=None, help="one sample per label: 0 1 2 7")
    which.add_argument("--n-per-class", type=int, default=8, help="K samples of every class, a row each (default 8)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (DDPM always takes all T)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance-scale", type=float, default=None, help="1 = none (default: the model's saved value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=CHOICES["precision"], default="auto")
    p.add_argument("--out", default="samples.png", help="the PNG grid to write")


def sample(args: argparse.Namespace) -> Path:
    """Load a pixel model folder, sample a grid (a row per class, or the asked labels) and save it."""
    from ldm_scratch.stage2 import generate, load_diffusion_model
    from ldm_scratch.train import save_image_grid
    unet, diffusion, meta = load_diffusion_model(args.model, default_device())
    if meta["space"] != "pixel":
        raise ValueError(f"{args.model} is a {meta['space']} model; sample it through its latent pipeline")
    k = unet.cfg.num_classes
    if args.class_labels is not None:
        bad = [c for c in args.class_labels if not 0 <= c < k]
        if bad:
            raise ValueError(f"--class-labels {bad} out of range; valid labels: "
                             f"{f'0..{k - 1}' if k else 'none (unconditional model: use --n-per-class)'}")
        labels, row = torch.tensor(args.class_labels), 10
    elif args.n_per_class < 1:
        raise ValueError(f"--n-per-class must be >= 1; got {args.n_per_class}")
    else:
        labels = torch.arange(k).repeat_interleave(args.n_per_class) if k else args.n_per_class
        row = args.n_per_class
    w = 1.0 if not k else meta.get("guidance_scale", 1.0) if args.guidance_scale is None else args.guidance_scale
    device = next(unet.parameters()).device
    x = generate(unet, diffusion, labels, num_steps=args.steps, guidance_scale=w, sampler=args.sampler,
                 eta=args.eta, generator=torch.Generator(device).manual_seed(args.seed),
                 precision=args.precision, progress=True)
    steps = diffusion.T if args.sampler == "ddpm" else args.steps
    save_image_grid(list(x.split(row)), args.out,  # (N, C, H, W) -> rows of `row` images
                    title=f"{args.sampler} {steps} steps, guidance {w:g}, seed {args.seed}")
    print(f"wrote {args.out}")
    return Path(args.out)


# A new stage-2 command (latent training, text-to-image sampling) is one more entry here.
COMMANDS: dict[str, Command] = {
    "train-diffusion": (add_train_diffusion, train_diffusion, "train stage 2 in pixel space (class-conditional DDPM)"),
    "sample": (add_sample, sample, "sample a PNG grid from a saved diffusion model"),
}
