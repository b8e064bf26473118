"""Training steps per minute at the command line's defaults, two checkouts side by side (issue #15's "2x today's").

    git worktree add /tmp/base15 5d32312       # the code of the day issue #15 was filed
    python scripts/train_rate_ab.py --trees /tmp/base15 . --threads 2

Each (tree, denoiser) runs `train-diffusion` twice in a fresh process, for --short and --long steps, with
everything else at that checkout's defaults (class-conditional, batch 64, mnist-f4 latents); the time per step is
(T_long - T_short) / (long - short), so start-up, latent encoding, compiling and the final sample grid cancel out.
Rounds alternate the trees (A, B, A, B, ...) so a drifting machine hurts both alike. Give the script an idle machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DENOISERS = {"unet": ["--denoiser", "unet", "--preset", "text-latent"],
             "dit": ["--denoiser", "dit", "--preset", "dit-small-latent"]}


def run_seconds(tree: Path, denoiser: str, steps: int, threads: int, extra: list[str],
                env_extra: dict[str, str] | None = None) -> float:
    """Wall seconds of one train-diffusion run of `steps` steps in `tree` (its own package, its own defaults)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "ldm_scratch", "train-diffusion", "--space", "latent",
               "--autoencoder", "ldm_scratch/weights/ae_mnist_f4", "--data", "mnist5k", "--conditioning", "class",
               *DENOISERS[denoiser], "--steps", str(steps), "--batch-size", "64", "--sample-every", "0",
               "--ckpt-every", str(10 * steps), "--out", out, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree), **(env_extra or {})}
        start = time.perf_counter()
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="checkouts to compare (the first is the baseline)")
    p.add_argument("--denoisers", nargs="+", choices=sorted(DENOISERS), default=["unet", "dit"])
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=600)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline-env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="environment for the FIRST tree's runs only (say, --trees . . --baseline-env "
                        "LDM_MALLOC_TUNING=0 to time one checkout with and without a setting)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more train-diffusion flags for the LAST tree only (say, --compile)")
    args = p.parse_args(argv)
    if args.long <= args.short:
        raise SystemExit(f"--long ({args.long}) must exceed --short ({args.short})")
    bad = [kv for kv in args.baseline_env if "=" not in kv or kv.startswith("=")]
    if bad:
        raise SystemExit(f"--baseline-env takes KEY=VALUE, got {bad}")
    baseline_env = dict(kv.split("=", 1) for kv in args.baseline_env)
    trees = [Path(t).resolve() for t in args.trees]
    ms: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for d in args.denoisers:
            for i, tree in enumerate(trees):
                extra = args.extra if i == len(trees) - 1 else []
                env_extra = baseline_env if i == 0 else None
                t_short = run_seconds(tree, d, args.short, args.threads, extra, env_extra)
                t_long = run_seconds(tree, d, args.long, args.threads, extra, env_extra)
                per_step = 1000 * (t_long - t_short) / (args.long - args.short)
                ms.setdefault((i, d), []).append(per_step)
                print(f"round {r + 1} {d} {tree}: {per_step:.1f} ms/step (runs {t_short:.1f} / {t_long:.1f} s)",
                      flush=True)
    print(f"\n{args.threads} thread(s); ms per training step of 64 (median over rounds); steps/min; "
          "ratio to the first tree")
    print("| denoiser | " + " | ".join(str(t) for t in trees) + " |")
    print("| --- |" + " --- |" * len(trees))
    for d in args.denoisers:
        meds = [statistics.median_high(ms[(i, d)]) for i in range(len(trees))]
        cells = [f"{m:.1f} ms ({60000 / m:.0f}/min, {meds[0] / m:.2f}x)" for m in meds]
        print(f"| {d} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
