"""DiT cost, measured in one run: training throughput fp32 vs bf16 autocast, and the paper's Gflops.

Two tables:
  - training throughput on 4 x 8 x 8 latents (the small-f4 autoencoder's MNIST latents), batch 64: one full
    step of train.py's Trainer.train_step (forward, L_simple with label dropout, backward, gradient clipping,
    AdamW, EMA update), in latents per second, for dit-small-latent and, as the drop-in it replaces,
    the U-Net's small-latent preset. Random latents: the speed of a matmul does not depend on the values.
  - forward Gflops of the paper's DiT-S/B/L/XL at /2, /4, /8 for one 256 x 256 image (latent 4 x 32 x 32),
    from metrics.count_flops (torch's FlopCounterMode, which counts a multiply-add as 2 flops), halved:
    the paper's Gflops are multiply-adds (1 FMA = 1 flop; halving reproduces its Table 4 to 4 digits).
    The models are built on the meta device: shapes only, nothing allocated, nothing run.

    python benchmarks/bench_dit.py [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile

import torch
from torch import nn

from ldm_scratch.__main__ import machine_info
from ldm_scratch.bench_timing import trainer_items_per_second
from ldm_scratch.config import DIT_PRESETS, UNET_PRESETS, DiffusionConfig, get_preset
from ldm_scratch.device import cpu_supports_bf16, default_device
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.dit import DiT
from ldm_scratch.metrics import count_flops
from ldm_scratch.stage2 import diffusion_train_config, draw_step_noise
from ldm_scratch.train import Trainer
from ldm_scratch.unet import UNet

BATCH = 64            # the teaching run's batch
LATENT = (4, 8, 8)    # small-f4 autoencoder: 1 x 32 x 32 digits -> 4 x 8 x 8
NUM_CLASSES = 10
P_UNCOND = 0.1        # label dropout for classifier-free guidance, as stage 2
# Peebles & Xie 2023: forward Gflops of the /2 models at 256 x 256 (Table 4; XL/2's 118.6 also in Table 2).
PAPER_GFLOPS = {"S": 6.06, "B": 23.0, "L": 80.7, "XL": 118.6}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}  # Table 1 / Fig. 2, at /2


class LatentTimingTask:
    """The smallest train.py task for an eps-model with the UNet interface: L_simple with label dropout,
    noise drawn as stage 2 draws it. Enough to time a training step; it samples and saves nothing."""

    def __init__(self, model: nn.Module):
        self.model, self.diffusion = model, GaussianDiffusion(DiffusionConfig())

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)}

    def loss(self, name: str, batch, step: int) -> tuple[torch.Tensor, dict]:
        z0, labels = batch
        t, eps, coin = draw_step_noise(0, step, z0, self.diffusion.T)
        cond = torch.where(coin < P_UNCOND, torch.full_like(labels, self.model.null_class), labels)
        return self.diffusion.loss(self.model, z0, cond, t=t, eps=eps), {}

    def ema_module(self) -> nn.Module:
        return self.model

    def config_dict(self) -> dict:
        return {}


def build_model(name: str) -> nn.Module:
    if name == "dit-small-latent":
        return DiT(dataclasses.replace(get_preset(DIT_PRESETS, name), num_classes=NUM_CLASSES))
    return UNet(dataclasses.replace(get_preset(UNET_PRESETS, "small-latent", "U-Net"), num_classes=NUM_CLASSES))


def train_latents_per_second(name: str, precision: str, steps: int, warmup: int) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model(name)
    data = torch.utils.data.TensorDataset(torch.randn(BATCH, *LATENT), torch.randint(0, NUM_CLASSES, (BATCH,)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(LatentTimingTask(model), diffusion_train_config(batch_size=BATCH, precision=precision),
                          data, tmp)
        rate = trainer_items_per_second(trainer, data.tensors, steps, warmup)
    return rate, model.num_params()


def paper_gflops(size: str, P: int) -> tuple[float, float]:
    """(forward Gflops as multiply-adds, parameters in millions) of DiT-size/P at 256 x 256, batch 1."""
    with torch.device("meta"):
        model = DiT(get_preset(DIT_PRESETS, f"DiT-{size}/{P}"))
        z, t = torch.empty(1, 4, 32, 32), torch.zeros(1, dtype=torch.long)
    # cond=None: the null label, same cost as any label (a meta tensor has no values to range-check)
    return count_flops(model, z, t, None) / 2 / 1e9, model.num_params() / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 timed training steps (not 20)")
    args = p.parse_args()
    steps, warmup = (3, 1) if args.quick else (20, 3)
    precisions = ["fp32", "bf16"] if default_device().type == "cuda" or cpu_supports_bf16() else ["fp32"]
    print(f"machine: {machine_info(' vs '.join(precisions))}")
    print(f"train: batch {BATCH} x {' x '.join(map(str, LATENT))} latents, one full Trainer step, "
          f"{steps} timed after {warmup} warm-up")
    print(f"{'model':<17} {'params':>7} {'precision':>9} {'latents/s':>10} {'ms/step':>8} {'x fp32':>7}")
    for name in ("dit-small-latent", "unet small-latent"):
        base = None
        for precision in precisions:
            lps, n = train_latents_per_second(name, precision, steps, warmup)
            base = base or lps
            print(f"{name:<17} {n / 1e6:>6.2f}M {precision:>9} {lps:>10.0f} {1000 * BATCH / lps:>8.1f} "
                  f"{lps / base:>6.2f}x")
    if len(precisions) == 1:
        print("(this CPU has no native bf16: autocast would emulate it, so it is not measured)")

    print("\nforward Gflops (multiply-adds) at 256 x 256 (latent 4 x 32 x 32), batch 1; paper: Peebles & Xie 2023")
    print(f"{'model':<9} {'params':>8} {'paper':>6} {'Gflops':>8} {'paper':>7} {'ratio':>6}")
    for size in PAPER_GFLOPS:
        for P in (2, 4, 8):
            gflops, millions = paper_gflops(size, P)
            name = f"DiT-{size}/{P}"
            if P == 2:  # the paper's headline numbers are for /2
                ref, ref_params = PAPER_GFLOPS[size], PAPER_PARAMS_M[size]
                print(f"{name:<9} {millions:>7.1f}M {ref_params:>5}M {gflops:>8.2f} {ref:>7.2f} "
                      f"{gflops / ref:>6.3f}")
            else:
                print(f"{name:<9} {millions:>7.1f}M {'':>6} {gflops:>8.2f}")


if __name__ == "__main__":
    main()
