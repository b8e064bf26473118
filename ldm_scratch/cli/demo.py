"""`python -m ldm_scratch demo`: the main job, text-to-image latent diffusion trained from nothing on the
shipped captioned coloured digits (Rombach et al. 2022: stage 1 Sec. 3, stage 2 Sec. 3.3 and 4.3).

  1. stage 1   a KL autoencoder, 3 x 32 x 32 -> 4 x 8 x 8: by default the shipped `colored-f4` (pretrained.py;
               residual, trained by scripts/train_stage1_weights.py on the same data for 6,000 steps, about 40
               minutes on one thread, which a codec needs before its decoder draws the grass and gravel grain);
               `--stage1 train` trains a fresh small-f4 here in ~3 minutes instead (train-autoencoder --data colored)
  2. stage 2   a text-conditioned latent U-Net on the cached latents, its text encoder trained jointly,
               captions dropped to "" with p_uncond 0.1 for classifier-free guidance
                                                   (train-diffusion --space latent --conditioning text)
  3. results   the pipeline (OUT/denoiser/pipeline), a grid of fixed prompts (a row each), a guidance
               sweep of prompt adherence beside the autoencoder's reconstructions, a check of the best
               guidance with other samplers, report.md + report.json
Each phase runs the command a user would type; the step counts are sized from measured step times, and
--max-minutes per phase is the safety net on a slower machine. The stage-1 photo showcase that used to be
this command is `demo-autoencoders` (cli/stage1.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ldm_scratch.cli import Command
from ldm_scratch.cli.stage1 import machine_info, train_autoencoder, train_autoencoder_parser

# Every attribute varies down the rows (digit, colour, background), so the grid shows which words took.
PROMPTS = ("a red 7 on grass", "a blue 1 on plain", "a green 3 on brick", "a yellow 0 on gravel",
           "a magenta 4 on plain", "a white 8 on grass", "a cyan 2 on gravel", "an orange 9 on brick")
GUIDANCE = (1.0, 2.0, 3.0, 5.0)   # the sweep: 1 = no guidance; LDM's text-to-image samples use 1.5-10
# Full mode, for about 11 minutes on 2 idle cores with bf16 (10.2 measured on the Intel box; on an AVX2-only CPU,
# fp32, the 13-minute cap ends stage 2 early: 16.4 in all, README). Step times measured on ONE core shared with other jobs:
# small-f4 on coloured digits 0.9 s per step of 32 (1.6 s once the discriminator joins), bf16;
# the text-latent U-Net 0.6 s per step of 64 in fp32 (bf16 autocast is 1.3x faster since layers.attention's
# fp32-softmax matmuls, commit 0cdadc1, so "auto" = bf16 here). An idle machine
# runs about twice as fast, which the step counts assume; the minutes cap each phase if it does not.
# perceptual_weight 0.1, not 1: the default perceptual net learned on grey digits and photos hardly sees
# colour, and at weight 1 it drowned the colour-aware L1 term (magenta came back blue; 16.2 dB, under the
# 19.2 dB non-learned floor); at 0.1 the colours are right (ldm_scratch/weights/README.md, colored-f4).
AE_RUN = {"preset": "small-f4", "steps": 700, "batch": 32, "disc_start": 500, "minutes": 7.0,
          "perceptual_weight": 0.1}
# No optimiser or EMA flags: the U-Net's measured defaults (stage2.DENOISER_TRAIN_DEFAULTS: lr 5e-4, EMA with
# warm-up), the ones a user's own train-diffusion run gets.
# With the shipped autoencoder (the default) stage 2 also gets stage 1's ~3 minutes: 4,000 steps instead of 3,000.
DENOISER_RUN = {"preset": "text-latent", "steps": 4000, "batch": 64, "minutes": 13.0}
DENOISER_STEPS_AFTER_TRAINING_STAGE1 = (3000, 10.0)  # --stage1 train: steps, minute cap
EVAL = {"per_digit": 10, "steps": 30, "images_per_prompt": 8}   # 100 held-out captions per guidance value
# At the sweep's best guidance, the same captions through other samplers: a model whose deterministic DDIM gets
# worse with more steps carries a systematic error in its noise prediction (a stale EMA did exactly that).
SAMPLER_CHECK = (("ddim", 30, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0))
# --quick: about 2 minutes in all (the tests' run); the models are then barely trained, the files all there.
QUICK_STEPS, QUICK_MINUTES = 0.05, 0.5
QUICK_EVAL = {"per_digit": 2, "steps": 10, "images_per_prompt": 4}


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="about 2 minutes in all instead of about 11")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--stage1", choices=("shipped", "train"), default="shipped",
                   help="the autoencoder: the shipped colored-f4 (default; trained for about 40 minutes by "
                        "scripts/train_stage1_weights.py) or one trained here from scratch in about 3 minutes")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (tests use 0.1)")
    p.add_argument("--minutes-scale", type=float, default=1.0,
                   help="multiply every phase's time cap (on a machine shared with other jobs: the same steps, "
                        "so the same results, just later)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted demo in --out: each training phase resumes from its checkpoint "
                        "(a finished one only reloads); the results are recomputed")


def resume_flag(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """["--resume"] for a phase whose run folder holds a checkpoint when the demo resumes; else [] (that phase
    had not started: it trains from scratch)."""
    return ["--resume"] if args.resume and (run_dir / "checkpoint.pt").is_file() else []


def demo(args: argparse.Namespace) -> dict:
    """Train both stages, sample, sweep the guidance scale, write report.md and report.json."""
    from ldm_scratch.cli.stage2 import add_train_diffusion
    from ldm_scratch.cli.stage3 import train_latent
    from ldm_scratch.evaluation import heldout_captions, reconstruction
    out, quick = Path(args.out), args.quick
    scale = args.steps_scale * (QUICK_STEPS if quick else 1.0)
    steps = lambda n: max(2, int(n * scale))  # noqa: E731
    if not args.minutes_scale > 0:
        raise ValueError(f"--minutes-scale must be > 0; got {args.minutes_scale}")
    minutes = lambda m: (QUICK_MINUTES if quick else m) * args.minutes_scale  # noqa: E731
    ev = QUICK_EVAL if quick else EVAL
    report: dict[str, Any] = {"quick": quick, "phases": {}, "prompts": list(PROMPTS)}
    clock = time.time()

    def phase(name: str) -> None:  # seconds since the last phase ended
        nonlocal clock
        report["phases"][name] = round(time.time() - clock, 1)
        clock = time.time()

    # 1. stage 1 ---------------------------------------------------------------------------------------
    if args.stage1 == "shipped":
        from ldm_scratch.pretrained import autoencoder_folder, load_autoencoder
        ae_folder = autoencoder_folder("colored-f4")
        print(f"\n== stage 1: the shipped colored-f4 autoencoder ({ae_folder}); --stage1 train trains one here")
        ae = load_autoencoder("colored-f4")
        report["autoencoder"] = {"preset": "colored-f4 (shipped)", "scale_factor": ae.scale_factor,
                                 **heldout_reconstruction(ae, out)}
        phase("stage 1: autoencoder (shipped)")
    else:
        a = AE_RUN
        n = steps(a["steps"])
        ae_folder = out / "autoencoder" / "model"
        argv = ["--preset", a["preset"], "--data", "colored", "--steps", str(n), "--batch-size", str(a["batch"]),
                "--disc-start", str(max(1, int(a["disc_start"] * n / a["steps"]))),
                "--perceptual-weight", str(a["perceptual_weight"]), "--max-minutes",
                str(minutes(a["minutes"])), "--sample-every", str(max(1, n // 4)), "--ckpt-every", str(max(1, n // 4)),
                "--out", str(out / "autoencoder")] + resume_flag(args, out / "autoencoder")
        print(f"\n== stage 1: train-autoencoder {' '.join(argv)}")
        res = train_autoencoder(train_autoencoder_parser().parse_args(argv))
        ae = res.pop("task").ae.eval()
        report["autoencoder"] = {"preset": a["preset"], **res, **heldout_reconstruction(ae, out)}
        phase("stage 1: autoencoder")

    # 2. stage 2 ---------------------------------------------------------------------------------------
    d = dict(DENOISER_RUN)
    if args.stage1 == "train":
        d["steps"], d["minutes"] = DENOISER_STEPS_AFTER_TRAINING_STAGE1
    n = steps(d["steps"])
    argv = ["train-diffusion", "--space", "latent", "--autoencoder", str(ae_folder),
            "--data", "colored", "--conditioning", "text", "--denoiser", "unet", "--preset", d["preset"],
            "--p-uncond", "0.1", "--steps", str(n), "--batch-size", str(d["batch"]), "--precision", "auto",
            "--max-minutes", str(minutes(d["minutes"])),
            "--sample-every", str(0 if quick else max(1, n // 3)), "--ckpt-every", str(max(1, n // 6)),
            "--sample-steps", str(ev["steps"]), "--out", str(out / "denoiser")] + resume_flag(args, out / "denoiser")
    print(f"\n== stage 2: {' '.join(argv)}")
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch train-diffusion")
    add_train_diffusion(parser)
    res = train_latent(parser.parse_args(argv[1:]))
    report["denoiser"] = {"preset": d["preset"], **res}
    phase("stage 2: latents + denoiser")

    # 3. results ---------------------------------------------------------------------------------------
    from ldm_scratch.adherence import fit_adherence
    from ldm_scratch.evaluation import adherence_at, adherence_stats, score_adherence
    from ldm_scratch.pipeline import LatentDiffusionPipeline
    from ldm_scratch.train import save_image_grid
    pipe = LatentDiffusionPipeline.from_pretrained(res["pipeline"])
    k, w0 = ev["images_per_prompt"], 3.0
    x = pipe(prompt=list(PROMPTS), num_images=k, num_inference_steps=ev["steps"], guidance_scale=w0,
             generator=torch.Generator().manual_seed(0), output_type="tensor", precision="auto").images
    save_image_grid(list(x.view(len(PROMPTS), k, *x.shape[1:])), out / "prompts.png",  # (P k, ...) -> P rows
                    title=f"a row per prompt (report.md lists them); DDIM {ev['steps']} steps, guidance {w0:g}")
    phase("prompt grid")
    rec = reconstruction(pipe.autoencoder)
    # the second eye: the same samples scored with the statistics of real images, which no decoder shaped
    real_stats = fit_adherence()
    # fitted on reconstructions: the decoder renders every sample. It decodes all 4,500 train images (~45 s in
    # fp32 on 2 cores), so quick mode, whose barely trained model is not worth it, keeps the real images' ones.
    stats = real_stats if quick else adherence_stats(rec)
    report["adherence_stats"] = "real images" if stats.ink_floor == real_stats.ink_floor else "reconstructions"
    captions, real = heldout_captions(ev["per_digit"])
    report["reconstructions"] = score_adherence(rec(real), captions, stats, second_stats=real_stats)
    report["sweep"] = [{"guidance_scale": w, **adherence_at(pipe, captions, w, stats, ev["steps"], 0, "auto",
                                                             second_stats=real_stats)}
                       for w in GUIDANCE]
    plot_sweep(report["sweep"], report["reconstructions"], out / "guidance_sweep.png")
    phase("guidance sweep")
    best = max(report["sweep"], key=lambda r: r["all_acc"])["guidance_scale"]
    report["samplers"] = [{"guidance_scale": best, "sampler": s, "steps": k if not quick else ev["steps"], "eta": eta,
                           **adherence_at(pipe, captions, best, stats, k if not quick else ev["steps"], 0, "auto",
                                          sampler=s, eta=eta, second_stats=real_stats)}
                          for s, k, eta in SAMPLER_CHECK]
    phase("sampler check")
    report["sweep_steps"] = ev["steps"]
    report["machine"] = machine_info(report["denoiser"].get("precision", "?"))
    report["minutes_total"] = round(sum(report["phases"].values()) / 60, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_report(report))
    print((out / "report.md").read_text())
    return report


def heldout_reconstruction(ae: Any, out: Path) -> dict:
    """PSNR/SSIM of 256 held-out coloured digits against the non-learned floor; a grid of ten of them."""
    from ldm_scratch.evaluation import reconstruction
    from ldm_scratch.data import ColoredDigits
    from ldm_scratch.metrics import psnr, ssim
    from ldm_scratch.stage1 import floor_reconstruction, stack_images
    from ldm_scratch.train import save_image_grid
    x = stack_images(ColoredDigits("test"), 256)
    x_rec, floor = reconstruction(ae)(x), floor_reconstruction(x, ae.cfg.f)
    show = slice(None, None, len(x) // 10)  # spread over the split, which is sorted by digit
    save_image_grid([x[show], x_rec[show], floor[show]], out / "autoencoder_heldout.png",
                    title="held-out coloured digits: input / autoencoder / area+bicubic floor")
    return {"heldout_psnr": psnr(x_rec, x), "heldout_ssim": ssim(x_rec, x),
            "floor_psnr": psnr(floor, x), "floor_ssim": ssim(floor, x)}


def plot_sweep(sweep: list[dict], reconstructions: dict, path: Path) -> None:
    """Adherence per attribute vs guidance scale, each with the autoencoder's reconstructions of the same
    captions' real images as a dashed line of the same colour (a reference, not a bound: see stage3.py)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ws = [r["guidance_scale"] for r in sweep]
    for key, color in (("digit_acc", "C0"), ("color_acc", "C1"), ("background_acc", "C2"), ("all_acc", "k")):
        ax.plot(ws, [r[key] for r in sweep], "o-", color=color, label=key.replace("_acc", ""))
        ax.axhline(reconstructions[key], color=color, ls="--", lw=0.8)
    ax.set(xlabel="guidance scale w", ylabel="share of samples right", ylim=(0, 1.02),
           title="prompt adherence (dashed: reconstructions of real images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_report(r: dict) -> str:
    m, a, d = r["machine"], r["autoencoder"], r["denoiser"]
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    second = lambda s: pct(s["second"]["all_acc"]) if "second" in s else "-"  # noqa: E731
    no_refit = "quick mode skips the refit on reconstructions" if r["quick"] else \
        "the decoder's reconstructions saturate background pixels, so no refit"
    stats_on = {"real images": f"real train images ({no_refit})", "reconstructions": "reconstructed train images (the decoder renders "
                               "every sample)"}.get(r.get("adherence_stats"), "reconstructed train images")
    lines = ["# ldm_scratch demo: text-to-image latent diffusion on captioned coloured digits", "",
             f"Machine: {m['cpu']} ({m['device']}{', ' + m['gpu'] if m['gpu'] else ''}), {m['threads']} threads, "
             f"torch {m['torch']}{' (quick mode: barely trained)' if r['quick'] else ''}; "
             f"{r['minutes_total']:.1f} minutes in all.", "",
             "| phase | seconds |", "| --- | --- |", *[f"| {k} | {v:.0f} |" for k, v in r["phases"].items()], "",
             (f"Stage 1: {a['preset']}, {a['steps']} steps in {a['minutes']:.1f} min ({a.get('precision', '?')}), "
              if "steps" in a else f"Stage 1: {a['preset']} (ldm_scratch/weights/README.md says how it was trained), ")
             + f"scale_factor {a.get('scale_factor', 0):.4f}; held-out PSNR {a['heldout_psnr']:.2f} dB, SSIM "
             f"{a['heldout_ssim']:.3f} (area+bicubic floor {a['floor_psnr']:.2f} dB, {a['floor_ssim']:.3f}).",
             f"Stage 2: {d['preset']} U-Net ({d['params'] / 1e6:.2f}M parameters) + text encoder, {d['steps']} "
             f"steps in {d['minutes']:.1f} min ({d['precision']}), p_uncond 0.1.", "",
             f"Prompt adherence of {r['reconstructions']['n']} held-out captions (one sample each, DDIM "
             f"{r['sweep_steps']} steps, eta 0) against guidance, beside the same captions' real images passed "
             "through the autoencoder (a reference: guided samples can score above it, since guidance pulls "
             "them towards typical images of their caption, while reconstructions keep each real image's "
             f"quirks). Scored with the adherence statistics fitted on {stats_on}; the last column scores the "
             "same images with the statistics of real images, a second eye no decoder shaped:", "",
             "| guidance | digit | colour | background | all three | all three, real-image statistics |",
             "| --- | --- | --- | --- | --- | --- |",
             *[f"| {s['guidance_scale']:g} | {pct(s['digit_acc'])} | {pct(s['color_acc'])} | "
               f"{pct(s['background_acc'])} | {pct(s['all_acc'])} | {second(s)} |" for s in r["sweep"]],
             f"| reconstructions | {pct(r['reconstructions']['digit_acc'])} | {pct(r['reconstructions']['color_acc'])} | "
             f"{pct(r['reconstructions']['background_acc'])} | {pct(r['reconstructions']['all_acc'])} | "
             f"{second(r['reconstructions'])} |", "",
             "The best guidance through other samplers (the same captions and seed):", "",
             "| sampler | guidance | digit | colour | background | all three | all three, real-image statistics |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             *[f"| {s['sampler'].upper()} {s['steps']} steps, eta {s['eta']:g} | {s['guidance_scale']:g} | "
               f"{pct(s['digit_acc'])} | {pct(s['color_acc'])} | {pct(s['background_acc'])} | {pct(s['all_acc'])} "
               f"| {second(s)} |" for s in r["samplers"]], "",
             "Files: `prompts.png` (a row per prompt: " + " | ".join(r["prompts"]) + "), `guidance_sweep.png`, "
             "`autoencoder_heldout.png`, `denoiser/pipeline/` (load with LatentDiffusionPipeline.from_pretrained, "
             "or `python -m ldm_scratch sample --model OUT/denoiser/pipeline --prompt \"a red 7 on grass\"`).", ""]
    return "\n".join(lines)


COMMANDS: dict[str, Command] = {
    "demo": (add_demo, demo, "the main job: both stages on captioned coloured digits, text-to-image, report.md"),
}
