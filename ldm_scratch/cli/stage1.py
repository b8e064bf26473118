"""Stage-1 commands: `train-autoencoder` (the KL autoencoder, Rombach et al. 2022, Sec. 3) and
`demo-autoencoders`, the stage-1 showcase (three autoencoders, held-out metrics, report.md/json).
The end-to-end demo, both stages on captioned coloured digits, is `demo` (cli/demo.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ldm_scratch.cli import Command
from ldm_scratch.cli.flags import DATASETS, add_config_flags, apply_flags, build_data
from ldm_scratch.config import AUTOENCODER_PRESETS, AutoencoderConfig, LossConfig, TrainConfig, get_preset
from ldm_scratch.device import cpu_name, default_device


# ----------------------------------------------------------------------------- train-autoencoder
def add_train_autoencoder(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(AUTOENCODER_PRESETS), default=None, help="(default tiny)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from a trained autoencoder: a model folder (config.json + model.pt) or a shipped name "
                        "(mnist-f4, colored-f4, photo-f8c4); its architecture is used, so no --preset or architecture flags")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init-from: freeze the encoder and fine-tune the decoder, so the latent space (and every "
                        "denoiser trained in it) stays valid; Stable Diffusion's ft-EMA / ft-MSE VAEs were made this way")
    p.add_argument("--data", choices=DATASETS, default="mnist5k")
    p.add_argument("--data-dir", default=None, help="with --data folder: your folder of PNG/JPEG images")
    p.add_argument("--image-size", type=int, default=None, help="crop size (photos, folder) or padded size (mnist5k); colored is 32 only")
    p.add_argument("--out", default="runs/autoencoder", help="run folder: checkpoint, logs, grids, model/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    for cls in (AutoencoderConfig, LossConfig, TrainConfig):
        add_config_flags(p, cls)


def train_autoencoder(args: argparse.Namespace) -> dict:
    """Train stage 1 and save OUT/model/; returns a summary (steps, minutes, scale_factor)."""
    from ldm_scratch.stage1 import AutoencoderTask, stack_images
    from ldm_scratch.train import Trainer
    init = load_init(args)
    if init is not None:
        ae_cfg = dataclasses.replace(init.cfg)
    else:
        ae_cfg = apply_flags(get_preset(AUTOENCODER_PRESETS, args.preset or "tiny", "autoencoder"), args)
    loss_cfg = apply_flags(LossConfig(), args)
    train_cfg = apply_flags(TrainConfig(), args)
    data = build_data(args.data, args.image_size, train_cfg.seed, getattr(args, "data_dir", None))
    sample = stack_images(data, 8)
    if init is not None and sample.shape[1] != ae_cfg.in_channels:
        raise ValueError(f"--init-from {args.init_from}: the autoencoder takes {ae_cfg.in_channels}-channel images, "
                         f"--data {args.data} gives {sample.shape[1]} channels")
    ae_cfg.in_channels = sample.shape[1]  # the data decides: 1 for MNIST, 3 for photos
    torch.manual_seed(train_cfg.seed)  # the initial weights, too, follow from --seed
    task = AutoencoderTask(ae_cfg, loss_cfg, sample_images=sample, init_from=init,
                           decoder_only=getattr(args, "decoder_only", False))
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


def load_init(args: argparse.Namespace):
    """The autoencoder --init-from names (None without it); refuses flags it would silently override."""
    from ldm_scratch.autoencoder import AutoencoderKL
    from ldm_scratch.pretrained import PRETRAINED_AUTOENCODERS, load_autoencoder
    source = getattr(args, "init_from", None)
    if source is None:
        if getattr(args, "decoder_only", False):
            raise ValueError("--decoder-only fine-tunes a trained decoder: give --init-from MODEL as well")
        return None
    arch_flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(AutoencoderConfig)
                  if getattr(args, f.name, None) is not None]
    if args.preset is not None or arch_flags:
        raise ValueError(f"--init-from {source} brings its own architecture; drop "
                         f"{', '.join((['--preset'] if args.preset else []) + arch_flags)}")
    if source in PRETRAINED_AUTOENCODERS:
        model = load_autoencoder(source)
    elif Path(source).is_dir():
        model = AutoencoderKL.from_pretrained(source)
    else:
        raise ValueError(f"--init-from {source!r}: neither a model folder (config.json + model.pt) nor a shipped "
                         f"autoencoder ({', '.join(PRETRAINED_AUTOENCODERS)})")
    return model


# ----------------------------------------------------------------------------- demo-autoencoders
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


def train_autoencoder_parser() -> argparse.ArgumentParser:
    """The train-autoencoder command's own parser: the demo runs that command with its own arguments."""
    p = argparse.ArgumentParser(prog="python -m ldm_scratch train-autoencoder")
    add_train_autoencoder(p)
    return p


def add_demo_autoencoders(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="about a minute per model instead of 10 + 20 + 15")
    p.add_argument("--out", default="runs/demo-autoencoders")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (tests use 0.05)")


def machine_info(precision: str) -> dict:
    dev = default_device()
    return {"device": str(dev), "cpu": cpu_name(), "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision,
            "python": platform.python_version()}


def demo_autoencoders(args: argparse.Namespace) -> dict:
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
        res = train_autoencoder(train_autoencoder_parser().parse_args(argv[1:]))
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


COMMANDS: dict[str, Command] = {
    "train-autoencoder": (add_train_autoencoder, train_autoencoder, "train stage 1 (the KL autoencoder)"),
    "demo-autoencoders": (add_demo_autoencoders, demo_autoencoders,
                          "the stage-1 showcase: MNIST f=4, photos f=8 and f=4 autoencoders; report.md"),
}
