"""Quality against the number of sampling steps, for three samplers, on one saved class-conditional pipeline
(README "Training defaults": the plot behind "more steps must not make samples worse").

    python scripts/sampler_steps.py runs/readme_unet/pipeline --out runs/readme_unet/sampler_steps

Deterministic DDIM (eta 0) and stochastic DDIM (eta 1) at 4, 8, 16, 30, 50 and 100 steps, and DDPM's full
1,000 ancestral steps; 20 samples per digit at guidance 3, the same seed for every row. Each row: conditional
accuracy, classifier-FID and the second eye (metrics.second_eye_distance), beside their real-vs-real floors
at the same n. Writes OUT.json and OUT.png (a panel per measure, the floors dashed).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_scratch.metrics import real_vs_real_fid, second_eye_distance
from ldm_scratch.pipeline import LatentDiffusionPipeline
from ldm_scratch.stage2 import eval_labels, reference_digits, score_digits

STEPS = (4, 8, 16, 30, 50, 100)
DDPM_STEPS = 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipeline")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, nargs="+", default=STEPS)
    p.add_argument("--no-ddpm", action="store_true", help="skip DDPM's 1,000 steps (the slow row)")
    a = p.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained(a.pipeline)
    labels = eval_labels(a.per_class)
    n = len(labels)
    floors = {"fid": real_vs_real_fid(n), "eye": real_vs_real_fid(n, eye=second_eye_distance)}
    runs = [("ddim", k, eta) for eta in (0.0, 1.0) for k in a.steps] + ([] if a.no_ddpm else [("ddpm", DDPM_STEPS, 1.0)])
    rows = []
    for sampler, k, eta in runs:
        start = time.time()
        x = pipe(class_labels=labels, num_inference_steps=k, guidance_scale=a.guidance, sampler=sampler, eta=eta,
                 output_type="tensor", generator=torch.Generator().manual_seed(0)).images
        row = {"sampler": sampler, "steps": k, "eta": eta, **score_digits(x, labels),
               "eye": second_eye_distance(x, reference_digits(n)), "eye_real_vs_real": floors["eye"],
               "seconds": time.time() - start}
        rows.append(row)
        print(f"{sampler} {k:4d} steps eta {eta:g}: acc {row['cond_acc']:.3f} FID {row['fid']:.1f} "
              f"(floor {floors['fid']:.1f}) eye {row['eye']:.2f} (floor {floors['eye']:.2f}) {row['seconds']:.0f} s",
              flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"pipeline": a.pipeline, "guidance": a.guidance, "n": n,
                                                    "floors": floors, "rows": rows}, indent=1))
    plot(rows, floors, out.with_suffix(".png"), title=f"{a.pipeline}: n = {n}, guidance {a.guidance:g}")


def plot(rows: list[dict], floors: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, name in zip(axes, ("cond_acc", "fid", "eye"),
                             ("conditional accuracy", "classifier-FID", "second eye (Frechet distance)")):
        for eta, style in ((0.0, "o-"), (1.0, "s--")):
            pts = [(r["steps"], r[key]) for r in rows if r["sampler"] == "ddim" and r["eta"] == eta]
            ax.plot(*zip(*pts), style, label=f"DDIM eta {eta:g}")
        ddpm = [r for r in rows if r["sampler"] == "ddpm"]
        if ddpm:
            ax.plot([ddpm[0]["steps"]], [ddpm[0][key]], "k*", ms=12, label="DDPM")
        if key in floors:
            ax.axhline(floors[key], color="grey", ls=":", label="real vs real")
        ax.set(xscale="log", xlabel="sampling steps", title=name)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
