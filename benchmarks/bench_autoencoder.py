"""Stage-1 training throughput, fp32 vs bf16 autocast, measured in one run.

One step is the full stage-1 step after disc_start: autoencoder forward + backward with the L1 +
perceptual + KL + adaptive-weighted GAN loss, then the discriminator's own forward + backward, both
optimizers stepped (train.py's Trainer.train_step, exactly what a real run does). Random images:
the speed of a convolution does not depend on what the pixels show.

    python benchmarks/bench_autoencoder.py [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ldm_scratch.__main__ import machine_info
from ldm_scratch.config import AUTOENCODER_PRESETS, LossConfig, TrainConfig, get_preset
from ldm_scratch.device import cpu_supports_bf16, default_device
from ldm_scratch.stage1 import AutoencoderTask
from ldm_scratch.train import Trainer

# (preset, image size, batch size): the demo's two autoencoders at their training shapes.
CASES = [("small-f8", 64, 16), ("small-f4", 32, 32)]


def images_per_second(preset: str, size: int, batch: int, precision: str, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    ae_cfg = get_preset(AUTOENCODER_PRESETS, preset, "autoencoder")
    task = AutoencoderTask(ae_cfg, LossConfig(disc_start=0))  # discriminator on from step 0
    data = torch.utils.data.TensorDataset(torch.rand(batch, ae_cfg.in_channels, size, size) * 2 - 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(task, TrainConfig(batch_size=batch, precision=precision, ema_decay=0.0), data, tmp)
        x = data.tensors[0].to(trainer.device)
        for m in task.modules().values():
            m.train()
        for i in range(warmup + steps):
            if i == warmup:
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            trainer.step = i
            trainer.train_step((x,))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed steps instead of 10")
    args = p.parse_args()
    steps, warmup = (2, 1) if args.quick else (10, 2)
    bf16_ok = default_device().type == "cuda" or cpu_supports_bf16()
    print(f"machine: {machine_info('fp32 vs bf16')}")
    print(f"{'preset':<10} {'image':>6} {'batch':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>9}")
    for preset, size, batch in CASES:
        fp32 = images_per_second(preset, size, batch, "fp32", steps, warmup)
        bf16 = images_per_second(preset, size, batch, "bf16", steps, warmup) if bf16_ok else float("nan")
        print(f"{preset:<10} {size:>4}px {batch:>5} {fp32:>11.1f} {bf16:>11.1f} {bf16 / fp32:>8.2f}x")
    if not bf16_ok:
        print("(this CPU has no native bf16: autocast would emulate it, so it is not measured)")


if __name__ == "__main__":
    main()
