"""Stage 2 in pixel space as a training task: a class-conditional DDPM on 1 x 32 x 32 digits
(Ho et al. 2020, Sec. 3-4; classifier-free guidance, Ho & Salimans 2022, Sec. 3; sampled with DDIM,
Song et al. 2021, Sec. 4).

Where it sits: train.py's Trainer runs this task; its output, `out_dir/model/`, is the EMA U-Net plus
its noise schedule (config.json says "space": "pixel"). Pixel space comes first on purpose: the same
denoiser and schedule later move into the autoencoder's latent space, where a step is far cheaper.

One optimizer, "model", on L_simple with *condition dropout*: each label is swapped for the null class
with probability p_uncond, so one network learns both eps(x_t, t, y) and eps(x_t, t, null), the two
halves that guidance mixes at sampling time (Ho & Salimans 2022, Sec. 3.2 train with p = 0.1 or 0.2).

The noise of a step (t, eps and the dropout coins) is drawn for the *global* batch from a generator
seeded by (seed, step); each DDP rank takes its slice. So there is no RNG state to checkpoint (resume
is exact), every image gets its own noise, and 2 processes under torchrun compute what 1 process does.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ldm_scratch.checkpoint import load_model_folder, save_model_folder
from ldm_scratch.config import DiffusionConfig, TrainConfig, UNetConfig, config_from_dict, config_to_dict
from ldm_scratch.device import autocast
from ldm_scratch.diffusion import GaussianDiffusion
# The evaluation helpers moved to evaluation.py; re-exported here, where notebooks and scripts import them from.
from ldm_scratch.evaluation import eval_labels, evaluate, reference_digits, score_digits  # noqa: F401
# DDIM steps for grids and evaluation: 30 of 1000 is enough for digits (one constant, in evaluation.py)
from ldm_scratch.evaluation import SAMPLE_STEPS
from ldm_scratch.train import EMA, make_adamw, save_image_grid
from ldm_scratch.unet import UNet

SPACES = ("pixel", "latent")   # where a saved denoiser works; this file trains and samples "pixel"
SAMPLERS = ("ddim", "ddpm")
GRID_COLS = 8                  # samples per class in a grid
GRID_SEED = 1234               # the grids' starting noise: fixed, so grids at different steps are comparable
# (seed, step) -> one generator seed. Any stride larger than the number of steps keeps the seeds of
# different (seed, step) pairs distinct; a prime avoids lining up with round step counts.
NOISE_SEED_STRIDE = 1_000_003


# The denoisers' training defaults, chosen by measurement (README "Training defaults", scripts/sweep_defaults.py).
# Both: Adam's usual betas (0.9, 0.999), as in Ho et al. 2020's code (TrainConfig's own (0.5, 0.9) are stage 1's
# GAN recipe; a denoiser has no adversary to chase), and an EMA with warm-up (ema.py) capped at DDPM's 0.9999,
# so a run of any length samples with an average of its own late weights, never of its random start.
DENOISER_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": dict(lr=5e-4, betas=(0.9, 0.999), ema_decay=0.9999, ema_warmup=True, lr_warmup_steps=0),
    "dit": dict(lr=3e-3, betas=(0.9, 0.999), ema_decay=0.9999, ema_warmup=True, lr_warmup_steps=0),
}


def diffusion_train_config(kind: str = "unet", **overrides: Any) -> TrainConfig:
    """TrainConfig with the measured defaults of a denoiser `kind` ("unet": pixel or latent, class or text;
    "dit"), then `overrides`."""
    if kind not in DENOISER_TRAIN_DEFAULTS:
        raise ValueError(f"unknown denoiser {kind!r}; valid: {', '.join(DENOISER_TRAIN_DEFAULTS)}")
    return dataclasses.replace(TrainConfig(), **{**DENOISER_TRAIN_DEFAULTS[kind], **overrides})


def draw_step_noise(seed: int, step: int, x0: torch.Tensor, T: int, rank: int = 0,
                    world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (t (B,), eps like x0, coin (B,) in [0, 1)) for `step`, drawn for the global batch of
    world * B from a generator seeded by (seed, step), then sliced (see the module docstring). The coins
    decide condition dropout; stage 3 (latent space) draws its noise here too."""
    B = x0.shape[0]
    n = B * world                                         # the global batch
    g = torch.Generator(x0.device).manual_seed(seed * NOISE_SEED_STRIDE + step)
    t = torch.randint(0, T, (n,), generator=g, device=x0.device)                     # t ~ U{0..T-1}
    eps = torch.randn((n, *x0.shape[1:]), generator=g, device=x0.device)              # eps ~ N(0, I)
    coin = torch.rand(n, generator=g, device=x0.device)
    mine = slice(rank * B, (rank + 1) * B)                # Trainer gives rank r the r-th slice of the batch
    return t[mine], eps[mine].to(x0.dtype), coin[mine]


