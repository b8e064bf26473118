"""Short-budget recipe for the photo autoencoder: residual autoencoding vs the SD layout at equal wall time.

    OMP_NUM_THREADS=1 python scripts/ae_recipe.py --minutes 4                 # residual, then none
    python scripts/ae_recipe.py --minutes 30 --shortcuts residual --lr 5e-4   # one variant, longer

Each variant is one `train-autoencoder` run (cli/stage1.py, the command a user types) on random photo
crops (data.PhotoCrops: every training photo at scales 1, 2, 4), stopped by --max-minutes rather than a
step count, so both get the same wall time on the same machine. Then the full-size held-out photos
(astronaut, coffee: never trained on) go through each model's posterior mode, beside the non-learned
floor at the same f (area-down, bicubic-up: stage1.evaluate_photo). The residual design's step-0 model is
itself a non-learned codec (area-down, nearest-up: autoencoder.py), so its row at 0 steps is printed too.

Defaults are the short-budget guess to measure: L1 + KL only (--perceptual-weight 0 skips the perceptual
net, and --disc-start beyond any step reached keeps the discriminator out), batch 16 of 64 x 64 crops.
Writes OUT/report.json and OUT/report.md; each run folder keeps its grids, log.jsonl and model/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.cli.flags import apply_flags
from ldm_scratch.cli.stage1 import machine_info, train_autoencoder, train_autoencoder_parser
from ldm_scratch.config import AUTOENCODER_PRESETS, SHORTCUTS, UP_SHORTCUTS, AutoencoderConfig, get_preset
from ldm_scratch.losses import PIXEL_LOSSES
from ldm_scratch.data import HELDOUT_PHOTOS
from ldm_scratch.stage1 import evaluate_photo

NEVER = 10**9  # a step count no run reaches: "no discriminator" / "the wall clock decides"
# Learning rates per variant. The residual model starts as a working codec with ~25 zero-initialised
# branches; Adam moves every weight by about lr per step, in all branches at once, so an lr that suits
# the SD layout throws the codec away. Measured (photo-f8c4, batch 16, betas (0.9, 0.999); mean L1 on
# 32 64 x 64 crops of the training photos that no step used; the codec's 0.0997): one step at 2e-5 ->
# 0.124; 200 steps at 1e-4 (100-step warm-up) -> 0.098; 200 steps at 3e-5 -> 0.094, better at every
# check; 60 steps at 1e-5 -> 0.098.
LR_DEFAULT = {"residual": 3e-5, "none": 2e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training wall time per variant")
    p.add_argument("--shortcuts", nargs="+", choices=SHORTCUTS, default=["residual", "none"])
    p.add_argument("--preset", choices=sorted(AUTOENCODER_PRESETS), default="photo-f8c4",
                   help="widths and latent; its shortcut is replaced by each of --shortcuts")
    p.add_argument("--image-size", type=int, default=64, help="crop size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, nargs="+", default=None,
                   help="one learning rate for every variant, or one per --shortcuts entry (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in LR_DEFAULT.items()) + ")")
    p.add_argument("--lr-warmup-steps", type=int, default=50)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999),
                   help="Adam's; the CLI's default (0.5, 0.9) is LDM's for the GAN phase")
    p.add_argument("--perceptual-weight", type=float, default=0.0, help="0: no perceptual net at all")
    p.add_argument("--disc-start", type=int, default=NEVER, help="step the discriminator joins (default: never)")
    p.add_argument("--free-latent-channels", action="store_true",
                   help="residual only: latent channels past the image's (channel 3 of 4) start empty, not as copies")
    p.add_argument("--pixel-loss", choices=PIXEL_LOSSES, default="l1",
                   help="the NLL's reconstruction term: l1 (Laplace, LDM's) or l2 (Gaussian: squared error, what PSNR scores)")
    p.add_argument("--up-shortcut", choices=UP_SHORTCUTS, default="nearest",
                   help="residual only: the decoder's upsampling shortcut (bicubic: the untrained codec is the floor)")
    p.add_argument("--augment", action="store_true",
                   help="--data photos-aug: crops also rotated by multiples of 90 degrees, colour channels shuffled")
    p.add_argument("--more-photos", action="store_true",
                   help="--data photos-more: the eight training photos plus data.EXTRA_PHOTOS (grey textures and photos, "
                        "matplotlib's RGB portrait)")
    p.add_argument("--steps", type=int, default=None,
                   help="a step count instead of the wall clock (say, what 2 idle threads do in --minutes, for a run "
                        "that shares the machine); --minutes is then not a limit")
    p.add_argument("--ch", type=int, default=None, help="capacity: the preset's base width, replaced")
    p.add_argument("--ch-mult", type=int, nargs="+", default=None, help="capacity: the preset's width multipliers, replaced")
    p.add_argument("--num-res-blocks", type=int, default=None, help="capacity: the preset's blocks per level, replaced")
    p.add_argument("--norm-groups", type=int, default=None, help="GroupNorm groups (layers.Normalize clips them to a divisor of each width)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ae_recipe")
    return p.parse_args(argv)


def data_name(args: argparse.Namespace) -> str:
    """train-autoencoder's --data for the recipe's crops."""
    if args.augment and args.more_photos:
        raise ValueError("--augment and --more-photos are separate datasets; pick one")
    return "photos-aug" if args.augment else "photos-more" if args.more_photos else "photos"


def variant_argv(args: argparse.Namespace, shortcut: str, lr: float) -> list[str]:
    """The train-autoencoder command line of one variant."""
    out = Path(args.out) / shortcut
    argv = ["--preset", args.preset, "--shortcut", shortcut, "--data", data_name(args),
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--lr", str(lr),
            "--lr-warmup-steps", str(args.lr_warmup_steps), "--betas", *map(str, args.betas),
            "--perceptual-weight", str(args.perceptual_weight), "--pixel-loss", args.pixel_loss, "--disc-start", str(args.disc_start),
            "--steps", str(args.steps or NEVER), "--max-minutes", str(NEVER if args.steps else args.minutes),
            "--seed", str(args.seed),
            "--sample-every", "500", "--ckpt-every", "500", "--log-every", "25", "--out", str(out)]
    if args.perceptual_weight == 0:
        argv += ["--perceptual-net", "none"]
    argv += arch_flags(args)
    if args.free_latent_channels and shortcut == "residual":
        argv += ["--free-latent-channels"]
    if args.up_shortcut != "nearest" and shortcut == "residual":
        argv += ["--up-shortcut", args.up_shortcut]
    return argv


def run_variant(args: argparse.Namespace, shortcut: str, lr: float) -> dict:
    """One train-autoencoder run for args.minutes (or args.steps), then the held-out photos."""
    argv = variant_argv(args, shortcut, lr)
    print(f"\n== {shortcut}: train-autoencoder {' '.join(argv)}", flush=True)
    res = train_autoencoder(train_autoencoder_parser().parse_args(argv))
    model = res.pop("task").ae.eval()
    metrics = {photo: evaluate_photo(model, photo) for photo in HELDOUT_PHOTOS}
    return {"shortcut": shortcut, "lr": lr, "steps": res["steps"], "minutes": res["minutes"],
            "precision": res.get("precision", "?"), "params": sum(p.numel() for p in model.parameters()),
            "metrics": metrics}


def arch_flags(args: argparse.Namespace) -> list[str]:
    """train-autoencoder's architecture flags for the capacity overrides (they apply on top of --preset)."""
    flags = [] if args.ch is None else ["--ch", str(args.ch)]
    flags += [] if args.ch_mult is None else ["--ch-mult", *map(str, args.ch_mult)]
    flags += [] if args.norm_groups is None else ["--norm-groups", str(args.norm_groups)]
    return flags + ([] if args.num_res_blocks is None else ["--num-res-blocks", str(args.num_res_blocks)])


