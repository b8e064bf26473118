"""Rectified flow: the straight path between data and noise, its velocity target, and ODE samplers.

Liu et al. 2023 ("Flow straight and fast"), Lipman et al. 2023 (flow matching), and Esser et al. 2024
("SD3", arXiv:2403.03206): Sec. 2 (the straight path and its velocity), Sec. 3.1 (logit-normal t),
Sec. 5.3.2 (the resolution-dependent timestep shift). minRF's rf.py (cloneofsimo) shows how small it is.

In the pipeline it takes DDPM's place (objectives.py holds the interface both implement): latents z0 are
noised by `q_sample` for `loss`; at generation time `sample` integrates the ODE dx/dt = v(x, t) from pure
noise at t = 1 down to t = 0 with Euler or Heun steps. `invert` runs the same ODE upwards (image -> noise),
and `sample(t_start=...)` starts part-way (img2img).

Time runs the other way from DDPM's index: t = 0 is data, t = 1 is pure noise (as in SD3 and diffusers'
"sigma"). The denoiser sees t * 1000 (TIME_SCALE), because our U-Net and DiT embed time with a sinusoidal
embedding built for DDPM's 0..999; diffusers' FlowMatchEulerDiscreteScheduler does the same (timesteps =
sigmas * num_train_timesteps, with 1000 by default), so a flow model sees the same range a DDPM model does.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

# FlowConfig lives in config.py with every other config; imported here so `from ldm_scratch.flow import FlowConfig`
# keeps working
from ldm_scratch.config import T_SAMPLINGS, FlowConfig, config_from_dict, config_to_dict  # noqa: F401
from ldm_scratch.diffusion import Cond, Denoiser, GaussianDiffusion, NullCond, _check_guidance, _stack_with_null

SAMPLERS = ("euler", "heun")   # the first is the default
TIME_SCALE = 1000.0            # the denoiser sees t * 1000: its time embedding was designed for DDPM's 0..999


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3 Sec. 5.3.2: t' = shift t / (1 + (shift - 1) t). Keeps 0 and 1 fixed, monotone; shift > 1 spends
    more of the steps at high noise (SD3 derives shift = sqrt(m / n) for m pixels vs a base of n)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: float, shift: float) -> float:
    """The inverse of shift_time: u = t / (shift - (shift - 1) t)."""
    return t / (shift - (shift - 1) * t)


class RectifiedFlow:
    """x_t = (1 - t) x0 + t eps, the denoiser predicts v = eps - x0. Implements objectives.Objective."""

    name = "flow"
    sampler_names = SAMPLERS

    def __init__(self, cfg: FlowConfig | None = None):
        cfg = cfg or FlowConfig()
        if cfg.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {cfg.t_sampling!r}; valid: {', '.join(T_SAMPLINGS)}")
        if not (math.isfinite(cfg.logit_mean) and math.isfinite(cfg.logit_std) and cfg.logit_std > 0):
            raise ValueError(f"logit_mean must be finite and logit_std finite > 0; got {cfg.logit_mean}, "
                             f"{cfg.logit_std}")
        _check_shift(cfg.shift)
        self.cfg = cfg

    # ---------------------------------------------------------------- the path and its algebra
    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """One training draw for a batch of `shape`: (t (B,) float32 in [0, 1], eps (shape) float32), t first."""
        B = shape[0]
        if self.cfg.t_sampling == "logit_normal":
            # SD3 Sec. 3.1, logit-normal sampling:
            #   pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2)),
            # i.e. t = sigmoid(n) with n ~ N(m, s^2): most draws in the middle, where v is hardest to predict.
            n = torch.randn(B, generator=generator, device=device) * self.cfg.logit_std + self.cfg.logit_mean
            t = torch.sigmoid(n)
        else:
            t = torch.rand(B, generator=generator, device=device)       # t ~ U[0, 1)
        eps = torch.randn(tuple(shape), generator=generator, device=device)  # eps ~ N(0, I)
        return t, eps

    @staticmethod
    def _at(t: Tensor | float, x: Tensor) -> Tensor | float:
        """t (B,) -> (B, 1, 1, 1) to broadcast against x; a float stays a float."""
        return t.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1))) if isinstance(t, Tensor) else t

    def q_sample(self, x0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
        # SD3 Sec. 2, z_t = a_t x0 + b_t eps, with rectified flow's a_t = 1 - t, b_t = t (Sec. 3.1)
        t = self._at(t, x0)
        return (1 - t) * x0 + t * eps

    @staticmethod
    def target(x0: Tensor, eps: Tensor, t: Tensor | float | None = None) -> Tensor:
        """The velocity d x_t / dt = eps - x0: the same for every t (the path is straight)."""
        return eps - x0

    def predict_x0(self, xt: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        # x_t = (1 - t) x0 + t eps and v = eps - x0 give x_t = x0 + t v, so x0 = x_t - t v
        return xt - self._at(t, xt) * v

    def predict_eps(self, xt: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        # ... and eps = x0 + v = x_t + (1 - t) v
        return xt + (1 - self._at(t, xt)) * v

    @staticmethod
    def model_time(t: Tensor) -> Tensor:
        """What the denoiser is given as its time: t * 1000 (see the module docstring)."""
        return t * TIME_SCALE

    # ---------------------------------------------------------------- training
    def loss(self, model: Denoiser, x0: Tensor, cond: Cond = None, t: Tensor | None = None,
             eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Conditional flow matching (SD3 Sec. 2, with the rf path): E_{t, x0, eps} ||v_theta(x_t, t) - (eps - x0)||^2,
        the mean over every element. t and eps are drawn (t first) when not given."""
        if t is None or eps is None:
            t_drawn, eps_drawn = self.draw(x0.shape, generator, x0.device)
            t = t_drawn if t is None else t
            eps = eps_drawn.to(x0.dtype) if eps is None else eps
        xt = self.q_sample(x0, t, eps)
        return F.mse_loss(model(xt, self.model_time(t), cond).float(), self.target(x0, eps).float())

    # ---------------------------------------------------------------- guidance
    def guided_v(self, model: Denoiser, xt: Tensor, t: float, cond: Cond, null_cond: NullCond,
                 guidance_scale: float) -> Tensor:
        """v_pred at time t (a float) with classifier-free guidance, v_uncond + w (v_cond - v_uncond), float32.

        As in GaussianDiffusion.guided_eps: w = 1 is one plain forward; otherwise ONE forward on [cond; null].
        Guiding v is guiding eps and x0 too, since both are affine in v for a fixed x_t.
        """
        B = xt.shape[0]
        # .float(): the update maths stays float32 even when the caller runs the model under bf16 autocast
        if guidance_scale == 1.0:
            return model(xt, torch.full((B,), t * TIME_SCALE, device=xt.device), cond).float()
        time = torch.full((2 * B,), t * TIME_SCALE, device=xt.device)
        both = model(torch.cat([xt, xt]), time, _stack_with_null(cond, null_cond)).float()  # (2B, C, H, W)
        v_cond, v_uncond = both.chunk(2)                                     # 2 x (B, C, H, W)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    # ---------------------------------------------------------------- sampling
    def timesteps(self, num_steps: int, shift: float | None = None, t_start: float = 1.0) -> list[float]:
        """The num_steps + 1 times visited, from t_start down to 0: shift_time(u) on the uniform grid u from
        u_start to 0, where u_start = unshift_time(t_start) so that the first time is t_start exactly.
        With t_start = 1: u = 1, 1 - 1/N, ..., 0 (minRF's and SD3's grid, before the shift)."""
        shift = self.cfg.shift if shift is None else shift
        _check_grid(num_steps, shift, t_start)
        u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64) * unshift_time(t_start, shift)
        ts = shift_time(u, shift).tolist()
        ts[0] = t_start   # exact, not 1 ulp away after the round trip through unshift and shift
        return ts

    def check_sample_args(self, num_steps: int, sampler: str, guidance_scale: float, shift: float | None = None,
                          t_start: float = 1.0) -> None:
        """Every sampling option checked before any work (also for a pipeline to call at its boundary)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for rectified flow; valid samplers: {', '.join(SAMPLERS)}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale}")
        _check_grid(num_steps, self.cfg.shift if shift is None else shift, t_start)

    @staticmethod
    def nfe(sampler: str, num_steps: int) -> int:
        """Denoiser calls (a guided call on the doubled batch counts once): Euler N, Heun 2N - 1."""
        return num_steps if sampler == "euler" else 2 * num_steps - 1

    @torch.no_grad()
    def sample(self, model: Denoiser, shape: tuple[int, ...], cond: Cond = None, null_cond: NullCond = None,
               guidance_scale: float = 1.0, num_steps: int = 50, sampler: str = "euler",
               generator: torch.Generator | None = None, x_T: Tensor | None = None, progress: bool = True,
               device: torch.device | str | None = None, t_start: float = 1.0, shift: float | None = None) -> Tensor:
        """Integrate dx/dt = v(x, t) from t_start (1: pure noise x_T ~ N(0, I)) down to 0; returns x0 (float32).

        t_start < 1 (img2img, SDEdit): pass x_T = q_sample(x0, t_start, eps), the image noised to t_start.
        shift: the timestep shift (default: the config's). Deterministic given x_T or `generator`.
        """
        self.check_sample_args(num_steps, sampler, guidance_scale, shift, t_start)
        _check_guidance(guidance_scale, cond, null_cond)
        if t_start < 1 and x_T is None:
            raise ValueError(f"t_start={t_start} < 1 starts from an image noised to t_start: pass x_T = "
                             "q_sample(x0, t_start, eps)")
        if x_T is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        x, _ = GaussianDiffusion._start(model, shape, cond, generator, x_T, device)  # same device rule as DDPM
        ts = self.timesteps(num_steps, shift, t_start)
        return self._integrate(model, x, ts, cond, null_cond, guidance_scale, sampler, progress)

    @torch.no_grad()
    def invert(self, model: Denoiser, x0: Tensor, cond: Cond = None, null_cond: NullCond = None,
               guidance_scale: float = 1.0, num_steps: int = 50, sampler: str = "euler",
               shift: float | None = None, t_end: float = 1.0, progress: bool = True) -> Tensor:
        """The same ODE run upwards, from the data x0 at t = 0 to t_end (1: the noise that `sample` would turn
        back into x0). It visits sample's own times in reverse, so sample(x_T=invert(x0)) retraces the path;
        with Euler each step uses v at the step's start, so the round trip is exact only where v is constant
        along the path (a straight flow) and otherwise O(1 / num_steps) off (Heun: O(1 / num_steps^2))."""
        self.check_sample_args(num_steps, sampler, guidance_scale, shift, t_end)
        _check_guidance(guidance_scale, cond, null_cond)
        ts = self.timesteps(num_steps, shift, t_end)[::-1]   # 0 -> t_end
        return self._integrate(model, x0.float(), ts, cond, null_cond, guidance_scale, sampler, progress)

    def _integrate(self, model: Denoiser, x: Tensor, ts: list[float], cond: Cond, null_cond: NullCond,
                   guidance_scale: float, sampler: str, progress: bool) -> Tensor:
        """Euler or Heun along the times ts (down to 0 for sampling, up from 0 for inversion)."""
        steps = tqdm(range(len(ts) - 1), desc=sampler.capitalize(), disable=not progress)
        for i in steps:
            x = self.step(model, x, ts[i], ts[i + 1], cond, null_cond, guidance_scale, sampler)
        return x

    def step(self, model: Denoiser, x: Tensor, t: float, t_next: float, cond: Cond, null_cond: NullCond,
             guidance_scale: float, sampler: str = "euler") -> Tensor:
        """One Euler or Heun step of the ODE from t to t_next (either direction); editing.py's loops use it too."""
        dt = t_next - t                          # negative when sampling (t goes 1 -> 0)
        v = self.guided_v(model, x, t, cond, null_cond, guidance_scale)
        # Euler: x_{t + dt} = x_t + dt v(x_t, t)
        x_next = x + dt * v
        # Heun (Karras et al. 2022, Algorithm 1): average v at both ends of the Euler step, a second-order
        # step. Not on a step that ends at t = 0: as in Karras's last step that one stays Euler, saving a
        # call where the model is least trained (logit-normal t almost never lands near 0).
        if sampler == "heun" and t_next != 0:
            v_next = self.guided_v(model, x_next, t_next, cond, null_cond, guidance_scale)
            x_next = x + dt * (v + v_next) / 2
        return x_next

    # ---------------------------------------------------------------- save / load
    def to_dict(self) -> dict:
        return {"objective": self.name, **config_to_dict(self.cfg)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "objective") -> RectifiedFlow:
        fields = {k: v for k, v in d.items() if k != "objective"}
        return cls(config_from_dict(FlowConfig, fields, source))

    def __repr__(self) -> str:
        return f"RectifiedFlow({', '.join(f'{k}={v!r}' for k, v in dataclasses.asdict(self.cfg).items())})"


def _check_shift(shift: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0 (1 = no shift; SD3 uses 3.0); got {shift!r}")


def _check_grid(num_steps: int, shift: float, t_start: float) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    _check_shift(shift)
    if not 0 < t_start <= 1:   # NaN fails too
        raise ValueError(f"t_start (t_end for invert) must be in (0, 1] (1 = pure noise); got {t_start}")
