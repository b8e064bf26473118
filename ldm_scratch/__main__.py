"""The command line: `python -m ldm_scratch <command> ...`.

Every flag of a training command is a config field (config.py), generated from the dataclass so
the two cannot drift: `--kl-weight` is LossConfig.kl_weight, `--batch-size` TrainConfig.batch_size.
An unknown flag or value is an error that lists the valid ones (argparse's choices do it).

Commands live in COMMANDS (name -> (add_arguments, run)); each one there works end to end.
  train-autoencoder  stage 1 on MNIST-5k or photo crops -> OUT/model/ (config.json + model.pt)
  demo               the stage-1 showcase: three autoencoders (MNIST f=4, photos f=8 and f=4), held-out metrics, report.md/json
  train-diffusion    stage 2 in pixel space: a class-conditional DDPM on MNIST-5k -> OUT/model/
  sample             a PNG grid from a saved diffusion model (DDIM or DDPM, classifier-free guidance)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ldm_scratch.config import (AUTOENCODER_PRESETS, AutoencoderConfig, LossConfig, TrainConfig,
                                get_preset)
from ldm_scratch.config import UNET_PRESETS, DiffusionConfig, UNetConfig
from ldm_scratch.device import default_device
from ldm_scratch.diffusion import PREDICTIONS, SCHEDULES
from ldm_scratch.stage2 import SAMPLERS, SPACES

# The string fields whose valid values are a closed set.
CHOICES = {"precision": ("auto", "bf16", "fp32"), "disc_loss": ("hinge", "vanilla"),
           "perceptual_net": ("default", "vgg16", "none"), "schedule": SCHEDULES, "prediction": PREDICTIONS}
# Fields the command sets itself: the data decides the channels and size; the scale factor is measured.
NOT_FLAGS = {"in_channels", "out_channels", "sample_size", "scale_factor"}
# Photo crops drawn per epoch; the crops are random, so this only sets how often the order repeats.
PHOTO_CROPS = 8192


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field (default None = keep the preset's value)."""
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in NOT_FLAGS:
            continue
        default = getattr(cls(), f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f"(default {default})"}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kw.update(nargs="+", type=type(default[0]))
        else:
            kw["type"] = type(default)
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def apply_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """A copy of cfg with every field given on the command line replaced."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)
             if f.name not in NOT_FLAGS and getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return dataclasses.replace(cfg, **given)


# ----------------------------------------------------------------------------- data
def build_data(name: str, image_size: int | None, seed: int,
               data_dir: str | None = None) -> torch.utils.data.Dataset:
    from ldm_scratch import data
    if name == "mnist5k":
        return data.MNIST5k("train", pad_to=image_size or 32)
    if name == "photos":
        return data.PhotoCrops(size=image_size or 64, length=PHOTO_CROPS, seed=seed)
    if name == "folder":
        from ldm_scratch.loaders import ImageFolder
        if not data_dir:
            raise ValueError("--data folder needs --data-dir DIR (a folder of PNG/JPEG images, searched recursively)")
        return ImageFolder(data_dir, size=image_size or 64)
    raise ValueError(f"unknown data {name!r}; valid: {', '.join(DATASETS)}")


DATASETS = ("mnist5k", "photos", "folder")


# ----------------------------------------------------------------------------- train-autoencoder
def add_train_autoencoder(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(AUTOENCODER_PRESETS), default="tiny")
    p.add_argument("--data", choices=DATASETS, default="mnist5k")
    p.add_argument("--data-dir", default=None, help="with --data folder: your folder of PNG/JPEG images")
    p.add_argument("--image-size", type=int, default=None, help="crop size (photos, folder) or padded size (mnist5k)")
    p.add_argument("--out", default="runs/autoencoder", help="run folder: checkpoint, logs, grids, model/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    for cls in (AutoencoderConfig, LossConfig, TrainConfig):
        add_config_flags(p, cls)


def train_autoencoder(args: argparse.Namespace) -> dict:
    """Train stage 1 and save OUT/model/; returns a summary (steps, minutes, scale_factor)."""
    from ldm_scratch.stage1 import AutoencoderTask, stack_images
    from ldm_scratch.train import Trainer
    ae_cfg = apply_flags(get_preset(AUTOENCODER_PRESETS, args.preset, "autoencoder"), args)
    loss_cfg = apply_flags(LossConfig(), args)
    train_cfg = apply_flags(TrainConfig(), args)
    data = build_data(args.data, args.image_size, train_cfg.seed, getattr(args, "data_dir", None))
    sample = stack_images(data, 8)
    ae_cfg.in_channels = sample.shape[1]  # the data decides: 1 for MNIST, 3 for photos
    torch.manual_seed(train_cfg.seed)  # the initial weights, too, follow from --seed
    task = AutoencoderTask(ae_cfg, loss_cfg, sample_images=sample)
    trainer = Trainer(task, train_cfg, data, args.out)
    start = time.time()
    trainer.fit(resume=args.resume)
    minutes = (time.time() - start) / 60
    if trainer.stopped == "interrupted":
        return {"steps": trainer.step, "minutes": minutes, "interrupted": True}
    task.sample(trainer.step, args.out)
    scale = task.finish(data, args.out)
    print(f"saved {Path(args.out) / 'model'} after {trainer.step} steps ({minutes:.1f} min); "
          f"scale_factor = {scale:.4f}")
    return {"steps": trainer.step, "minutes": minutes, "scale_factor": scale, "task": task,
            "precision": trainer.precision}


# ----------------------------------------------------------------------------- demo
# (preset, data, image size, steps, batch, disc_start, full minutes). Step counts are sized for a
# 2-core CPU with bf16 autocast (benchmarks/bench_autoencoder.py: ~1.2 s per photo step of 16 crops,
# ~1 s per digit step of 32 when one core is busy elsewhere), so steps and the time cap end a full run
# at about the same point; the discriminator joins for the last third, a short version of LDM's
# late disc_start. --quick divides the steps by 50 and caps each run at QUICK_MINUTES.
DEMO_RUNS = {
    "mnist_f4": ("small-f4", "mnist5k", 32, 600, 32, 400, 10.0),
    "photo_f8": ("small-f8", "photos", 64, 1000, 16, 700, 20.0),
    "photo_f4": ("small-f4", "photos", 64, 1000, 16, 700, 15.0),   # 3 channels: the data decides
}
QUICK_MINUTES = 0.75


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="about a minute per model instead of 10 + 20 + 15")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (tests use 0.01)")


def machine_info(precision: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = default_device()
    return {"device": str(dev), "cpu": cpu, "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision,
            "python": platform.python_version()}


def demo(args: argparse.Namespace) -> dict:
    """Train both stage-1 autoencoders, evaluate the held-out images, write report.md/json."""
    from ldm_scratch.data import HELDOUT_PHOTOS, MNIST5k
    from ldm_scratch.metrics import psnr, ssim
    from ldm_scratch.stage1 import evaluate_photo, floor_reconstruction, stack_images
    from ldm_scratch.train import save_image_grid
    out = Path(args.out)
    report: dict[str, Any] = {"quick": args.quick, "runs": {}}
    for name, (preset, data, size, steps, batch, disc_start, minutes) in DEMO_RUNS.items():
        scale = args.steps_scale * (0.02 if args.quick else 1.0)
        n_steps = max(2, int(steps * scale))
        argv = ["train-autoencoder", "--preset", preset, "--data", data, "--image-size", str(size),
                "--steps", str(n_steps), "--batch-size", str(batch), "--disc-start", str(max(1, int(disc_start * scale))),
                "--max-minutes", str(QUICK_MINUTES if args.quick else minutes), "--out", str(out / name),
                "--sample-every", str(max(1, n_steps // 5)), "--ckpt-every", str(max(1, n_steps // 5))]
        print(f"\n== {name}: {' '.join(argv)}")
        res = train_autoencoder(build_parser().parse_args(argv))
        model = res.pop("task").ae.eval()
        metrics: dict[str, Any] = {}
        if data == "mnist5k":  # held-out digits: the test split, never seen in training
            x = stack_images(MNIST5k("test", pad_to=size), 256)
            with torch.no_grad():
                x_rec = model.decode(model.encode(x).mode()).clamp(-1, 1)
            floor = floor_reconstruction(x, model.cfg.f)
            metrics["mnist_test"] = {"psnr": psnr(x_rec, x), "ssim": ssim(x_rec, x),
                                     "floor_psnr": psnr(floor, x), "floor_ssim": ssim(floor, x)}
            show = slice(None, None, len(x) // 10)  # one digit of each class: the test split is sorted by class
            save_image_grid([x[show], x_rec[show], floor[show]], out / f"{name}_heldout.png",
                            title="held-out digits: input / autoencoder / area+bicubic floor")
        else:
            for photo in HELDOUT_PHOTOS:
                metrics[photo] = evaluate_photo(model, photo)
        report["runs"][name] = {"preset": preset, "data": data, "image_size": size, **res, "metrics": metrics}
        report["machine"] = machine_info(res.get("precision", "?"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_report(report))
    print((out / "report.md").read_text())
    return report


def render_report(report: dict) -> str:
    m = report["machine"]
    lines = ["# ldm_scratch demo: stage 1", "",
             f"Machine: {m['cpu']} ({m['device']}{', ' + m['gpu'] if m['gpu'] else ''}), {m['threads']} threads, "
             f"torch {m['torch']}, precision {m['precision']}{' (quick mode)' if report['quick'] else ''}", "",
             "| run | preset | steps | minutes | scale_factor | image | PSNR dB | SSIM | floor PSNR | floor SSIM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["runs"].items():
        for img, v in r["metrics"].items():
            lines.append(f"| {name} | {r['preset']} | {r['steps']} | {r['minutes']:.1f} | {r.get('scale_factor', 0):.4f} "
                         f"| {img} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['floor_psnr']:.2f} | {v['floor_ssim']:.3f} |")
    lines += ["", "The floor is area-downsampling by f then bicubic upsampling: an autoencoder worth its "
              "latent beats it. Grids: `*/samples/` and `mnist_f4_heldout.png`.", ""]
    return "\n".join(lines)


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


# ----------------------------------------------------------------------------- entry point
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any], str]] = {
    "train-autoencoder": (add_train_autoencoder, train_autoencoder, "train stage 1 (the KL autoencoder)"),
    "demo": (add_demo, demo, "train and evaluate the two stage-1 autoencoders; write report.md"),
    "train-diffusion": (add_train_diffusion, train_diffusion, "train stage 2 in pixel space (class-conditional DDPM)"),
    "sample": (add_sample, sample, "sample a PNG grid from a saved diffusion model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
