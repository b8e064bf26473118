"""Stage 2's noise process: the DDPM forward process, its training loss, and the DDPM/DDIM samplers.

Ho et al. 2020 ("DDPM", Sec. 2-3): a fixed Markov chain adds Gaussian noise over T steps; a denoiser
learns to predict that noise. Song et al. 2021 ("DDIM", Sec. 4): a non-Markovian process with the same
marginals lets us sample in far fewer steps. Ho & Salimans 2022: classifier-free guidance (CFG).
Nichol & Dhariwal 2021 (Sec. 3.2): the cosine schedule, offered as a contrast to DDPM's linear one.

In the pipeline: latents z0 (B, c, H/f, W/f), already multiplied by scale_factor, are noised by
`q_sample` for `loss`; at generation time `sample_ddpm` / `sample_ddim` turn pure noise into z0.

Like diffusers' schedulers, `GaussianDiffusion` holds only the schedule tensors; the denoiser is passed
in and called in exactly one place, `_predict`, as `model(xt, t, cond)` -> (B, C, H, W).
Indexing: our t runs 0..T-1, so our t is the paper's t + 1 (Ho's x_1 is our t = 0).
Symbols as in the package glossary: beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm  # text bars: a saved notebook keeps their last state (a widget shows 0%)

from .config import DiffusionConfig

# The denoiser: model(xt (B, C, H, W), t (B,) int64, cond) -> eps_pred or v_pred (B, C, H, W).
Denoiser = Callable[..., Tensor]
# A condition: class labels (B,) int64, a context (B, N, D), a (context, mask) pair, or None (unconditional).
# A null condition may also be an int, the null class index, which the U-Net reserves as index num_classes.
Cond = Union[Tensor, tuple, None]
NullCond = Union[Tensor, int, tuple, None]

SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("eps", "v")
VARIANCES = ("beta", "beta_tilde")
SPACINGS = ("leading", "trailing")
COSINE_S = 0.008   # Nichol & Dhariwal 2021 Sec. 3.2: small offset so beta_0 is not vanishingly small
MAX_BETA = 0.999   # ... and betas are clipped below 1 to avoid a singularity as t -> T


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """The beta_t for t = 0..T-1, (T,), in float64: every derived table is then rounded to float32 once, at the
    end (a float32 cumprod over 1000 steps would be off by up to 4e-7 relative: small, but exact is free)."""
    T = cfg.num_timesteps
    if cfg.schedule == "linear":
        # Ho et al. 2020, Sec. 4: beta linear from 1e-4 to 0.02 over T = 1000 steps.
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    if cfg.schedule == "scaled_linear":
        # What LDM/Stable Diffusion call "linear" (diffusers: "scaled_linear"): linear in sqrt(beta),
        # with SD's own endpoints 0.00085..0.012. Here it uses this config's beta_start/beta_end.
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if cfg.schedule == "cosine":
        # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2,
        # and beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped at 0.999 (f(0) cancels in the ratio).
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2   # (T + 1,)
        return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)                         # (T + 1,) -> (T,)
    raise ValueError(f"unknown noise schedule {cfg.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


class GaussianDiffusion:
    """The schedule tables plus every formula that uses them. Build from a DiffusionConfig."""

    def __init__(self, cfg: DiffusionConfig | None = None):
        cfg = cfg or DiffusionConfig()
        if cfg.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2; got {cfg.num_timesteps}")
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {cfg.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.cfg, self.T, self.prediction = cfg, cfg.num_timesteps, cfg.prediction
        betas = make_betas(cfg)                                       # float64 throughout, stored float32
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must lie in (0, 1); got beta_start={cfg.beta_start}, beta_end={cfg.beta_end}")
        alphas = 1 - betas
        alpha_bars = torch.cumprod(alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1: x_{-1} "is" x0 itself.
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        # Ho et al. 2020, Eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
        posterior_variance = (1 - alpha_bars_prev) / (1 - alpha_bars) * betas
        # beta_tilde_0 = 0 exactly (the last step's posterior is a point mass on x0), and log(0) = -inf would
        # poison any log-likelihood or learned-variance maths, so DDPM's code puts beta_tilde_1 there instead.
        # Harmless: no noise is ever added at t = 0.
        log_var = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        # Every table below is float32 (the model's precision), each computed from the float64 ones above.
        self.betas, self.alphas, self.alpha_bars = betas.float(), alphas.float(), alpha_bars.float()
        self.alpha_bars_prev = alpha_bars_prev.float()
        self.sqrt_alpha_bars = alpha_bars.sqrt().float()
        self.sqrt_one_minus_alpha_bars = (1 - alpha_bars).sqrt().float()
        self.sqrt_recip_alpha_bars = alpha_bars.rsqrt().float()
        self.sqrt_recipm1_alpha_bars = (1 / alpha_bars - 1).sqrt().float()
        self.posterior_variance = posterior_variance.float()
        self.posterior_log_variance_clipped = log_var.float()
        # Ho et al. 2020, Eq. 7: mu_tilde_t(x_t, x0) = coef1 * x0 + coef2 * x_t, with
        #   coef1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
        #   coef2 = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
        self.posterior_mean_coef1 = (alpha_bars_prev.sqrt() * betas / (1 - alpha_bars)).float()
        self.posterior_mean_coef2 = (alphas.sqrt() * (1 - alpha_bars_prev) / (1 - alpha_bars)).float()

    # ---------------------------------------------------------------- the forward process and its algebra
    def _at(self, table: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """table[t] shaped to broadcast against x: (B,) -> (B, 1, 1, 1); an int t gives (1, 1, 1, 1)."""
        t = torch.as_tensor(t).reshape(-1).cpu()
        return table[t].to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, ..., 1)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Noise x0 straight to step t (no loop). t: (B,) int64, eps defaults to fresh N(0, I)."""
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # Ho et al. 2020, Eq. 4: q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)
        return self._at(self.sqrt_alpha_bars, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bars, t, x0) * eps

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I) (Ho et al. 2020, Eq. 6-7): (mean, var, log_var)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    def predict_x0_from_eps(self, xt: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        # Ho et al. 2020, Eq. 4 solved for x0 (as in Eq. 15): x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        return self._at(self.sqrt_recip_alpha_bars, t, xt) * xt - self._at(self.sqrt_recipm1_alpha_bars, t, xt) * eps

    def predict_eps_from_x0(self, xt: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        # Eq. 4 solved for eps: eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)
        return (xt - self._at(self.sqrt_alpha_bars, t, xt) * x0) / self._at(self.sqrt_one_minus_alpha_bars, t, xt)

    def get_v(self, x0: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        # Salimans & Ho 2022, Sec. 4: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
        return self._at(self.sqrt_alpha_bars, t, x0) * eps - self._at(self.sqrt_one_minus_alpha_bars, t, x0) * x0

    def predict_x0_from_v(self, xt: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        # (x_t, v) is a rotation of (x0, eps) by the angle with cos = sqrt(alpha_bar): x0 = sqrt(ab) x_t - sqrt(1-ab) v
        return self._at(self.sqrt_alpha_bars, t, xt) * xt - self._at(self.sqrt_one_minus_alpha_bars, t, xt) * v

    def predict_eps_from_v(self, xt: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        # ... and eps = sqrt(1 - ab) x_t + sqrt(ab) v
        return self._at(self.sqrt_one_minus_alpha_bars, t, xt) * xt + self._at(self.sqrt_alpha_bars, t, xt) * v

    # ---------------------------------------------------------------- training
    def loss(self, model: Denoiser, x0: Tensor, cond: Cond = None, generator: torch.Generator | None = None,
             t: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
        """Ho et al. 2020, Eq. 14 (L_simple): E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2, a scalar.

        Mean over every element, so a model that always answers 0 scores E[eps^2] = 1.
        With prediction "v" the target is v instead (Salimans & Ho 2022). `t`/`eps` may be given (tests).
        """
        B = x0.shape[0]
        if t is None:   # t ~ Uniform{0, ..., T-1}
            t = torch.randint(0, self.T, (B,), generator=generator, device=x0.device)
        if eps is None:  # eps ~ N(0, I)
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = self.q_sample(x0, t, eps)
        target = eps if self.prediction == "eps" else self.get_v(x0, eps, t)
        return F.mse_loss(self._predict(model, xt, t, cond), target)

    # ---------------------------------------------------------------- the denoiser and guidance
    @staticmethod
    def _predict(model: Denoiser, xt: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The one place the denoiser is called. Output cast to float32 so that the sampler's update arithmetic
        stays in float32 even when the caller runs the model under bf16 autocast (device.autocast)."""
        return model(xt, t, cond).float()

    def guided_eps(self, model: Denoiser, xt: Tensor, t: Tensor, cond: Cond, null_cond: NullCond,
                   guidance_scale: float) -> Tensor:
        """eps_pred with classifier-free guidance (Ho & Salimans 2022, Eq. 6), converted from v if needed.

        w = 1: one plain forward (cond may be None: an unconditional model). Otherwise ONE forward on the
        batch [cond; null] (twice the batch, half the calls). Guiding v is the same as guiding eps, because eps
        is linear in v for a fixed x_t.
        """
        _check_guidance(guidance_scale, cond, null_cond)
        if guidance_scale == 1.0:
            out = self._predict(model, xt, t, cond)
        else:
            both = self._predict(model, torch.cat([xt, xt]), torch.cat([t, t]), _stack_with_null(cond, null_cond))
            out_cond, out_uncond = both.chunk(2)                      # (2B, C, H, W) -> 2 x (B, C, H, W)
            # Ho & Salimans 2022, Eq. 6 with w = 1 + their w: eps_uncond + w (eps_cond - eps_uncond)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return out if self.prediction == "eps" else self.predict_eps_from_v(xt, t, out)

    # ---------------------------------------------------------------- one reverse step of each sampler
    def p_sample(self, model: Denoiser, xt: Tensor, t: int, cond: Cond = None, null_cond: NullCond = None,
                 guidance_scale: float = 1.0, variance: str = "beta_tilde", clip_x0: bool = False,
                 generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """One DDPM ancestral step x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2).

        variance: sigma_t^2 = "beta_tilde" (posterior, diffusers' default) or "beta" (Ho Sec. 3.2: both work).
        clip_x0: clamp the predicted x0 to [-1, 1]; right for pixels, wrong for latents (they are not bounded),
        hence off by default. `noise` overrides the fresh N(0, I) draw (tests).
        """
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
        t_batch = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        eps = self.guided_eps(model, xt, t_batch, cond, null_cond, guidance_scale)
        x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        # Ho Eq. 11 written through x0: mu_theta = mu_tilde(x_t, x0_pred); identical to Eq. 11 when unclipped.
        mean, _, _ = self.q_posterior(x0, xt, t)
        if t == 0:       # Algorithm 2, line 4: z = 0 at the last step, the mean *is* the sample
            return mean
        var = self._at(self.betas if variance == "beta" else self.posterior_variance, t, xt)
        if noise is None:
            noise = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        # Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z
        return mean + var.sqrt() * noise

    def ddim_step(self, eps: Tensor, t: int, t_prev: int, xt: Tensor, eta: float = 0.0,
                  generator: torch.Generator | None = None, noise: Tensor | None = None,
                  clip_x0: bool = False) -> Tensor:
        """One DDIM step x_t -> x_{t_prev} given eps_pred (Song et al. 2021, Eq. 12; their alpha is our alpha_bar).

        t_prev < 0 means "past the end": alpha_bar_prev = 1, so the last step returns the predicted x0 itself.
        That is diffusers' DDIMScheduler default (set_alpha_to_one=True), kept for conformance.
        clip_x0 also recomputes eps from the clipped x0 (as guided-diffusion's DDIM does; diffusers'
        use_clipped_model_output=True). Keeping the raw eps would put the unclipped x0 back through the
        direction term: with many small steps nearly all of it, so clipping would do almost nothing.
        """
        if not 0 <= eta <= 1:   # eta > 1 would make sigma^2 exceed 1 - alpha_{t-1}: Eq. 12 has no meaning there
            raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM's variance); got {eta}")
        ab_t = float(self.alpha_bars[t])
        ab_prev = float(self.alpha_bars[t_prev]) if t_prev >= 0 else 1.0
        # Eq. 12, "predicted x0": (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
        x0 = (xt - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            # eps consistent with the clipped x0 (Eq. 4 solved for eps), so both terms of Eq. 12 agree on x0
            eps = (xt - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        # Eq. 16: sigma_t(eta) = eta sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t-1})
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
        # Eq. 12: x_{t-1} = sqrt(alpha_{t-1}) x0_pred + sqrt(1 - alpha_{t-1} - sigma^2) eps + sigma z
        # (max(.., 0): at eta = 1 the direction's variance is ~0 and float rounding could make it -1e-9)
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            if noise is None:
                noise = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
            x_prev = x_prev + sigma * noise
        return x_prev

    def ddim_timesteps(self, num_steps: int, spacing: str = "leading") -> list[int]:
        """The visited timesteps, high to low. "leading" (diffusers' default): t_i = i * (T // num_steps), so
        50 of 1000 steps visit 980, 960, ..., 0. It never starts at T-1 (with 1 step it visits only t = 0!);
        "trailing" (Lin et al. 2024, Table 2) ends on T-1 instead: t_i = round(T - i T / num_steps) - 1."""
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.T:
            raise ValueError(f"num_steps must be an integer in 1..{self.T} (the training T); got {num_steps!r}")
        if spacing == "leading":
            return [i * (self.T // num_steps) for i in reversed(range(num_steps))]
        if spacing == "trailing":
            return [round(self.T - i * self.T / num_steps) - 1 for i in range(num_steps)]
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")

    # ---------------------------------------------------------------- the samplers
    @torch.no_grad()
    def sample_ddpm(self, model: Denoiser, shape: tuple[int, ...], cond: Cond = None, null_cond: NullCond = None,
                    guidance_scale: float = 1.0, generator: torch.Generator | None = None, progress: bool = True,
                    variance: str = "beta_tilde", clip_x0: bool = False, x_T: Tensor | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """Ancestral sampling, all T steps (Ho et al. 2020, Algorithm 2). Returns x0 of `shape`, float32.

        Deterministic given `generator` (which must live on `device`). Autocast is left to the caller:
        wrap the call in `device.autocast(device, precision)`; the update maths stays float32 regardless.
        """
        _check_guidance(guidance_scale, cond, null_cond)   # fail before any work, not at the first step
        x, device = self._start(model, shape, cond, generator, x_T, device)
        for t in tqdm(reversed(range(self.T)), total=self.T, desc="DDPM", disable=not progress):
            x = self.p_sample(model, x, t, cond, null_cond, guidance_scale, variance, clip_x0, generator)
        return x

    @torch.no_grad()
    def sample_ddim(self, model: Denoiser, shape: tuple[int, ...], cond: Cond = None, null_cond: NullCond = None,
                    num_steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                    generator: torch.Generator | None = None, progress: bool = True, clip_x0: bool = False,
                    spacing: str = "leading", x_T: Tensor | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """DDIM sampling in `num_steps` (1..T) steps (Song et al. 2021, Sec. 4.2); eta = 0 is deterministic
        given x_T. Same conventions as sample_ddpm."""
        timesteps = self.ddim_timesteps(num_steps, spacing)
        _check_guidance(guidance_scale, cond, null_cond)   # fail before any work, not at the first step
        x, device = self._start(model, shape, cond, generator, x_T, device)
        for i in tqdm(range(num_steps), desc="DDIM", disable=not progress):
            t = timesteps[i]
            t_prev = timesteps[i + 1] if i + 1 < num_steps else -1    # -1: the final jump to x0
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps = self.guided_eps(model, x, t_batch, cond, null_cond, guidance_scale)
            x = self.ddim_step(eps, t, t_prev, x, eta, generator, clip_x0=clip_x0)
        return x

    @staticmethod
    def _start(model, shape, cond, generator, x_T, device) -> tuple[Tensor, torch.device]:
        """x_T ~ N(0, I) in float32 on `device`, else on the model's device, else the condition's, else the CPU."""
        if device is None:
            params = list(model.parameters())[:1] if isinstance(model, torch.nn.Module) else []
            device = params[0].device if params else cond.device if isinstance(cond, Tensor) else "cpu"
        if x_T is None:
            x_T = torch.randn(tuple(shape), generator=generator, device=device)
        return x_T.to(device, torch.float32), torch.device(device)


def _check_guidance(guidance_scale: float, cond: Cond, null_cond: NullCond) -> None:
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale}")
    if guidance_scale != 1.0 and (cond is None or null_cond is None):
        raise ValueError(f"guidance_scale={guidance_scale} needs both cond and null_cond: for class labels pass "
                         "the null class index (num_classes), for a context the encoding of the empty prompt")


def _stack_with_null(cond: Tensor | tuple, null_cond: Tensor | int | tuple) -> Tensor | tuple:
    """[cond; null] along the batch, (B, ...) -> (2B, ...). An int null is a null class index (the U-Net
    reserves index num_classes); a null with batch 1 (the empty prompt's context (1, N, D)) is repeated to B;
    a (context, mask) pair is stacked item by item (a None mask stays None)."""
    if isinstance(cond, tuple):
        return tuple(None if c is None else _stack_with_null(c, n) for c, n in zip(cond, null_cond))
    if isinstance(null_cond, int):
        null_cond = torch.full_like(cond, null_cond)                     # (B,) labels, all = the null class
    elif null_cond.shape[0] == 1 and cond.shape[0] != 1:
        null_cond = null_cond.expand(cond.shape[0], *null_cond.shape[1:])  # (1, ...) -> (B, ...)
    return torch.cat([cond, null_cond])                                   # (B, ...) -> (2B, ...)