class DiffusionTask:
    """The train.py task protocol for a pixel-space DDPM with condition dropout and EMA sampling."""

    def __init__(self, unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig, p_uncond: float = 0.1,
                 seed: int = 0, guidance_scale: float = 3.0, precision: str = "auto",
                 sample_steps: int = SAMPLE_STEPS):
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be a probability in [0, 1]; got {p_uncond}")
        if unet_cfg.context_dim:
            raise ValueError("DiffusionTask conditions on class labels; a U-Net with context_dim > 0 (text) "
                             f"needs the text task of a later stage (got context_dim={unet_cfg.context_dim})")
        self.unet_cfg, self.diffusion_cfg = unet_cfg, diffusion_cfg
        self.p_uncond, self.seed, self.guidance_scale, self.precision = p_uncond, seed, guidance_scale, precision
        self.sample_steps = sample_steps  # DDIM steps per grid, each one forward of 2 x 80 images (tests use 2)
        self.unet = UNet(unet_cfg)
        self.diffusion = GaussianDiffusion(diffusion_cfg)
        self.unet_forward: Callable = self.unet  # a DDP wrapper under torchrun (distribute)
        self.rank, self.world = 0, 1
        self.postfix_keys = ["model_loss", "model_grad_norm"]

    # ------------------------------------------------------------------ protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": make_adamw(self.unet.parameters(), cfg)}

    def step_noise(self, step: int, x0: torch.Tensor,
                   labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's (t, eps, cond) for `step`: drawn for the global batch, then sliced (see the docstring)."""
        t, eps, coin = draw_step_noise(self.seed, step, x0, self.diffusion.T, self.rank, self.world)
        if labels is None or self.unet.null_class is None:
            return t, eps, None
        # Condition dropout (Ho & Salimans 2022, Algorithm 1): with probability p_uncond, y <- null
        cond = torch.where(coin < self.p_uncond, torch.full_like(labels, self.unet.null_class), labels)
        return t, eps, cond

    def loss(self, name: str, batch: Any, step: int) -> tuple[torch.Tensor, dict]:
        if name != "model":
            raise ValueError(f"unknown optimizer name {name!r}; expected 'model'")
        x0, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        t, eps, cond = self.step_noise(step, x0, labels)
        # Ho et al. 2020, Eq. 14 (with a label): L_simple = E ||eps - eps_theta(x_t, t, y)||^2,
        # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
        return self.diffusion.loss(self.unet_forward, x0, cond, t=t, eps=eps), {}

    def ema_module(self) -> nn.Module:
        return self.unet

    def config_dict(self, ema: bool = True) -> dict:
        """Everything needed to rebuild the sampler: also the model folder's config.json."""
        return {"space": "pixel", "unet": config_to_dict(self.unet_cfg),
                "diffusion": config_to_dict(self.diffusion_cfg), "p_uncond": self.p_uncond,
                "guidance_scale": self.guidance_scale, "ema": ema}

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DDP: the forward pass goes through the wrapper (so gradients are averaged); the noise is sliced."""
        self.unet_forward = wrap(self.unet)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @torch.no_grad()
    def sample(self, step: int, out_dir: str | os.PathLike, name: str | None = None) -> Path:
        """A grid, one row per class, GRID_COLS DDIM samples each (the Trainer swaps the EMA weights in)."""
        device = next(self.unet.parameters()).device
        rows = self.unet_cfg.num_classes or 1
        labels = torch.arange(rows, device=device).repeat_interleave(GRID_COLS) if self.unet_cfg.num_classes \
            else GRID_COLS
        w = self.guidance_scale if self.unet_cfg.num_classes else 1.0
        x = generate(self.unet, self.diffusion, labels, num_steps=self.sample_steps, guidance_scale=w,
                     generator=torch.Generator(device).manual_seed(GRID_SEED), precision=self.precision)
        path = Path(out_dir) / "samples" / (name or f"samples_{step:06d}.png")
        save_image_grid(list(x.view(rows, GRID_COLS, *x.shape[1:])), path,  # (R*K, C, H, W) -> R x (K, C, H, W)
                        title=f"step {step}: one row per class, DDIM {self.sample_steps} steps, guidance {w:g}")
        return path

    # ------------------------------------------------------------------ after training
    def finish(self, out_dir: str | os.PathLike, ema: EMA | None = None, step: int = 0,
               grid: bool = True) -> Path:
        """Save `out_dir/model/` with the EMA weights (the raw ones if ema is None) and, with `grid`,
        a final grid `samples/final.png` from the same weights. Returns the model folder."""
        folder = Path(out_dir) / "model"
        if ema is not None:
            ema.swap(self.unet)  # the averaged weights into the module; the second swap puts the raw ones back
        try:
            save_model_folder(folder, self.unet, self.config_dict(ema=ema is not None))
            if grid:
                self.sample(step, out_dir, name="final.png")
        finally:
            if ema is not None:
                ema.swap(self.unet)
        return folder


def load_diffusion_model(folder: str | os.PathLike,
                         map_location: str | torch.device = "cpu") -> tuple[UNet, GaussianDiffusion, dict]:
    """Rebuild (unet in eval mode, diffusion, meta) from a folder written by DiffusionTask.finish.
    Any problem is a CheckpointError naming the file (config.json or model.pt)."""
    built: dict[str, GaussianDiffusion] = {}

    def build(meta: dict) -> UNet:  # inside load_model_folder, whose errors name config.json
        source = str(Path(folder) / "config.json")
        if meta.get("space") not in SPACES:
            raise ValueError(f"'space' should be one of {', '.join(SPACES)}; got {meta.get('space')!r}")
        built["diffusion"] = GaussianDiffusion(config_from_dict(DiffusionConfig, meta["diffusion"], source))
        return UNet(config_from_dict(UNetConfig, meta["unet"], source))

    unet, meta = load_model_folder(folder, build, map_location)
    return unet.eval(), built["diffusion"], meta


@torch.no_grad()
def generate(unet: UNet, diffusion: GaussianDiffusion, labels: torch.Tensor | int, num_steps: int = SAMPLE_STEPS,
             guidance_scale: float = 3.0, generator: torch.Generator | None = None, sampler: str = "ddim",
             eta: float = 0.0, precision: str = "auto", batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Pixel samples in [-1, 1], one per label (labels (N,) int64), or `labels` unconditional ones if an int.

    Batched (one generator, used in order, so the result is fixed by its seed), under no_grad and bf16
    autocast where `precision` allows. The predicted x0 is clipped to [-1, 1] at every step: right for
    pixels, whose range is known (Ho et al. 2020's code does the same), wrong for latents.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    unet.eval()
    device = next(unet.parameters()).device
    n = labels if isinstance(labels, int) else len(labels)
    shape = (unet.cfg.in_channels, unet.cfg.sample_size, unet.cfg.sample_size)
    out = []
    for lo in range(0, n, batch_size):
        B = min(batch_size, n - lo)
        cond = None if isinstance(labels, int) else labels[lo:lo + B].to(device)
        with autocast(device, precision):
            if sampler == "ddim":
                x = diffusion.sample_ddim(unet, (B, *shape), cond, unet.null_class, num_steps=num_steps, eta=eta,
                                          guidance_scale=guidance_scale, generator=generator, progress=progress,
                                          clip_x0=True, device=device)
            else:
                x = diffusion.sample_ddpm(unet, (B, *shape), cond, unet.null_class, guidance_scale=guidance_scale,
                                          generator=generator, progress=progress, clip_x0=True, device=device)
        out.append(x.float().clamp(-1, 1))
    return torch.cat(out)  # (N, C, H, W)
