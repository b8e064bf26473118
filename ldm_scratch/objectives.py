"""The objective seam: what a denoiser is trained to predict, and how its samples are drawn.

An objective owns the noise process end to end, so the tasks, the pipeline and the CLI never branch on it:
  draw      how t and eps are drawn for a training batch (t first, then eps, from one generator)
  q_sample  how x_t is formed from x0, t and eps
  target    what the denoiser regresses onto; `loss` puts the three together
  sample    its samplers (`sampler_names`, the first the default), with classifier-free guidance
  to_dict   {"objective": name, ...its config}, read back by `objective_from_dict`
Two implementations side by side:
  DDPMObjective  Ho et al. 2020 / Song et al. 2021: integer t in 0..T-1, target eps (or v), DDPM and DDIM;
                 a thin adapter over diffusion.GaussianDiffusion, whose behaviour it keeps exactly.
  RectifiedFlow  (flow.py) Esser et al. 2024 (SD3): continuous t in [0, 1], target v = eps - x0, Euler and Heun.
Each passes the denoiser `model(xt, model_time(t), cond)` with its own time scale (DDPM: the integer t;
flow: t * 1000, see flow.py). A new objective is one new class with these methods, plus its tests.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ldm_scratch.config import DiffusionConfig, config_from_dict, config_to_dict
from ldm_scratch.diffusion import Cond, Denoiser, GaussianDiffusion, NullCond
from ldm_scratch.flow import RectifiedFlow

OBJECTIVES = ("ddpm", "flow")


@runtime_checkable
class Objective(Protocol):
    """What a training task and a pipeline need from a noise process (DDPMObjective, RectifiedFlow)."""

    name: str                          # "ddpm" or "flow": the "objective" key of to_dict()
    sampler_names: tuple[str, ...]     # the samplers `sample` accepts; the first is the default

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(t (B,), eps (shape) float32) for one training batch; t first. Drawing for a global batch and
        slicing (DDP) is the caller's: stage2.draw_step_noise."""

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t from x0, the batch's t (B,) and eps."""

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the denoiser's output is regressed onto."""

    def model_time(self, t: Tensor) -> Tensor:
        """The time value the denoiser is given for t."""

    def loss(self, model: Denoiser, x0: Tensor, cond: Cond = None, t: Tensor | None = None,
             eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The scalar training loss; t and eps are drawn (t first) when not given."""

    def check_sample_args(self, num_steps: int, sampler: str, guidance_scale: float) -> None:
        """Raise a ValueError naming the option, before any work (a pipeline calls this at its boundary)."""

    def nfe(self, sampler: str, num_steps: int) -> int:
        """How many denoiser calls `sample` makes (the x-axis of a quality-vs-cost curve)."""

    def sample(self, model: Denoiser, shape: tuple[int, ...], cond: Cond = None, null_cond: NullCond = None,
               guidance_scale: float = 1.0, num_steps: int = 50, sampler: str = ...,
               generator: torch.Generator | None = None, x_T: Tensor | None = None, progress: bool = True,
               device: torch.device | str | None = None) -> Tensor:
        """x0 (shape) float32 from noise x_T (drawn from `generator` if not given); the sampler's own options
        (DDPM: eta, clip_x0, spacing, variance; flow: shift, t_start) are further keywords."""

    def to_dict(self) -> dict:
        """{"objective": name, ...config}: JSON-ready, read back by objective_from_dict."""


class DDPMObjective:
    """DDPM (eps or v prediction) through the Objective interface: every call goes to GaussianDiffusion."""

    name = "ddpm"
    sampler_names = ("ddim", "ddpm")   # DDIM first: the pipeline's default sampler, as before objectives

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.diffusion = GaussianDiffusion(cfg)
        self.cfg, self.T = self.diffusion.cfg, self.diffusion.T

    @classmethod
    def from_diffusion(cls, diffusion: GaussianDiffusion) -> DDPMObjective:
        """Wrap an existing GaussianDiffusion (that object itself, not a copy): how a pipeline built from a
        GaussianDiffusion, as every caller did before objectives, gets its objective."""
        obj = cls.__new__(cls)
        obj.diffusion, obj.cfg, obj.T = diffusion, diffusion.cfg, diffusion.T
        return obj

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(t (B,) int64 ~ U{0..T-1}, eps ~ N(0, I)): the same calls, in the same order, as
        stage2.draw_step_noise and GaussianDiffusion.loss, so one generator gives the same draws."""
        t = torch.randint(0, self.T, (shape[0],), generator=generator, device=device)
        eps = torch.randn(tuple(shape), generator=generator, device=device)
        return t, eps

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self.diffusion.q_sample(x0, t, eps)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022) for prediction "v"."""
        return eps if self.diffusion.prediction == "eps" else self.diffusion.get_v(x0, eps, t)

    @staticmethod
    def model_time(t: Tensor) -> Tensor:
        """DDPM's denoiser sees the integer t itself (0..T-1)."""
        return t

    def loss(self, model: Denoiser, x0: Tensor, cond: Cond = None, t: Tensor | None = None,
             eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """GaussianDiffusion.loss: Ho et al. 2020, Eq. 14 (L_simple), or its v form."""
        return self.diffusion.loss(model, x0, cond, generator=generator, t=t, eps=eps)

    def check_sample_args(self, num_steps: int, sampler: str, guidance_scale: float) -> None:
        if sampler not in self.sampler_names:
            raise ValueError(f"unknown sampler {sampler!r} for DDPM; valid samplers: {', '.join(self.sampler_names)}")
        if sampler == "ddim":
            self.diffusion.ddim_timesteps(num_steps)   # raises unless an integer in 1..T
        if not isinstance(guidance_scale, (int, float)) or not 0 <= guidance_scale < float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale}")

    def nfe(self, sampler: str, num_steps: int) -> int:
        """Denoiser calls: DDIM num_steps, DDPM all T (a guided call on the doubled batch counts once)."""
        return num_steps if sampler == "ddim" else self.T

    def sample(self, model: Denoiser, shape: tuple[int, ...], cond: Cond = None, null_cond: NullCond = None,
               guidance_scale: float = 1.0, num_steps: int = 50, sampler: str = "ddim",
               generator: torch.Generator | None = None, x_T: Tensor | None = None, progress: bool = True,
               device: torch.device | str | None = None, eta: float = 0.0, clip_x0: bool = False,
               spacing: str = "leading", variance: str = "beta_tilde") -> Tensor:
        """GaussianDiffusion.sample_ddim (num_steps, eta, spacing) or .sample_ddpm (all T steps: num_steps is
        not used; variance). clip_x0: right for pixels, wrong for latents. Neither can start part-way yet."""
        self.check_sample_args(num_steps, sampler, guidance_scale)
        if sampler == "ddim":
            return self.diffusion.sample_ddim(model, shape, cond, null_cond, num_steps=num_steps, eta=eta,
                                              guidance_scale=guidance_scale, generator=generator, progress=progress,
                                              clip_x0=clip_x0, spacing=spacing, x_T=x_T, device=device)
        return self.diffusion.sample_ddpm(model, shape, cond, null_cond, guidance_scale=guidance_scale,
                                          generator=generator, progress=progress, variance=variance,
                                          clip_x0=clip_x0, x_T=x_T, device=device)

    def to_dict(self) -> dict:
        return {"objective": self.name, **config_to_dict(self.cfg)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "objective") -> DDPMObjective:
        """Also reads a plain DiffusionConfig dict (no "objective" key): how schedules were saved before."""
        return cls(config_from_dict(DiffusionConfig, {k: v for k, v in d.items() if k != "objective"}, source))

    def __repr__(self) -> str:
        return f"DDPMObjective({self.cfg})"


def objective_from_dict(d: dict, source: str = "objective") -> DDPMObjective | RectifiedFlow:
    """Rebuild an objective from its to_dict(). A dict with no "objective" key is a DiffusionConfig saved
    before objectives existed (a pipeline's scheduler/config.json, a model folder's "diffusion"): DDPM."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object for the objective, got {type(d).__name__}")
    name = d.get("objective", "ddpm")
    if name == "ddpm":
        return DDPMObjective.from_dict(d, source)
    if name == "flow":
        return RectifiedFlow.from_dict(d, source)
    raise ValueError(f"{source}: unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
