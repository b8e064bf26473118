"""Time one AdamW step and one EMA update for the latent denoisers, per AdamW kernel (issue #15's breakdown).

    python scripts/optimizer_step_times.py            # one thread; prints a table (median of 30 steps each)

torch's AdamW updates one tensor at a time on a CPU unless asked otherwise; `train.make_adamw` takes the fused
kernel by default. Gradients are random (the optimizer's cost does not depend on their values).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ldm_scratch.config import DIT_PRESETS, UNET_PRESETS, TrainConfig, get_preset
from ldm_scratch.ema import EMA
from ldm_scratch.pipeline import build_denoiser
from ldm_scratch.train import make_adamw


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {"DiT dit-small-latent": ("dit", get_preset(DIT_PRESETS, "dit-small-latent")),
              "U-Net text-latent (class)": ("unet", dataclasses.replace(get_preset(UNET_PRESETS, "text-latent"),
                                                                       num_classes=10))}
    print(f"threads {args.threads}; median of {args.reps} steps; ms per optimizer step / EMA update")
    print(f"| model | params | tensors | AdamW loop | foreach | fused | fused / loop | EMA update |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (kind, cfg) in models.items():
        torch.manual_seed(0)
        m = build_denoiser(kind, cfg)
        for q in m.parameters():
            q.grad = torch.randn_like(q)
        ms = {impl: median_ms(make_adamw(m.parameters(), TrainConfig(adamw=impl)).step, args.reps)
              for impl in ("loop", "foreach", "fused")}
        ema = EMA(m, 0.9999)
        ema_ms = median_ms(lambda: ema.update(m), args.reps)
        print(f"| {name} | {sum(q.numel() for q in m.parameters()) / 1e6:.2f}M | {len(list(m.parameters()))} | "
              f"{ms['loop']:.1f} | {ms['foreach']:.1f} | {ms['fused']:.1f} | {ms['fused'] / ms['loop']:.2f} | "
              f"{ema_ms:.2f} |")


if __name__ == "__main__":
    main()
