"""Which stage-1 codec makes the better latent denoisers? Train the same two class-conditional denoisers on the
latents of each autoencoder and score their samples (issue #12: "re-measure everything downstream").

    python scripts/codec_downstream.py --codec plain=ldm_scratch/weights/ae_mnist_f4 \
        --codec residual=runs/trial_res/mnist-f4/model --codec residual-se=runs/trial_se/mnist-f4/model \
        --out runs/codec_downstream

For each codec: the latent U-Net (`text-latent` widths) and the DiT (`dit-small-latent`), each 3,000 steps of 64
on MNIST-5k with the package's training defaults (`train-diffusion --space latent`, one process at a time), then
500 samples (50 per digit) per setting: 30 DDIM steps at guidance 1.5, 2 and 3, and, at each model's best w by
classifier-FID, 8 DDIM steps and 50 stochastic DDIM (eta 1) steps. Each row: conditional accuracy, classifier-FID
and the second eye (metrics.second_eye_distance, a network no default was tuned on), beside their real-vs-real
floors at the same n. A finished run (OUT/NAME_DENOISER/pipeline) is scored, not retrained. Writes OUT/report.json
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm_scratch.checkpoint import atomic_json_save
from ldm_scratch.evaluation import eval_labels, reference_digits, score_digits
from ldm_scratch.metrics import real_vs_real_fid, second_eye_distance
from ldm_scratch.pipeline import LatentDiffusionPipeline

DENOISERS = {"unet": "text-latent", "dit": "dit-small-latent"}
GUIDANCE = (1.5, 2.0, 3.0)


def train(name: str, ae: str, denoiser: str, out: Path, steps: int, seed: int) -> float:
    """Train one denoiser on one codec's latents (skipped when its pipeline exists); returns the minutes."""
    if (out / "pipeline" / "model_index.json").is_file():
        return float("nan")
    cmd = [sys.executable, "-m", "ldm_scratch", "train-diffusion", "--space", "latent", "--autoencoder", ae,
           "--data", "mnist5k", "--conditioning", "class", "--denoiser", denoiser, "--preset", DENOISERS[denoiser],
           "--steps", str(steps), "--batch-size", "64", "--seed", str(seed), "--eval-per-class", "0",
           "--sample-every", "0", "--out", str(out)]
    print(f"== {name} {denoiser}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return (time.time() - start) / 60


def score(pipe: LatentDiffusionPipeline, steps: int, w: float, eta: float, per_class: int) -> dict:
    labels = eval_labels(per_class)
    x = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=w, sampler="ddim", eta=eta,
             output_type="tensor", generator=torch.Generator().manual_seed(0)).images.cpu()
    return {"steps": steps, "w": w, "eta": eta, **score_digits(x, labels),
            "eye": second_eye_distance(x, reference_digits(len(labels)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", action="append", required=True, help="NAME=AUTOENCODER_FOLDER (repeat)")
    p.add_argument("--denoisers", nargs="+", default=list(DENOISERS), choices=list(DENOISERS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    codecs = dict(c.split("=", 1) for c in a.codec)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 10 * a.per_class
    floors = {"fid": real_vs_real_fid(n), "eye": real_vs_real_fid(n, eye=second_eye_distance)}
    report = {"floors": floors, "steps": a.steps, "seed": a.seed, "runs": {}}
    for name, ae in codecs.items():
        for denoiser in a.denoisers:
            run = out / f"{name}_{denoiser}"
            minutes = train(name, ae, denoiser, run, a.steps, a.seed)
            pipe = LatentDiffusionPipeline.from_pretrained(run / "pipeline")
            rows = [score(pipe, 30, w, 0.0, a.per_class) for w in GUIDANCE]
            best = min(rows, key=lambda r: r["fid"])["w"]
            rows += [score(pipe, 8, best, 0.0, a.per_class), score(pipe, 50, best, 1.0, a.per_class)]
            report["runs"][f"{name}_{denoiser}"] = {"codec": ae, "denoiser": denoiser, "train_min": minutes,
                                                    "rows": rows}
            atomic_json_save(report, out / "report.json")
            for r in rows:
                print(f"{name:12s} {denoiser:4s} DDIM {r['steps']:2d} eta {r['eta']:g} w {r['w']:g}: acc "
                      f"{r['cond_acc']:.3f} FID {r['fid']:.1f} (floor {floors['fid']:.1f}) eye {r['eye']:.2f} "
                      f"(floor {floors['eye']:.2f})", flush=True)
    print(f"\n| codec | denoiser | DDIM 30, w = {' / '.join(f'{w:g}' for w in GUIDANCE)}: acc / FID / eye | best w: "
          f"DDIM 8 | DDIM 50, eta 1 |")
    print("| --- | --- | --- | --- | --- |")
    for key, run in report["runs"].items():
        rows = run["rows"]
        cell = lambda r: f"{r['cond_acc']:.3f} / {r['fid']:.1f} / {r['eye']:.2f}"
        print(f"| {key.rsplit('_', 1)[0]} | {run['denoiser']} | {'; '.join(cell(r) for r in rows[:3])} | "
              f"{cell(rows[3])} | {cell(rows[4])} |")
    print(f"(real vs real at n = {n}: FID {floors['fid']:.1f}, eye {floors['eye']:.2f})")


if __name__ == "__main__":
    main()
