"""Training step of the two latent denoisers: eager vs `torch.compile` with and without inductor's pattern passes.

    python scripts/compile_step_times.py --threads 2          # give it an idle machine

One class-conditional training step as the Trainer takes it (bench_profile.train_step: batch 64 of 4 x 8 x 8
latents, bf16 autocast, the DDPM loss, backward, gradient clipping, fused AdamW, EMA) of the U-Net (`text-latent`
widths) and the DiT (`dit-small-latent`), through device.CompiledForTraining as `train-diffusion --compile` runs it. Each cell is a fresh process (dynamo keeps one compiled graph per model and
would not recompile for a config change); the first step (compiling included) is reported on its own, the step
time is the median of the rest. "patterns on" is what `--compile` did before 2026-12-08: inductor's pattern passes
rewrote layers.attention into PyTorch's fused attention kernel.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("eager", "compiled, patterns on", "compiled, patterns off (default)")


def one_cell(which: str, mode: str, steps: int) -> dict:
    """Runs in the child process: times `steps` training steps (bench_profile.train_step: the Trainer's step)."""
    import torch
    from ldm_scratch.bench_profile import train_step
    from ldm_scratch.bench_timing import median_ms
    from ldm_scratch.config import DIT_PRESETS, UNET_PRESETS
    from ldm_scratch.device import CompiledForTraining
    from ldm_scratch.diffusion import GaussianDiffusion
    from ldm_scratch.dit import DiT
    from ldm_scratch.unet import UNet
    torch.manual_seed(0)
    diffusion = GaussianDiffusion()
    model = (UNet(dataclasses.replace(UNET_PRESETS["text-latent"](), num_classes=10)) if which == "unet"
             else DiT(dataclasses.replace(DIT_PRESETS["dit-small-latent"](), num_classes=10)))
    patterns = mode.startswith("compiled, patterns on")
    forward = model if mode == "eager" else CompiledForTraining(model, verbose=False, inductor_patterns=patterns)
    batch = (torch.randn(64, 4, 8, 8), torch.randint(0, 10, (64,)))
    step = train_step(forward, batch, lambda m, b: diffusion.loss(m, *b), torch.device("cpu"), "bf16")
    start = time.perf_counter()
    step()  # the first step: compiling included
    first = time.perf_counter() - start
    ms = median_ms(step, warmup=9, reps=steps - 10, device=torch.device("cpu"))
    with torch.no_grad():
        loss = diffusion.loss(model, *batch, generator=torch.Generator().manual_seed(0))  # after the steps
    return {"first_s": first, "ms": ms, "loss": loss.item()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=1, help="each cell this many times, alternating (median kept)")
    p.add_argument("--cell", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args(argv)
    if args.cell:
        print(json.dumps(one_cell(args.cell[0], args.cell[1], args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for which in ("unet", "dit"):
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--cell", which, mode],
                                     env=env, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results.setdefault((which, mode), []).append(r)
                print(f"{which}, {mode}: {r['ms']:.1f} ms/step, first step {r['first_s']:.1f} s", flush=True)
    print(f"\n{args.threads} thread(s), batch 64, bf16 autocast, clipping, fused AdamW, EMA; "
          "ms per step (median; first step incl. compiling)")
    print("| denoiser | " + " | ".join(MODES) + " |")
    print("| --- |" + " --- |" * len(MODES))
    for which in ("unet", "dit"):
        cells = []
        for mode in MODES:
            rs = results[(which, mode)]
            ms = statistics.median_high(r["ms"] for r in rs)
            first = statistics.median_high(r["first_s"] for r in rs)
            cells.append(f"{ms:.1f} ms" + ("" if mode == "eager" else f" (first {first:.0f} s)"))
        print(f"| {which} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
