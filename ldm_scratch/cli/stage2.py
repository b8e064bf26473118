"""Stage-2 commands: `train-diffusion` (a class-conditional pixel DDPM, Ho et al. 2020, with
classifier-free guidance, Ho & Salimans 2022) and `sample` (a PNG grid from a saved model).

Both also take the latent models: `--space latent` and a pipeline folder go to stage3.py, so one
command covers both spaces and the pixel path reads as it always did.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ldm_scratch.cli import Command
from ldm_scratch.cli import stage3
from ldm_scratch.cli.flags import CHOICES, add_config_flags, apply_flags, build_data
from ldm_scratch.config import DIT_PRESETS, UNET_PRESETS, DiffusionConfig, TrainConfig, UNetConfig, get_preset
from ldm_scratch.device import default_device
from ldm_scratch.flow import SAMPLERS as FLOW_SAMPLERS
from ldm_scratch.stage2 import SAMPLERS, SPACES


# ----------------------------------------------------------------------------- train-diffusion, sample
# The U-Net presets built for 1 x 32 x 32 pixels (the "-latent" ones expect the autoencoder's latents).
PIXEL_PRESETS = ("tiny", "small")


def add_train_diffusion(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", choices=SPACES, default="pixel",
                   help="pixel: a DDPM on the images themselves; latent: on an autoencoder's latents (--autoencoder)")
    p.add_argument("--data", choices=stage3.LATENT_DATA, default="mnist5k",
                   help="mnist5k (1 x 32 x 32 digits) or colored (3 x 32 x 32 captioned digits; --space latent)")
    p.add_argument("--image-size", type=int, default=None, help="pixel: padded size of the digits (default 32)")
    p.add_argument("--preset", choices=sorted({*PIXEL_PRESETS, *UNET_PRESETS, *DIT_PRESETS}), default=None,
                   help="default: tiny (pixel), tiny-latent (--denoiser unet) or dit-tiny (--denoiser dit)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="condition dropout, for classifier-free guidance")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="for the sample grids and the evaluation")
    p.add_argument("--sample-steps", type=int, default=30, help="DDIM steps of the sample grids")
    p.add_argument("--eval-per-class", type=int, default=0,
                   help=">0: after training, score 10 x K samples (class: conditional accuracy, classifier-FID; "
                        "text: prompt adherence on 10 x K held-out captions) -> OUT/eval.json")
    p.add_argument("--out", default="runs/diffusion", help="run folder: checkpoint, logs, grids, model/ or pipeline/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    stage3.add_latent_arguments(p)
    for cls in (UNetConfig, DiffusionConfig, TrainConfig):
        add_config_flags(p, cls)


def train_diffusion(args: argparse.Namespace) -> dict:
    """Train a class-conditional pixel DDPM and save OUT/model/ (EMA weights); returns a summary.
    --space latent: stage3.train_latent (OUT/pipeline/)."""
    from ldm_scratch.stage2 import DiffusionTask, diffusion_train_config, evaluate, load_diffusion_model
    from ldm_scratch.train import Trainer
    if args.space == "latent":
        return stage3.train_latent(args)
    latent_only = [f for f, v in (("--autoencoder", args.autoencoder), ("--conditioning", args.conditioning),
                                  ("--denoiser dit", args.denoiser == "dit"), ("--data colored", args.data != "mnist5k"))
                   if v]
    if latent_only:
        raise ValueError(f"{', '.join(latent_only)}: for --space latent (pixel space is the class-conditional "
                         "U-Net on mnist5k; unconditional: --num-classes 0)")
    stage3.check_denoiser_flags(args, "unet")
    if args.preset not in (None, *PIXEL_PRESETS):
        raise ValueError(f"--preset {args.preset} is a latent preset; pixel presets: {', '.join(PIXEL_PRESETS)}")
    args.preset = args.preset or PIXEL_PRESETS[0]
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
    p.add_argument("--model", required=True,
                   help="OUT/pipeline (a latent pipeline, model_index.json) or OUT/model (a pixel model)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt", nargs="+", default=None, help='text pipelines: one row per prompt, e.g. '
                                                                 '"a red 7 on grass" "a blue 1 on plain"')
    which.add_argument("--class-labels", type=int, nargs="+", default=None,
                       help="class models: a row per label (pixel models: one sample per label): 0 1 2 7")
    p.add_argument("--num-images", "--n-per-class", dest="num_images", type=int, default=None,
                   help="images per prompt or label, a row each (default 8; pixel with --class-labels: 1)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (DDPM always takes all T)")
    p.add_argument("--sampler", choices=(*SAMPLERS, *FLOW_SAMPLERS), default=None,
                   help="default: the model's first (ddim for DDPM models, euler for flow pipelines)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--shift", type=float, default=None,
                   help="flow pipelines: the timestep shift at sampling (SD3 Sec. 5.3.2), 1 = none, > 1 spends more "
                        "steps at high noise (default: the one saved with the model)")
    p.add_argument("--guidance-scale", "--guidance", type=float, default=None,
                   help="1 = none (default: the model's saved value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=CHOICES["precision"], default="auto")
    p.add_argument("--out", default="samples.png", help="the PNG grid to write")


# The seeds torch.Generator.manual_seed takes: an unsigned 64-bit integer.
MAX_SEED = 2 ** 64 - 1


def check_sample_flags(args: argparse.Namespace) -> None:
    """Every numeric flag of `sample`, checked once, before a model is loaded: one line naming the flag, what it
    takes and what it got. argparse has already refused a wrong type ("--steps two"); these are wrong values.
    The bound that needs the model (--steps <= its T) is stage3.check_steps, after loading."""
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1 (images per prompt or label); got {args.num_images}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1 (DDIM steps); got {args.steps}")
    w = args.guidance_scale
    if w is not None and not (math.isfinite(w) and w >= 0):  # NaN fails every comparison, hence isfinite first
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (1 = no guidance); got {w}")
    if not 0 <= args.eta <= 1:  # NaN is outside too
        raise ValueError(f"--eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM's variance); got {args.eta}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in 0..2^64-1; got {args.seed}")
    shift = getattr(args, "shift", None)
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"--shift must be a finite number > 0 (1 = no shift; SD3 uses 3.0); got {shift}")


def model_folder_kind(folder: str) -> str:
    """--model -> "pipeline" (model_index.json) or "model" (config.json + model.pt); anything else is a
    ValueError saying what the folder is and what was expected, before any file is read."""
    path = Path(folder)
    if not path.exists():
        raise ValueError(f"--model {folder}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--model {folder} is a file; expected a folder (OUT/pipeline or OUT/model)")
    if stage3.is_pipeline(path):
        return "pipeline"
    if (path / "config.json").is_file() and (path / "model.pt").is_file():
        return "model"
    inside = [sub for sub in ("pipeline", "model") if (path / sub).is_dir()]  # a run folder given for its output
    hint = f" (did you mean {path / inside[0]}?)" if inside else ""
    raise ValueError(f"--model {folder} is neither a pipeline folder (model_index.json) nor a model folder "
                     f"(config.json + model.pt){hint}")


def sample(args: argparse.Namespace) -> Path:
    """Load a pixel model folder, sample a grid (a row per class, or the asked labels) and save it.
    A pipeline folder (model_index.json): stage3.sample_pipeline."""
    from ldm_scratch.stage2 import generate, load_diffusion_model
    from ldm_scratch.train import save_image_grid
    check_sample_flags(args)
    if model_folder_kind(args.model) == "pipeline":
        return stage3.sample_pipeline(args)
    if getattr(args, "shift", None) is not None:
        raise ValueError(f"--shift is for flow pipelines; {args.model} is a pixel DDPM model")
    if args.prompt is not None:
        raise ValueError(f"{args.model} is a class-conditional pixel model: it takes --class-labels, not --prompt "
                         "(text prompts need a latent pipeline folder, OUT/pipeline)")
    unet, diffusion, meta = load_diffusion_model(args.model, default_device())
    if meta["space"] != "pixel":
        raise ValueError(f"{args.model} is a {meta['space']} model; sample it through its latent pipeline")
    stage3.check_steps(args, diffusion.T)
    k = unet.cfg.num_classes
    if args.class_labels is not None:
        bad = [c for c in args.class_labels if not 0 <= c < k]
        if bad:
            raise ValueError(f"--class-labels {bad} out of range; valid labels: "
                             f"{f'0..{k - 1}' if k else 'none (unconditional model: use --n-per-class)'}")
        # one sample per label in rows of 10, or --num-images per label, a row each
        n = args.num_images or 1
        labels, row = torch.tensor(args.class_labels).repeat_interleave(n), n if args.num_images else 10
    else:
        n = args.num_images or 8
        labels, row = torch.arange(k).repeat_interleave(n) if k else n, n
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


COMMANDS: dict[str, Command] = {
    "train-diffusion": (add_train_diffusion, train_diffusion,
                        "train a denoiser: a pixel DDPM, or (--space latent) latent diffusion -> a pipeline"),
    "sample": (add_sample, sample, "sample a PNG grid from a saved pipeline (prompts, labels) or pixel model"),
}
