"""Seconds per training step (batch 64, bf16 autocast, AdamW) of the three class-conditional MNIST
denoisers of the README's pixel-vs-latent table, measured side by side in one run: `python scripts/step_times.py`."""
import dataclasses, sys, time

import torch

from ldm_scratch.config import UNET_PRESETS, DIT_PRESETS
from ldm_scratch.unet import UNet
from ldm_scratch.dit import DiT
from ldm_scratch.diffusion import GaussianDiffusion
torch.manual_seed(0); d = GaussianDiffusion()
models = {"pixel U-Net small (1x32x32)": (UNet(dataclasses.replace(UNET_PRESETS["small"](), num_classes=10)), (1, 32)),
          "latent U-Net text-latent widths (4x8x8)": (UNet(dataclasses.replace(UNET_PRESETS["text-latent"](), num_classes=10)), (4, 8)),
          "latent DiT dit-small-latent (4x8x8)": (DiT(dataclasses.replace(DIT_PRESETS["dit-small-latent"](), num_classes=10)), (4, 8))}
for name, (m, (c, s)) in models.items():
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randn(64, c, s, s); y = torch.randint(0, 10, (64,))
    ts = []
    for i in range(25):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = d.loss(m, x, y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        ts.append(time.perf_counter() - t0)
    med = sorted(ts[5:])[len(ts[5:]) // 2]
    print(f"{name}: {med * 1000:.0f} ms/step -> 3,000 steps = {3000 * med / 60:.1f} min ({torch.get_num_threads()} threads)")
