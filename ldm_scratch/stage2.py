"""Stage 2 (the denoiser) in pixel space as a training task: a class-conditional DDPM on 1 x 32 x 32 digits
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

import abc
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
from ldm_scratch.objectives import DDPMObjective, Objective
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
    decide condition dropout; latent training (stage3.py) draws its noise here too."""
    B = x0.shape[0]
    n = B * world                                         # the global batch
    g = torch.Generator(x0.device).manual_seed(seed * NOISE_SEED_STRIDE + step)
    t = torch.randint(0, T, (n,), generator=g, device=x0.device)                     # t ~ U{0..T-1}
    eps = torch.randn((n, *x0.shape[1:]), generator=g, device=x0.device)              # eps ~ N(0, I)
    coin = torch.rand(n, generator=g, device=x0.device)
    mine = slice(rank * B, (rank + 1) * B)                # Trainer gives rank r the r-th slice of the batch
    return t[mine], eps[mine].to(x0.dtype), coin[mine]


def draw_objective_noise(objective: Objective, seed: int, step: int, x0: torch.Tensor, rank: int = 0,
                         world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (t (B,), eps like x0, coin (B,) in [0, 1)) for `step`: objective.draw for the global batch of
    world * B from a generator seeded by (seed, step), then the dropout coins from the same generator, then
    this rank's slice. DDPMObjective.draw makes the calls of draw_step_noise in its order (randint, randn,
    then rand here), so a DDPM run draws exactly what draw_step_noise draws (a test checks it)."""
    B = x0.shape[0]
    n = B * world                                          # the global batch
    g = torch.Generator(x0.device).manual_seed(seed * NOISE_SEED_STRIDE + step)
    t, eps = objective.draw((n, *x0.shape[1:]), g, x0.device)   # t first, then eps: the objective's own draw
    coin = torch.rand(n, generator=g, device=x0.device)
    mine = slice(rank * B, (rank + 1) * B)                 # Trainer gives rank r the r-th slice of the batch
    return t[mine], eps[mine].to(x0.dtype), coin[mine]


class DenoiserTask(abc.ABC):
    """What every denoiser's training task shares, in pixels or in a latent (train.py's task protocol): one
    optimizer, "model", over the trained modules; the objective's (t, eps) for the global batch from a generator
    seeded by (seed, step), sliced per DDP rank (draw_objective_noise: resume is exact, 2 processes compute what
    1 does); condition dropout for classifier-free guidance (Ho & Salimans 2022, Algorithm 1); the objective's
    loss; DDP wrapping; and, at the end, the EMA weights saved and a final grid drawn from them.

    A subclass says what is trained and how it is conditioned, sampled and saved: DiffusionTask (pixels, below)
    and stage3.LatentDiffusionTask (an autoencoder's latents, a U-Net or a DiT, class / text / none)."""

    folder_name = "model"   # finish() writes out_dir/<folder_name>/

    def __init__(self, objective: Objective, p_uncond: float, seed: int, guidance_scale: float, precision: str,
                 sample_steps: int):
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be a probability in [0, 1]; got {p_uncond}")
        self.objective = objective
        self.p_uncond, self.seed, self.guidance_scale, self.precision = p_uncond, seed, guidance_scale, precision
        self.sample_steps = sample_steps  # steps per grid, each one forward of 2 x 80 images (tests use 2)
        self.rank, self.world = 0, 1
        self.postfix_keys = ["model_loss", "model_grad_norm"]

    # ------------------------------------------------------------------ what a subclass provides
    @abc.abstractmethod
    def ema_module(self) -> nn.Module:
        """Everything trained (one module: the optimizer's parameters, and what the EMA averages)."""

    @abc.abstractmethod
    def split_batch(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """A batch of the dataset -> (x0, the condition as stored: labels, (ids, mask) or None)."""

    @abc.abstractmethod
    def drop_condition(self, cond: Any, drop: torch.Tensor) -> Any:
        """The condition with the rows where drop (B,) is True replaced by the null condition."""

    def model_condition(self, cond: Any) -> Any:
        """What the denoiser is given for a (dropped-out) condition; text tasks encode the captions here."""
        return cond

    @abc.abstractmethod
    def save(self, folder: Path, ema: bool, step: int) -> None:
        """Write the trained modules (the EMA weights swapped in when ema) to `folder`."""

    @abc.abstractmethod
    def sample(self, step: int, out_dir: str | os.PathLike, name: str | None = None) -> Path:
        """Draw a grid of samples into out_dir/samples/ (finish draws the final one)."""

    @abc.abstractmethod
    def wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the forward passes through DDP wrappers."""

    # ------------------------------------------------------------------ protocol, shared
    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        # one optimizer for everything trained (a text encoder learns from the denoiser's loss alone)
        return {"model": make_adamw(self.ema_module().parameters(), cfg)}

    def step_noise(self, step: int, x0: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """This rank's (t, eps, cond after dropout) for `step`: drawn for the global batch, then sliced."""
        t, eps, coin = draw_objective_noise(self.objective, self.seed, step, x0, self.rank, self.world)
        # Condition dropout (Ho & Salimans 2022, Algorithm 1): with probability p_uncond, c <- null
        return t, eps, self.drop_condition(cond, coin < self.p_uncond)

    def loss(self, name: str, batch: Any, step: int) -> tuple[torch.Tensor, dict]:
        if name != "model":
            raise ValueError(f"unknown optimizer name {name!r}; expected 'model'")
        x0, cond = self.split_batch(batch)
        t, eps, cond = self.step_noise(step, x0, cond)
        # DDPM: Ho et al. 2020, Eq. 14 (with a condition): L_simple = E ||eps - eps_theta(x_t, t, y)||^2,
        # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. Flow: E ||(eps - x0) - v_theta(x_t, t, y)||^2,
        # x_t = (1 - t) x0 + t eps. The objective owns which (objectives.py).
        return self.objective.loss(self.denoiser_forward, x0, self.model_condition(cond), t=t, eps=eps), {}

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DDP: the forward passes go through the wrappers (gradients averaged); the noise is sliced per rank."""
        self.wrap(wrap)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def finish(self, out_dir: str | os.PathLike, ema: EMA | None = None, step: int = 0, grid: bool = True) -> Path:
        """Save `out_dir/<folder_name>/` with the EMA weights (the raw ones if ema is None) and, with `grid`,
        `samples/final.png` from the same weights. Returns the folder."""
        folder = Path(out_dir) / self.folder_name
        if ema is not None:
            ema.swap(self.ema_module())  # the averaged weights in; the second swap puts the raw ones back
        try:
            self.save(folder, ema is not None, step)
            if grid:
                self.sample(step, out_dir, name="final.png")
        finally:
            if ema is not None:
                ema.swap(self.ema_module())
        return folder


class DiffusionTask(DenoiserTask):
    """A pixel-space DDPM: a class-conditional (or unconditional) U-Net on images; saves `out_dir/model/`."""

    def __init__(self, unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig, p_uncond: float = 0.1,
                 seed: int = 0, guidance_scale: float = 3.0, precision: str = "auto",
                 sample_steps: int = SAMPLE_STEPS):
        if unet_cfg.context_dim:
            raise ValueError("DiffusionTask conditions on class labels; a U-Net with context_dim > 0 (text) "
                             f"needs the text task of a later stage (got context_dim={unet_cfg.context_dim})")
        self.diffusion = GaussianDiffusion(diffusion_cfg)
        # the objective wraps this very GaussianDiffusion: its draws are draw_step_noise's, its loss diffusion.loss
        super().__init__(DDPMObjective.from_diffusion(self.diffusion), p_uncond, seed, guidance_scale, precision,
                         sample_steps)
        self.unet_cfg, self.diffusion_cfg = unet_cfg, diffusion_cfg
        self.unet = UNet(unet_cfg)
        self.denoiser_forward: Callable = self.unet  # a DDP wrapper under torchrun (distribute)

    # ------------------------------------------------------------------ protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def ema_module(self) -> nn.Module:
        return self.unet

    def split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)

    def drop_condition(self, labels: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor | None:
        if labels is None or self.unet.null_class is None:
            return None
        return torch.where(drop, torch.full_like(labels, self.unet.null_class), labels)

    def wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.denoiser_forward = wrap(self.unet)

    def config_dict(self, ema: bool = True) -> dict:
        """Everything needed to rebuild the sampler: also the model folder's config.json."""
        return {"space": "pixel", "unet": config_to_dict(self.unet_cfg),
                "diffusion": config_to_dict(self.diffusion_cfg), "p_uncond": self.p_uncond,
                "guidance_scale": self.guidance_scale, "ema": ema}

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
    def save(self, folder: Path, ema: bool, step: int) -> None:
        save_model_folder(folder, self.unet, self.config_dict(ema=ema))


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
