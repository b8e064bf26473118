"""Stage-2 U-Net cost in pixel space, fp32 vs bf16 autocast, measured in one run.

Two numbers per preset, on MNIST-shaped 1 x 32 x 32 inputs:
  - training throughput: one full step of train.py's Trainer.train_step (forward, L_simple, backward,
    gradient clipping, AdamW, EMA update) on a batch of 64, in images per second;
  - sampling time: 64 class-conditional images with 30 DDIM steps under classifier-free guidance,
    i.e. 30 forwards of a batch of 128 ([cond; null] stacked, diffusion.guided_eps).
Random images: the speed of a convolution does not depend on what the pixels show.

    python benchmarks/bench_unet.py [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from ldm_scratch.__main__ import machine_info
from ldm_scratch.bench_timing import sync, trainer_items_per_second
from ldm_scratch.config import UNET_PRESETS, DiffusionConfig, TrainConfig, get_preset
from ldm_scratch.device import cpu_supports_bf16, default_device
from ldm_scratch.stage2 import DiffusionTask, generate
from ldm_scratch.train import Trainer

PRESETS = ("small", "tiny")
BATCH = 64           # the teaching run's batch
N_SAMPLES = 64       # a grid's worth of samples
SAMPLE_STEPS = 30    # DDIM steps, as in the grids and the evaluation


def build(preset: str, precision: str) -> tuple[DiffusionTask, Trainer, torch.Tensor, tempfile.TemporaryDirectory]:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset(UNET_PRESETS, preset, "U-Net"), num_classes=10)
    task = DiffusionTask(cfg, DiffusionConfig(), precision=precision)
    data = torch.utils.data.TensorDataset(torch.rand(BATCH, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (BATCH,)))
    tmp = tempfile.TemporaryDirectory()
    trainer = Trainer(task, TrainConfig(batch_size=BATCH, precision=precision), data, tmp.name)
    return task, trainer, data.tensors, tmp


def train_images_per_second(trainer: Trainer, batch: tuple, steps: int, warmup: int) -> float:
    trainer.task.unet.train()
    return trainer_items_per_second(trainer, batch, steps, warmup)


def sample_seconds(task: DiffusionTask, device: torch.device, steps: int) -> float:
    labels = torch.arange(10).repeat(N_SAMPLES // 10 + 1)[:N_SAMPLES]   # (64,) a mix of classes
    g = torch.Generator(device).manual_seed(0)
    generate(task.unet, task.diffusion, labels, num_steps=1, guidance_scale=3.0, generator=g,
             precision=task.precision)  # warm-up: first-call allocations and kernel selection
    sync(device)
    start = time.perf_counter()
    generate(task.unet, task.diffusion, labels, num_steps=steps, guidance_scale=3.0, generator=g,
             precision=task.precision)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed training steps (not 10) and 5 DDIM steps (not 30)")
    args = p.parse_args()
    steps, warmup, ddim_steps = (2, 1, 5) if args.quick else (10, 2, SAMPLE_STEPS)
    precisions = ["fp32", "bf16"] if default_device().type == "cuda" or cpu_supports_bf16() else ["fp32"]
    print(f"machine: {machine_info(' vs '.join(precisions))}")
    print(f"train: batch {BATCH} x 1 x 32 x 32, one full Trainer step; sample: {N_SAMPLES} images, "
          f"{ddim_steps} DDIM steps with guidance (batch {2 * N_SAMPLES} per forward)")
    print(f"{'preset':<7} {'params':>8} {'precision':>9} {'train img/s':>12} {'s/step':>7} {'sample s':>9} "
          f"{'train x':>8} {'sample x':>9}")  # x: speed relative to fp32
    for preset in PRESETS:
        base = None
        for precision in precisions:
            task, trainer, batch, tmp = build(preset, precision)
            ips = train_images_per_second(trainer, batch, steps, warmup)
            secs = sample_seconds(task, trainer.device, ddim_steps)
            tmp.cleanup()
            base = base or (ips, secs)
            print(f"{preset:<7} {task.unet.num_params() / 1e6:>7.2f}M {precision:>9} {ips:>12.1f} "
                  f"{BATCH / ips:>7.3f} {secs:>9.2f} {ips / base[0]:>7.2f}x {base[1] / secs:>8.2f}x")
    if len(precisions) == 1:
        print("(this CPU has no native bf16: autocast would emulate it, so it is not measured)")
    if args.quick:
        print(f"(--quick: sampling timed over {ddim_steps} steps; x{SAMPLE_STEPS / ddim_steps:.0f} for 30)")


if __name__ == "__main__":
    main()
