"""Rebuild the pretrained stage-1 autoencoders that ldm_scratch.pretrained loads (05, 06, 07 notebooks).

    python scripts/train_stage1_weights.py               # both runs at once, one thread each
    python scripts/train_stage1_weights.py --skip-train  # re-evaluate and re-install finished runs
    python scripts/train_stage1_weights.py --resume      # continue interrupted runs from their checkpoints
    # a trial: one model, the residual recipe, its own folder, ldm_scratch/weights/ untouched
    python scripts/train_stage1_weights.py --only mnist-f4 --recipe residual --runs-dir runs/trial --no-install

Trains, with the package's own `train-autoencoder` command (one process per model, one thread each,
concurrently; fixed seeds and STEP counts, never a wall-time budget, so a rerun gives the same recipe on
any machine), each model by its recipe (RECIPES: "plain", the SD layout; "residual", DC-AE's shortcuts;
"residual-se", those plus scale equivariance; "long", colored-f4's plain recipe for 6,000 steps, about an hour;
SHIPPED says which one ships):
  mnist-f4    MNIST-5k "train"          1 x 32 x 32 -> 4 x 8 x 8
  colored-f4  ColoredDigits("train")    3 x 32 x 32 -> 4 x 8 x 8
into RUNS_DIR/NAME/, then evaluates each on its held-out "test" split: PSNR/SSIM beside the non-learned
floor of stage1.floor_reconstruction; for mnist-f4 classifier accuracy and classifier-FID against the
real-vs-real FID at the same n (and a second network's distance); for colored-f4 the prompt adherence of
reconstructions; and checks issue #12's aims (AIM_*). Then installs config.json + model.pt into OUT_ROOT/ae_*/
(default ldm_scratch/weights/), in float16 when that moves the held-out PSNR by less than
FP16_TOLERANCE_DB (measured here, every time), and writes OUT_ROOT/README.md with the numbers. With
--no-install it only writes RUNS_DIR/report.json and RUNS_DIR/README.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from ldm_scratch import adherence
from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import atomic_json_save, atomic_torch_save, read_json
from ldm_scratch.cli.stage1 import machine_info
from ldm_scratch.data import ColoredDigits, MNIST5k
from ldm_scratch.device import resolve_precision
from ldm_scratch.metrics import (classifier_fid, conditional_accuracy, load_classifier, psnr, real_vs_real_fid,
                                 second_eye_distance, ssim)
from ldm_scratch.pretrained import PRETRAINED_AUTOENCODERS, WEIGHTS_DIR, autoencoder_folder, load_autoencoder
from ldm_scratch.stage1 import floor_reconstruction
from ldm_scratch.stage2 import reference_digits
from ldm_scratch.train import save_image_grid

@dataclass(frozen=True)
class Recipe:
    """One shipped autoencoder's training run; every field is a `train-autoencoder` flag."""
    preset: str                # architecture (config.py); the "-res" presets use residual autoencoding
    data: str                  # --data: the train split of this dataset
    steps: int                 # fixed step count, never a wall-time budget: a rerun gives the same model
    batch_size: int
    lr: float
    disc_start: int            # the step the PatchGAN discriminator joins
    seed: int = 0
    extra: tuple[str, ...] = ()  # further flags, each explained where the recipe is defined

    def flags(self, steps: int) -> list[str]:
        """The train-autoencoder flags for `steps` steps (the discriminator joins at the same fraction)."""
        every = str(max(1, steps // SNAPSHOTS))
        return ["--preset", self.preset, "--data", self.data, "--steps", str(steps),
                "--batch-size", str(self.batch_size), "--lr", f"{self.lr:g}",
                "--disc-start", str(self.disc_start * steps // self.steps), "--seed", str(self.seed),
                "--sample-every", every, "--ckpt-every", every, *self.extra]


# Two recipes per model: "plain", the SD layout (small-f4) that shipped first, and "residual" (config.py's
# "-res" presets, autoencoder.py): every branch starts at zero, so the untrained model is already the
# area-down / nearest-up codec. Adam moves every weight by about lr in its first steps, in all those
# branches at once, so the SD layout's 2e-4 throws part of that codec away. Measured for mnist-f4-res
# (150 steps, batch 32, no discriminator; held-out PSNR / classifier accuracy / classifier-FID, real vs
# real 26.1): lr 3e-5 -> 23.39 dB / 0.976 / 77.0; 1e-4 -> 24.48 / 0.976 / 48.0; 3e-4 -> 23.80 / 0.980 / 57.7.
# mnist-f4 residual trains without the discriminator (disc_start = steps: it never joins). At lr 1e-4, 600
# steps with it from step 400 ended at 26.61 dB / 0.978 / FID 60.5, without it at 27.18 / 0.984 / 37.0; the
# FID wanders along the way (no discriminator: 46.8 at step 250, 34.1 at 300, 52.6 at 450), so read it at
# the fixed end point, not at a chosen step (docs/stage1_weights_trials.md).
# colored-f4 turns the perceptual weight down to 0.1: the default perceptual net (scripts/
# train_perceptual.py) learnt its features from grey digits and photo rotations, so it barely sees hue.
# Measured: plain, 500 steps at weight 1 reconstructed magenta as blue (16.2 dB, below the 19.2 dB floor);
# residual, 120 steps at lr 1e-4: weight 1 -> 19.98 dB, all-three adherence 0.384; weight 0.1 -> 21.73, 0.432.
RECIPES = {
    "mnist-f4": {"plain": Recipe("small-f4", "mnist5k", steps=500, batch_size=32, lr=2e-4, disc_start=400),
                 "residual": Recipe("mnist-f4-res", "mnist5k", steps=600, batch_size=32, lr=1e-4, disc_start=600),
                 # the residual recipe plus scale equivariance (stage1.AutoencoderTask.equivariance_loss): a
                 # latent that is easier to generate, for the denoisers downstream (docs/stage1_weights_trials.md)
                 "residual-se": Recipe("mnist-f4-res", "mnist5k", steps=600, batch_size=32, lr=1e-4, disc_start=600,
                                       extra=("--equivariance-weight", "0.5"))},
    "colored-f4": {"plain": Recipe("small-f4", "colored", steps=500, batch_size=32, lr=2e-4, disc_start=400,
                                   extra=("--perceptual-weight", "0.1")),
                   "residual": Recipe("colored-f4-res", "colored", steps=600, batch_size=32, lr=1e-4,
                                      disc_start=400, extra=("--perceptual-weight", "0.1")),
                   # "long": the plain recipe for 12x the steps with the discriminator from step 200. Grass and
                   # gravel differ from brick in one-pixel grain that 4 x 8 x 8 latents cannot store, so the decoder
                   # must draw it; every run of at most 700 steps read all three textures as brick (docs/
                   # stage1_weights_trials.md), and only the discriminator, given thousands of steps, teaches it.
                   "long": Recipe("small-f4", "colored", steps=6000, batch_size=32, lr=2e-4, disc_start=200,
                                  extra=("--perceptual-weight", "0.1")),
                   # "residual-long": the long recipe on the residual layout (its lr), which at 600 steps already
                   # drew better than the plain layout at 1,500 (docs/stage1_weights_trials.md)
                   "residual-long": Recipe("colored-f4-res", "colored", steps=6000, batch_size=32, lr=1e-4,
                                           disc_start=200, extra=("--perceptual-weight", "0.1"))},
}
# The recipe each model ships with: residual only where it met the aims below AND the denoisers downstream did
# not get worse (docs/stage1_weights_trials.md). mnist-f4's residual recipe met the reconstruction aims but was
# taken back on 2026-12-02: the DiT trained on its latents scored worse at the same steps (3,000 steps, DDIM 50,
# w = 3: accuracy 0.968 / FID 78.3 vs 0.992 / 71.9 on the plain model's latents), with or without a shift factor.
# Since 2026-12-07 it ships "residual-se": the same recipe with scale equivariance, whose latents both denoisers
# learn better than the plain codec's (scripts/codec_downstream.py; the numbers are in the trials document).
SHIPPED = {"mnist-f4": "residual-se", "colored-f4": "residual-long"}
SNAPSHOTS = 4  # reconstruction grids and checkpoints per run
# float16 keeps ~3 significant digits per weight; we accept it only if the held-out reconstructions
# move by less than this (a PSNR difference far below what an eye or a diffusion model could notice).
FP16_TOLERANCE_DB = 0.05
EVAL_BATCH = 100
# The stage-1 aims of issue #12 for the digit codecs, checked on the held-out split after every run.
AIM_DIGIT_ACC = 0.98        # mnist-f4: the classifier reads at least 98% of the reconstructions right
AIM_FID_RATIO = 1.5         # mnist-f4: classifier-FID at most 1.5x the real-vs-real FID at the same n
AIM_ADHERENCE = 0.85        # colored-f4: all three caption words right on 85% (statistics of REAL images)


def train_command(recipe: Recipe, out: Path, steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "ldm_scratch", "train-autoencoder", *recipe.flags(steps), "--out", str(out)]
    return cmd + (["--resume"] if resume else [])


def train_all(runs_dir: Path, recipes: dict[str, Recipe], steps: dict[str, int], resume: bool) -> dict[str, dict]:
    """Start every run as its own process (one thread each: the machine is shared), wait for all."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MPLBACKEND="Agg")
    procs = {}
    for name, recipe in recipes.items():
        out = runs_dir / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = train_command(recipe, out, steps[name], resume)
        print(f"== {name}: {' '.join(cmd[1:])}  (log: {out / 'train.log'})", flush=True)
        log = open(out / "train.log", "a")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                       time.time(), cmd, log)
    info = {}
    for name, (proc, start, cmd, log) in procs.items():
        rc = proc.wait()
        log.close()
        if rc != 0:
            raise RuntimeError(f"{name} failed (exit {rc}); see {runs_dir / name / 'train.log'}")
        # wall time summed over the segments of a resumed run (each segment adds its own)
        wall_file = runs_dir / name / "wall_s.json"
        earlier = json.loads(wall_file.read_text()) if resume and wall_file.is_file() else []
        segments = earlier + [time.time() - start]
        atomic_json_save(segments, wall_file)
        command = [c for c in cmd[1:] if c != "--resume"]
        # the command that really ran, so --skip-train reports it even after the recipe table changes
        atomic_json_save({"command": "python " + " ".join(command).replace(str(ROOT) + "/", ""),
                          "steps": steps[name], "threads": env["OMP_NUM_THREADS"]}, runs_dir / name / "command.json")
        info[name] = recorded_train_info(runs_dir, name, recipes[name], steps[name])
        print(f"{name}: {steps[name]} steps in {info[name]['wall_s'] / 60:.1f} min", flush=True)
    return info


def recorded_train_info(runs_dir: Path, name: str, recipe: Recipe, steps: int) -> dict:
    """The training facts of a finished run (command, steps, wall time), read from its folder."""
    wall_file, cmd_file = runs_dir / name / "wall_s.json", runs_dir / name / "command.json"
    segments = json.loads(wall_file.read_text()) if wall_file.is_file() else []
    if cmd_file.is_file():
        info = read_json(cmd_file)
    else:  # a run made before command.json existed: the current recipe's command
        cmd = train_command(recipe, runs_dir / name, steps, resume=False)
        info = {"command": "python " + " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), "steps": steps, "threads": "1"}
    return {**info, "wall_s": sum(segments) if segments else float("nan"), "segments": len(segments)}


@torch.no_grad()
def reconstruct(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Posterior mode -> decoder, in batches: (N, C, 32, 32) -> (N, C, 32, 32) in [-1, 1]."""
    return torch.cat([model.decode(model.encode(b).mode()).clamp(-1, 1) for b in x.split(EVAL_BATCH)])


def float16_copy(model: AutoencoderKL) -> AutoencoderKL:
    """The model as it loads from a float16 file: float32 modules holding float16-rounded weights."""
    half = copy.deepcopy(model)
    half.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return half.eval()


def heldout(name: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """The test split, never trained on: images, labels, captions (colored only)."""
    if name == "colored-f4":
        d = ColoredDigits("test")
        return d.images, d.labels, d.captions
    d = MNIST5k("test", pad_to=32)
    return d.images, d.labels, None


def evaluate(name: str, model: AutoencoderKL, runs_dir: Path) -> dict:
    x, labels, captions = heldout(name)
    rec = reconstruct(model, x)
    floor = floor_reconstruction(x, model.cfg.f)
    m = {"n": len(x), "psnr": psnr(rec, x), "ssim": ssim(rec, x), "floor_psnr": psnr(floor, x),
         "floor_ssim": ssim(floor, x)}
    # float16 storage: how far do the reconstructions move?
    m["fp16_psnr"] = psnr(reconstruct(float16_copy(model), x), x)
    m["fp16_delta_db"] = m["fp16_psnr"] - m["psnr"]
    show = slice(None, None, len(x) // 10)  # the test splits are sorted by class: one of each digit
    save_image_grid([x[show], rec[show], floor[show]], runs_dir / f"{name}_heldout.png",
                    title=f"{name} held-out: input / autoencoder / area+bicubic floor")
    classifier = load_classifier()
    if captions is None:
        # Realism, as the latent denoisers' samples are scored (evaluation.score_digits): classifier-FID against n real
        # digits, beside the real-vs-real FID at the same n (the floor; FID grows as n shrinks), and the
        # same pair under a second, independent network (metrics.second_eye_distance).
        reference = reference_digits(len(x))
        m["digit_acc_real"] = conditional_accuracy(x, labels, classifier)
        m["digit_acc_recon"] = conditional_accuracy(rec, labels, classifier)
        m["fid_recon"] = classifier_fid(rec, reference, classifier)
        m["fid_real"] = classifier_fid(x, reference, classifier)
        m["fid_real_vs_real"] = real_vs_real_fid(len(x), classifier)
        m["eye_recon"] = second_eye_distance(rec, reference)
        m["eye_real_vs_real"] = real_vs_real_fid(len(x), eye=second_eye_distance)
        return m
    # Prompt adherence of reconstructed test images (a reference for latent samples, not a ceiling), with the
    # statistics fitted on REAL train images (the aim's row) and refitted on reconstructed ones.
    m["adherence_real"] = adherence.prompt_adherence(x, captions, classifier)
    m["adherence_recon_real_stats"] = adherence.prompt_adherence(rec, captions, classifier)
    try:
        stats = adherence.fit_adherence(transform=lambda imgs: reconstruct(model, imgs))
        m["ink_floor_real"], m["ink_floor_recon"] = adherence.fit_adherence().ink_floor, stats.ink_floor
        m["adherence_recon"] = adherence.prompt_adherence(rec, captions, classifier, stats=stats)
    except ValueError as e:  # e.g. a background reconstructed at full brightness: ink_floor 1, a = 0 / 0
        print(f"{name}: refitted adherence failed: {e}", flush=True)
        m["adherence_recon"] = None
    return m


def aims(name: str, m: dict) -> dict[str, bool]:
    """Issue #12's stage-1 aims for this model: {what was asked: met?}."""
    if "fid_recon" in m:
        return {f"accuracy {m['digit_acc_recon']:.3f} >= {AIM_DIGIT_ACC}": m["digit_acc_recon"] >= AIM_DIGIT_ACC,
                f"classifier-FID {m['fid_recon']:.1f} <= {AIM_FID_RATIO} x {m['fid_real_vs_real']:.1f}":
                    m["fid_recon"] <= AIM_FID_RATIO * m["fid_real_vs_real"]}
    a = m["adherence_recon_real_stats"]["all_acc"]
    return {f"all-three adherence {a:.3f} >= {AIM_ADHERENCE}": a >= AIM_ADHERENCE}


def install(name: str, run_model: Path, half: bool, out_root: Path) -> dict:
    """Copy config.json and write model.pt (float16 if `half`) into OUT_ROOT/<the package's folder name>."""
    dest = out_root / autoencoder_folder(name).name
    dest.mkdir(parents=True, exist_ok=True)
    state = AutoencoderKL.from_pretrained(run_model).state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_torch_save(state, dest / "model.pt")  # weights first, config last, as save_model_folder does
    atomic_json_save(read_json(run_model / "config.json"), dest / "config.json")
    folder = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    return {"folder": str(folder), "dtype": "float16" if half else "float32",
            "model_pt_bytes": (dest / "model.pt").stat().st_size,
            "config_json_bytes": (dest / "config.json").stat().st_size}


def render_readme(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Pretrained stage-1 autoencoders", "",
        "The photo autoencoder `photo-f8c4` has its own page: [README_photo.md](README_photo.md). This page is written by",
        "`scripts/train_stage1_weights.py` for the two digit codecs.", "",
        "Loaded by `ldm_scratch.pretrained.load_autoencoder(name)` (float32, eval, frozen), so the latent "
        "notebooks (05 latent diffusion, 06 DiT, 07 text-to-image) train only the denoiser. "
        "Rebuilt from scratch by `python scripts/train_stage1_weights.py`, which wrote this file.", "",
        "| name | folder | data | preset (shortcut) | image -> latent | scale_factor | weights on disk | model.pt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["runs"].items():
        c = r["config"]
        inst = r.get("install") or {"folder": "(not installed)", "dtype": "-", "model_pt_bytes": float("nan")}
        lines.append(f"| `{name}` | `{inst['folder']}/` | {r['recipe']['data']} (train) | `{r['recipe']['preset']}` "
                     f"({c.get('shortcut', 'none')}) | {c['in_channels']} x 32 x 32 -> {c['z_channels']} x 8 x 8 "
                     f"| {c['scale_factor']:.4f} | {inst['dtype']} | {inst['model_pt_bytes'] / 1e6:.2f} MB |")
    lines += ["", "## How they were made", "",
              "Each model is one run of the package's `train-autoencoder` command, a fixed number of steps (never "
              "a wall-time budget, so a rerun gives the same recipe on any machine), the PatchGAN discriminator "
              "joining at `--disc-start` (never when it equals `--steps`); precision `auto` "
              f"({m['precision']} autocast). The `-res` presets are residual autoencoders (Chen et al. 2024, "
              "autoencoder.py): every branch starts at zero, so training starts from the non-learned area-down / "
              "nearest-up codec; their low learning rate keeps Adam's first steps from throwing that codec away "
              "(the script says why). A model keeps the SD layout (`small-f4`) until a residual recipe meets its "
              "aims (trials: `docs/stage1_weights_trials.md`):", ""]
    for name, r in report["runs"].items():
        lines.append(f"- `{name}`: `{r['command']}` ({r['steps']} steps, {r['wall_s'] / 60:.1f} min wall, "
                     f"{r['wall_s'] / r['steps']:.2f} s per step including start-up, OMP_NUM_THREADS={r['threads']}"
                     + (f"; run in {r['segments']} segments with `--resume`, which continues exactly"
                        if r.get("segments", 1) > 1 else "") + (f"; {r['note']}" if r.get("note") else "") + ")")
    lines += ["", f"Machine (evaluation, and training where a run's note does not say otherwise): {m['cpu']} "
              f"({m['device']}, {os.cpu_count()} cores), torch "
              f"{m['torch']}; built {report['date']}.", "",
              "## Held-out reconstruction", "",
              "Each model's `test` split (never trained on), posterior mode -> decoder, clamped to [-1, 1]. "
              "The floor is the non-learned baseline `stage1.floor_reconstruction`: area-downsample by f = 4 "
              "(keeping all image channels), bicubic back up.", "",
              "| name | images | PSNR dB | SSIM | floor PSNR dB | floor SSIM | float16 - float32 PSNR |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["runs"].items():
        e = r["metrics"]
        lines.append(f"| `{name}` | {e['n']} | {e['psnr']:.2f} | {e['ssim']:.3f} | {e['floor_psnr']:.2f} "
                     f"| {e['floor_ssim']:.3f} | {e['fp16_delta_db']:+.4f} dB |")
    lines += ["", f"The weights are stored in float16 where that changes the held-out PSNR by less than "
              f"{FP16_TOLERANCE_DB} dB (the last column, measured), halving model.pt; loading gives float32 modules.", ""]
    mn = report["runs"].get("mnist-f4", {}).get("metrics")
    if mn:
        lines += ["## Digits the classifier still recognises (mnist-f4)", "",
                  f"The {mn['n']} held-out digits and their reconstructions, scored as the latent denoisers' samples are "
                  f"(`stage2.score_digits`): the classifier's accuracy, and the classifier-FID against {mn['n']} real "
                  "digits (`stage2.reference_digits`) beside the real-vs-real FID at the same n, the floor any set "
                  "of n images can reach; the last column is the same distance under a second, independent "
                  "network (`metrics.second_eye_distance`). Aims (issue #12): accuracy at least "
                  f"{AIM_DIGIT_ACC:.0%}, FID at most {AIM_FID_RATIO}x real-vs-real.", "",
                  "| images | accuracy | classifier-FID | second eye |", "| --- | --- | --- | --- |",
                  f"| real held-out digits | {mn['digit_acc_real']:.3f} | {mn['fid_real']:.1f} | - |",
                  f"| their `mnist-f4` reconstructions | {mn['digit_acc_recon']:.3f} | {mn['fid_recon']:.1f} "
                  f"| {mn['eye_recon']:.2f} |",
                  f"| real vs real (two disjoint sets of {mn['n']}) | - | {mn['fid_real_vs_real']:.1f} "
                  f"| {mn['eye_real_vs_real']:.2f} |", ""]
    co = report["runs"].get("colored-f4", {}).get("metrics")
    if co:
        lines += ["## Prompt adherence of reconstructions (colored-f4)", "",
                  "`adherence.prompt_adherence` on the 500 held-out ColoredDigits(\"test\") images and their "
                  "captions. The reconstruction rows are a reference for a latent text-to-image model, not a "
                  "ceiling (guided samples can score above them): scored with the statistics fitted on real "
                  "train images (the "
                  "ones generated images are scored with; the aim, at least "
                  f"{AIM_ADHERENCE:.0%} all three right) and refitted on reconstructed train images "
                  "(`fit_adherence(transform=reconstruction)`).", "",
                  "| images | statistics fitted on | digit | colour | background | all three |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, key, fit in (("real", "adherence_real", "real train images"),
                                ("reconstructed", "adherence_recon_real_stats", "real train images"),
                                ("reconstructed", "adherence_recon", "reconstructed train images")):
            a = co[key]
            if a is None:
                lines.append(f"| {label} | {fit} | failed (see the script's output) | | | |")
                continue
            lines.append(f"| {label} | {fit} | {a['digit_acc']:.3f} | {a['color_acc']:.3f} "
                         f"| {a['background_acc']:.3f} | {a['all_acc']:.3f} |")
        lines += ["", f"Ink floor (the brightest background pixel) of the refit: {co.get('ink_floor_recon', float('nan')):.3f}, "
                  f"against {co.get('ink_floor_real', float('nan')):.3f} on real images.", ""]
    lines += ["## Aims met?", ""] + [f"- `{name}`: " + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in
                                                                    aims(name, r["metrics"]).items())
                                      for name, r in report["runs"].items()] + [""]
    lines += ["## Loading", "", "```python", "from ldm_scratch.pretrained import load_autoencoder",
              "ae = load_autoencoder(\"colored-f4\")      # or \"mnist-f4\"",
              "z0 = ae.scale_latents(ae.encode(x).sample())  # (z - shift_factor) * scale_factor: (B, 3, 32, 32) -> (B, 4, 8, 8)",
              "x_rec = ae.decode(ae.unscale_latents(z0))", "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "stage1_weights"))
    p.add_argument("--steps", type=int, default=None, help="override every trained model's step count (the "
                   "discriminator starts at the same fraction); default: each recipe's own")
    p.add_argument("--seed", type=int, default=None, help="override every recipe's seed (a second-seed trial; "
                   "use with --no-install and its own --runs-dir)")
    p.add_argument("--skip-train", action="store_true", help="evaluate (and install) finished runs only")
    p.add_argument("--resume", action="store_true", help="continue each run from its checkpoint.pt")
    p.add_argument("--recipe", choices=sorted(set().union(*RECIPES.values())), default=None,
                   help="the recipe of every model run (RECIPES); default: each model's SHIPPED one")
    p.add_argument("--only", choices=sorted(RECIPES), nargs="+", default=None,
                   help="train and evaluate only these; the others' entries come from RUNS_DIR/report.json")
    p.add_argument("--out-root", default=str(WEIGHTS_DIR), help="where the ae_*/ folders and README.md go")
    p.add_argument("--no-install", action="store_true", help="evaluate only: write RUNS_DIR/report.json and "
                   "RUNS_DIR/README.md, touch no weights folder (trials)")
    args = p.parse_args()
    runs_dir, out_root = Path(args.runs_dir), Path(args.out_root)
    names = args.only or list(RECIPES)
    missing = [name for name in names if (args.recipe or SHIPPED[name]) not in RECIPES[name]]
    if missing:
        p.error(f"--recipe {args.recipe}: no such recipe for {', '.join(missing)} "
                f"(theirs: {', '.join(sorted(set().union(*(RECIPES[n] for n in missing))))}); use --only")
    recipes = {name: RECIPES[name][args.recipe or SHIPPED[name]] for name in names}
    if args.seed is not None:
        recipes = {name: replace(r, seed=args.seed) for name, r in recipes.items()}
    steps = {name: args.steps or recipes[name].steps for name in names}
    previous = runs_dir / "report.json"
    earlier = read_json(previous)["runs"] if previous.is_file() else {}
    train_info = {name: recorded_train_info(runs_dir, name, recipes[name], steps[name]) for name in names}
    if not args.skip_train:
        train_info.update(train_all(runs_dir, recipes, steps, args.resume))
    torch.manual_seed(0)
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(resolve_precision("auto", "cpu")),
              "runs": {name: earlier[name] for name in RECIPES if name not in names and name in earlier}}
    for name in names:
        run_model = runs_dir / name / "model"
        model = AutoencoderKL.from_pretrained(run_model).eval()
        metrics = evaluate(name, model, runs_dir)
        half = abs(metrics["fp16_delta_db"]) < FP16_TOLERANCE_DB
        inst = None
        if not args.no_install:
            inst = install(name, run_model, half, out_root)
            # what ships is what we measured: reload it and check it reconstructs the same
            shipped = (load_autoencoder(name) if out_root.resolve() == WEIGHTS_DIR.resolve()
                       else AutoencoderKL.from_pretrained(out_root / autoencoder_folder(name).name).float().eval())
            x = heldout(name)[0]
            shipped_psnr = psnr(reconstruct(shipped, x), x)
            expected = metrics["fp16_psnr"] if half else metrics["psnr"]
            assert abs(shipped_psnr - expected) < 1e-3, (name, shipped_psnr, expected)
        report["runs"][name] = {"recipe": asdict(recipes[name]), **train_info[name],
                                "config": read_json(run_model / "config.json")["config"], "metrics": metrics,
                                "install": inst, "description": PRETRAINED_AUTOENCODERS[name][1]}
        print(f"{name}: PSNR {metrics['psnr']:.2f} dB (floor {metrics['floor_psnr']:.2f}), SSIM {metrics['ssim']:.3f} "
              f"(floor {metrics['floor_ssim']:.3f}); fp16 {metrics['fp16_delta_db']:+.4f} dB -> "
              f"{inst['dtype'] if inst else 'not installed'}", flush=True)
        for aim, ok in aims(name, metrics).items():
            print(f"  aim {aim}: {'met' if ok else 'NOT met'}", flush=True)
    atomic_json_save(report, previous)
    readme = (runs_dir if args.no_install else out_root) / "README.md"
    readme.write_text(render_readme(report))
    print(f"wrote {readme} and {previous}")


if __name__ == "__main__":
    main()