def residual_config(args: argparse.Namespace) -> AutoencoderConfig:
    """The residual variant's architecture, built the way train-autoencoder builds it from variant_argv
    (the preset, then its flags), so the step-0 row and the trained model cannot differ in layout."""
    cli = train_autoencoder_parser().parse_args(variant_argv(args, "residual", LR_DEFAULT["residual"]))  # lr: no part of the layout
    return apply_flags(get_preset(AUTOENCODER_PRESETS, args.preset, "autoencoder"), cli)


def step0_codec(args: argparse.Namespace) -> dict:
    """The residual model before training: exactly the non-learned area-down / nearest-up codec."""
    model = AutoencoderKL(residual_config(args)).eval()
    return {"shortcut": "residual", "lr": 0.0, "steps": 0, "minutes": 0.0, "precision": "-",
            "params": sum(p.numel() for p in model.parameters()),
            "metrics": {photo: evaluate_photo(model, photo) for photo in HELDOUT_PHOTOS}}


def render(report: dict) -> str:
    m, a = report["machine"], report["args"]
    lines = [f"# Photo autoencoder, {a['preset']} at equal wall time ({a['minutes']:g} min per variant)", "",
             f"Machine: {m['cpu']} ({m['device']}), {m['threads']} torch thread(s), torch {m['torch']}; "
             f"crops {a['image_size']}, batch {a['batch_size']}, Adam betas {tuple(a['betas'])}, lr warm-up "
             f"{a['lr_warmup_steps']} steps, perceptual weight "
             f"{a['perceptual_weight']:g}, disc_start {a['disc_start'] if a['disc_start'] < NEVER else 'never'}"
             f"{', free latent channels' if a.get('free_latent_channels') else ''}"
             f"{', crops rotated and colour channels shuffled (photos-aug)' if a.get('augment') else ''}"
             f"{', extra photos (photos-more)' if a.get('more_photos') else ''}"
             f"{', squared-error (l2) pixel loss' if a.get('pixel_loss', 'l1') == 'l2' else ''}"
             f"{', bicubic up-shortcuts' if a.get('up_shortcut', 'nearest') == 'bicubic' else ''}"
             f"{''.join(f', {k} {a[k]}' for k in ('ch', 'ch_mult', 'num_res_blocks', 'norm_groups') if a.get(k) is not None)}"
             f"{', ' + str(a['steps']) + ' steps (not the wall clock)' if a.get('steps') else ''}.", "",
             "| shortcut | lr | params | steps | minutes | precision | image | PSNR dB | SSIM | floor PSNR | floor SSIM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        for img, v in r["metrics"].items():
            lines.append(f"| {r['shortcut']} | {r['lr'] or '-':} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['minutes']:.1f} | "
                         f"{r['precision']} | {img} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['floor_psnr']:.2f} | "
                         f"{v['floor_ssim']:.3f} |")
    lines += ["", "Held-out full-size photos through the posterior mode; the floor is area-down by f, then "
              "bicubic-up. The residual model at 0 steps is its non-learned codec (area-down, then nearest- or bicubic-up).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    lrs = args.lr or [LR_DEFAULT[s] for s in args.shortcuts]
    if len(lrs) not in (1, len(args.shortcuts)):
        raise SystemExit(f"--lr takes one value or one per --shortcuts entry ({len(args.shortcuts)}), got {lrs}")
    lrs = lrs * len(args.shortcuts) if len(lrs) == 1 else lrs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "runs": [], "started": time.strftime("%Y-%m-%d %H:%M")}
    if "residual" in args.shortcuts:
        report["runs"].append(step0_codec(args))
    for shortcut, lr in zip(args.shortcuts, lrs):
        report["runs"].append(run_variant(args, shortcut, lr))
    report["machine"] = machine_info(report["runs"][-1]["precision"])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render(report))
    print("\n" + render(report))
    return report


if __name__ == "__main__":
    main()
