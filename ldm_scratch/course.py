"""The course kit's checks: every exercise of notebooks/student/ is graded here against the package.

A solution notebook marks the cells a student writes (`### BEGIN SOLUTION` / `### END SOLUTION`, nbgrader's
markers; `python -m ldm_scratch course build` cuts them out, cli/course.py). After each exercise a check cell
calls `check(name, my_function)`, which runs two kinds of case against the package's own code:

  visible  seeded inputs shaped like the notebook's, compared with the package's reference
  hidden   other shapes, seeds, schedules and edge cases (eta = 1, w = 1, a clamp that binds), the reference
           again computed by the package at check time, so a formula fitted to one case does not pass

Each tolerance is the float32 rounding of the reference path with a margin, and tests/test_course.py shows
that a deliberately wrong formula fails every check. `check` prints one line, appends the result to the JSON
file named by $LDM_COURSE_RESULTS when set (what `course check` reads), and raises on a failure, as an
nbgrader test cell does. Inputs come from their own generators inside a forked RNG: checking never changes
the notebook's random stream.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ldm_scratch import editing
from ldm_scratch.autoencoder import AutoencoderKL, DiagonalGaussian, measure_scale_factor
from ldm_scratch.config import AUTOENCODER_PRESETS, DIT_PRESETS, DiffusionConfig, get_preset
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.dit import DiTBlock, modulate, patchify, sincos_pos_embed_2d, unpatchify
from ldm_scratch.flow import FlowConfig, RectifiedFlow, shift_time
from ldm_scratch.layers import attention
from ldm_scratch.latents import encode_images
from ldm_scratch.losses import adaptive_weight, hinge_d_loss
from ldm_scratch.objectives import DDPMObjective
from ldm_scratch.perceptual import PerceptualLoss
from ldm_scratch.pipeline import LatentDiffusionPipeline, build_denoiser
from ldm_scratch.stage3 import LatentDiffusionTask
from ldm_scratch.unet import CrossAttention2d

RESULTS_ENV = "LDM_COURSE_RESULTS"   # a JSON file: the list of every check's result, in the order they ran
Case = Callable[[Any], None]         # runs the student's answer on one case; raises CheckFailed on a mismatch


class CheckFailed(AssertionError):
    """The student's answer disagrees with the package's reference; the message says where and by how much."""


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str             # the solution notebook's stem, e.g. "04_ddpm"
    what: str                 # the formula, one line (the README's table)
    cases: tuple[Case, ...]   # cases[0] is the visible case, the rest are hidden


@dataclass(frozen=True)
class Result:
    name: str
    status: str               # "passed" | "failed" | "not attempted"
    message: str


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(mine: Any, ref: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    """Raise CheckFailed unless `mine` is a tensor shaped like `ref` and allclose to it."""
    if not isinstance(mine, torch.Tensor):
        raise CheckFailed(f"{what}: expected a tensor, got {type(mine).__name__}")
    if tuple(mine.shape) != tuple(ref.shape):
        raise CheckFailed(f"{what}: shape {tuple(mine.shape)}, expected {tuple(ref.shape)}")
    mine, ref = mine.detach().double(), ref.detach().double()
    if not torch.allclose(mine, ref, rtol=rtol, atol=atol):
        err = (mine - ref).abs().max().item()
        raise CheckFailed(f"{what}: max |yours - package| = {err:.3g} "
                          f"(tolerance atol {atol:g} + rtol {rtol:g} x |package|)")


def _toy_denoiser(channels: int, seed: int, num_classes: int = 10) -> Callable:
    """eps_theta(x_t, t, y): a fixed 3x3 conv scaled by t plus a class embedding (null class = num_classes).
    Cheap, and sensitive to all three inputs, so a check sees a wrong x_t, t or label (the real U-Net is
    zero at init and would see none of them)."""
    g = _gen(seed)
    weight = 0.3 * torch.randn(channels, channels, 3, 3, generator=g)
    class_emb = torch.randn(num_classes + 1, channels, generator=g)

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.nn.functional.conv2d(x, weight, padding=1) * (1 + t.float() / 100).view(-1, 1, 1, 1)
        return h if y is None else h + class_emb[y][:, :, None, None]  # (B, C, H, W) + (B, C, 1, 1)
    return model


def _schedule(kind: str, T: int) -> tuple[GaussianDiffusion, torch.Tensor, torch.Tensor]:
    """(the package's diffusion, betas float64, alpha_bar float64): the tables a student derives from."""
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=T, schedule=kind))
    betas = diffusion.betas.double()
    return diffusion, betas, torch.cumprod(1 - betas, dim=0)


# ---------------------------------------------------------------- 01: the posterior and its KL
def _reparameterize(shape: tuple[int, ...], seed: int, spread: float) -> Case:
    def run(fn):
        g = _gen(seed)
        mean, logvar = torch.randn(shape, generator=g), spread * torch.randn(shape, generator=g)
        ref = DiagonalGaussian.from_mean_logvar(mean, logvar).sample(_gen(seed + 1))
        eps = torch.randn(shape, generator=_gen(seed + 1))  # the same draw as sample()'s
        _close(fn(mean, logvar, eps), ref, f"z for shape {shape}", rtol=1e-5, atol=1e-6)
    return run


def _kl(shape: tuple[int, ...], seed: int, spread: float) -> Case:
    def run(fn):
        g = _gen(seed)
        mean, logvar = torch.randn(shape, generator=g), spread * torch.randn(shape, generator=g)
        ref = DiagonalGaussian.from_mean_logvar(mean, logvar).kl()
        _close(fn(mean, logvar), ref, f"KL for shape {shape}", rtol=1e-5, atol=1e-5)
    return run


# ---------------------------------------------------------------- 02: perceptual and adversarial losses
@functools.lru_cache(maxsize=1)
def _perceptual() -> PerceptualLoss:
    return PerceptualLoss()  # the shipped default net, loaded once


def _lpips(shape: tuple[int, ...], seed: int, noise: float | None) -> Case:
    def run(fn):
        g = _gen(seed)
        x = torch.rand(shape, generator=g) * 2 - 1
        y = x + noise * torch.randn(shape, generator=g) if noise else torch.rand(shape, generator=g) * 2 - 1
        p = _perceptual()
        with torch.no_grad():
            feats_x, feats_y = p.net((x - p.shift) / p.scale), p.net((y - p.shift) / p.scale)
            weights = [getattr(p, f"lin{l}") for l in range(p.num_layers)]
            mine, ref = fn(feats_x, feats_y, weights), p(x, y)
        _close(mine, ref, f"d(x, y) for images {shape}", rtol=1e-4, atol=1e-6)
    return run


def _hinge(real: torch.Tensor | tuple, fake: torch.Tensor | tuple, seed: int = 0) -> Case:
    def run(fn):
        g = _gen(seed)
        r = real if isinstance(real, torch.Tensor) else 2 * torch.randn(real, generator=g)
        f = fake if isinstance(fake, torch.Tensor) else 2 * torch.randn(fake, generator=g)
        _close(fn(r, f), hinge_d_loss(r, f), f"L_D for logits {tuple(r.shape)} / {tuple(f.shape)}", 1e-6, 1e-6)
    return run


def _adaptive(seed: int, max_weight: float, gan_grad: bool = True) -> Case:
    def run(fn):
        g = _gen(seed)
        last_layer = torch.randn(3, 8, 3, 3, generator=g).requires_grad_(True)  # the decoder's G_L
        a, b = torch.randn(3, 8, 3, 3, generator=g), torch.randn(3, 8, 3, 3, generator=g)
        nll = 0.01 * (last_layer * a).sum() ** 2              # two losses of unrelated scales (lambda ~ 100)
        g_loss = (torch.sin(last_layer) * b).mean() if gan_grad else 0.0 * last_layer.sum()
        ref = adaptive_weight(nll, g_loss, last_layer, max_weight)
        mine = fn(nll, g_loss, last_layer, max_weight)
        what = f"lambda (seed {seed}, max_weight {max_weight:g}{'' if gan_grad else ', zero GAN gradient'})"
        if isinstance(mine, torch.Tensor) and mine.requires_grad:
            raise CheckFailed(f"{what}: detach it, it is a weight, not a loss to differentiate")
        _close(torch.as_tensor(mine).reshape(ref.shape), ref, what, rtol=1e-4, atol=0)
    return run


# ---------------------------------------------------------------- 03: the scale factor
def _scale_factor(channels: int, n: int, side: int, batch_size: int, seed: int) -> Case:
    def run(fn):
        torch.manual_seed(seed)  # the random encoder's weights (inside the forked RNG)
        cfg = get_preset(AUTOENCODER_PRESETS, "tiny", "autoencoder")
        cfg.in_channels = channels
        ae = AutoencoderKL(cfg).eval()
        images = torch.rand(n, channels, side, side, generator=_gen(seed)) * 2 - 1
        ref = measure_scale_factor(ae, images, batch_size=batch_size, generator=_gen(seed + 1))
        mine = fn(ae, images, _gen(seed + 1), batch_size)
        _close(torch.as_tensor(float(mine)), torch.as_tensor(ref),
               f"scale factor ({n} images {channels}x{side}x{side}, batches of {batch_size})", rtol=1e-4, atol=0)
    return run


# ---------------------------------------------------------------- 04: DDPM
def _q_sample(kind: str, T: int, shape: tuple[int, ...], steps: list[int], seed: int) -> Case:
    def run(fn):
        diffusion, _, alpha_bar = _schedule(kind, T)
        g = _gen(seed)
        x0, eps, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor(steps)
        _close(fn(x0, t, eps, alpha_bar), diffusion.q_sample(x0, t, eps),
               f"x_t ({kind} schedule, T={T}, t={steps})", rtol=1e-5, atol=1e-5)
    return run


def _q_posterior(kind: str, T: int, shape: tuple[int, ...], t: int, seed: int) -> Case:
    def run(fn):
        diffusion, betas, alpha_bar = _schedule(kind, T)
        g = _gen(seed)
        x0, xt = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ref_mean, ref_var, _ = diffusion.q_posterior(x0, xt, t)
        mine = fn(x0, xt, t, betas, alpha_bar)
        if not (isinstance(mine, tuple) and len(mine) == 2):
            raise CheckFailed("return the pair (mean, var)")
        _close(mine[0], ref_mean, f"mu_tilde ({kind} schedule, T={T}, t={t})", rtol=1e-5, atol=1e-5)
        var = torch.as_tensor(mine[1]).reshape(-1)
        _close(var, ref_var.reshape(-1)[:1].expand(var.numel()), f"beta_tilde ({kind}, T={T}, t={t})", 1e-4, 0)
    return run


def _p_mean(kind: str, T: int, shape: tuple[int, ...], t: int, seed: int) -> Case:
    def run(fn):
        diffusion, betas, alpha_bar = _schedule(kind, T)
        g = _gen(seed)
        xt, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ref = diffusion.p_sample(lambda x, t_, c: eps, xt, t, noise=torch.zeros_like(xt))  # the mean alone
        _close(fn(xt, t, eps, betas, alpha_bar), ref, f"mu_theta ({kind} schedule, T={T}, t={t})", 1e-4, 1e-4)
    return run


def _eps_loss(kind: str, T: int, shape: tuple[int, ...], labels: bool, seed: int) -> Case:
    def run(fn):
        diffusion, _, alpha_bar = _schedule(kind, T)
        model = _toy_denoiser(shape[1], seed)
        g = _gen(seed)
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.randint(0, T, (shape[0],), generator=g)
        y = torch.randint(0, 10, (shape[0],), generator=g) if labels else None
        ref = diffusion.loss(model, x0, y, t=t, eps=eps)
        _close(torch.as_tensor(fn(model, x0, t, eps, alpha_bar, y)), ref,
               f"L_simple ({kind} schedule, T={T}, x0 {shape}, {'labels' if labels else 'no labels'})", 1e-5, 1e-6)
    return run


def _ddim(kind: str, T: int, t: int, t_prev: int, eta: float, seed: int) -> Case:
    def run(fn):
        diffusion, _, _ = _schedule(kind, T)
        g = _gen(seed)
        xt, eps, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
        ab_t = float(diffusion.alpha_bars[t])
        ab_prev = float(diffusion.alpha_bars[t_prev]) if t_prev >= 0 else 1.0
        ref = diffusion.ddim_step(eps, t, t_prev, xt, eta=eta, noise=noise)
        _close(fn(xt, eps, ab_t, ab_prev, eta, noise), ref,
               f"x_prev ({kind} schedule, t={t} -> {t_prev}, eta={eta:g})", rtol=1e-5, atol=1e-5)
    return run


def _guidance(w: float, shape: tuple[int, ...], seed: int) -> Case:
    def run(fn):
        diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=100))
        model = _toy_denoiser(shape[1], seed)
        g = _gen(seed)
        xt = torch.randn(shape, generator=g)
        t, y = torch.randint(0, 100, (shape[0],), generator=g), torch.randint(0, 10, (shape[0],), generator=g)
        eps_cond, eps_uncond = model(xt, t, y), model(xt, t, torch.full_like(y, 10))
        ref = diffusion.guided_eps(model, xt, t, y, 10, w)
        _close(fn(eps_cond, eps_uncond, w), ref, f"guided eps (w = {w:g})", rtol=1e-5, atol=1e-5)
    return run


# ---------------------------------------------------------------- 05: the latent cache and the decode step
def _tiny_autoencoder(channels: int, seed: int, scale_factor: float, shift_factor: float = 0.0) -> AutoencoderKL:
    """A random `tiny` autoencoder (f = 4, 4 latent channels) with given scale and shift factors, in eval mode."""
    torch.manual_seed(seed)  # the random weights (inside the forked RNG)
    cfg = get_preset(AUTOENCODER_PRESETS, "tiny", "autoencoder")
    cfg.in_channels = channels
    ae = AutoencoderKL(cfg).eval()
    ae.scale_factor = scale_factor
    ae.shift_factor = shift_factor
    return ae


def _encode_latents(channels: int, n: int, side: int, scale_factor: float, seed: int, shift_factor: float = 0.0) -> Case:
    def run(fn):
        ae = _tiny_autoencoder(channels, seed, scale_factor, shift_factor)
        images = torch.rand(n, channels, side, side, generator=_gen(seed)) * 2 - 1
        ref = encode_images(ae, images, precision="fp32", progress=False)
        _close(fn(ae, images), ref, f"z0 ({n} images {channels}x{side}x{side}, scale factor {scale_factor:g}, "
               f"shift factor {shift_factor:g})",
               rtol=1e-4, atol=1e-5)
    return run


def _decode_latents(channels: int, n: int, side: int, scale_factor: float, spread: float, seed: int,
                    shift_factor: float = 0.0) -> Case:
    def run(fn):
        ae = _tiny_autoencoder(channels, seed, scale_factor, shift_factor)
        z_channels = ae.cfg.z_channels
        denoiser = build_denoiser("dit", dataclasses.replace(get_preset(DIT_PRESETS, "dit-tiny"),
                                                             in_channels=z_channels, sample_size=side))
        pipe = LatentDiffusionPipeline(ae, denoiser, GaussianDiffusion(DiffusionConfig(num_timesteps=10)))
        z0 = spread * torch.randn(n, z_channels, side, side, generator=_gen(seed))
        ref = pipe.decode(z0, "tensor", precision="fp32")
        with torch.no_grad():
            mine = fn(ae, z0)
        _close(mine, ref, f"x ({n} latents {z_channels}x{side}x{side}, scale factor {scale_factor:g}, "
               f"shift factor {shift_factor:g})",
               rtol=1e-4, atol=1e-5)
    return run


# ---------------------------------------------------------------- 06: DiT
def _patchify(shape: tuple[int, ...], P: int, seed: int) -> Case:
    def run(fn):
        z = torch.randn(shape, generator=_gen(seed))
        _close(fn(z, P), patchify(z, P), f"tokens of a latent {shape}, P={P}", rtol=0, atol=0)
    return run


def _unpatchify(B: int, C: int, h: int, w: int, P: int, seed: int) -> Case:
    def run(fn):
        tokens = torch.randn(B, h * w, P * P * C, generator=_gen(seed))
        _close(fn(tokens, P, h, w), unpatchify(tokens, P, h, w),
               f"latent from tokens {tuple(tokens.shape)}, P={P}, h={h}, w={w}", rtol=0, atol=0)
    return run


def _sincos_2d(D: int, h: int, w: int) -> Case:
    def run(fn):
        _close(fn(D, h, w), sincos_pos_embed_2d(D, h, w), f"position table D={D}, h={h}, w={w}", 1e-5, 1e-5)
    return run


def _modulate(B: int, N: int, D: int, seed: int) -> Case:
    def run(fn):
        g = _gen(seed)
        x, shift, scale = torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
        _close(fn(x, shift, scale), modulate(x, shift, scale), f"modulate, x {(B, N, D)}", rtol=1e-6, atol=1e-6)
    return run


def _adaln_block(B: int, N: int, D: int, num_heads: int, seed: int) -> Case:
    def run(fn):
        torch.manual_seed(seed)  # the block's random weights (inside the forked RNG)
        block = DiTBlock(D, num_heads, mlp_ratio=4.0).eval()
        g = _gen(seed)
        with torch.no_grad():  # non-zero modulation (DiT starts it at zero: every gate 0, the block the identity)
            block.adaLN_modulation[-1].weight.copy_(0.1 * torch.randn(6 * D, D, generator=g))
            block.adaLN_modulation[-1].bias.copy_(0.1 * torch.randn(6 * D, generator=g))
        x, c = torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g)
        with torch.no_grad():
            ref, mine = block(x, c), fn(block, x, c)
        _close(mine, ref, f"block output, x {(B, N, D)}, {num_heads} heads", rtol=1e-4, atol=1e-5)
    return run



# ---------------------------------------------------------------- 07: text conditioning
def _padding_mask(B: int, N: int, lengths: tuple[int, ...]) -> torch.Tensor:
    """(B, N) bool, True on the first lengths[b] tokens of row b (a prompt's real tokens, [bos] first)."""
    return torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]


def _cross_attention(B: int, C: int, D: int, heads: int, side: tuple[int, int], lengths: tuple[int, ...],
                     seed: int) -> Case:
    def run(fn):
        torch.manual_seed(seed)  # the layer's random weights (inside the forked RNG)
        m = CrossAttention2d(C, D, num_heads=heads, groups=min(8, C)).eval()
        g = _gen(seed)
        N = max(lengths) + 1
        x, context = torch.randn(B, C, *side, generator=g), torch.randn(B, N, D, generator=g)
        mask = _padding_mask(B, N, lengths)
        with torch.no_grad():
            out = fn(m, x, context, mask)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise CheckFailed(f"expected (output, weights), got {type(out).__name__}")
            ref = m(x, context, mask)
            # The package's weights: attention() with V = the identity returns softmax(Q K^T / sqrt(d) + M) itself.
            q = m.q(m.norm(x).flatten(2).transpose(1, 2)).view(B, -1, heads, C // heads).transpose(1, 2)
            k = m.k(context).view(B, N, heads, C // heads).transpose(1, 2)
            eye = torch.eye(N).expand(B, heads, N, N)
            ref_w = attention(q, k, eye, mask[:, None, None, :], plain=True)
        where = f"x {(B, C, *side)}, {heads} head(s), prompt lengths {lengths} of {N}"
        _close(out[0], ref, f"output, {where}", rtol=1e-4, atol=1e-5)
        _close(out[1], ref_w, f"attention weights (B, heads, HW, N), {where}", rtol=1e-4, atol=1e-6)
    return run


def _drop_prompts(B: int, N: int, seed: int, p: float) -> Case:
    def run(fn):
        g = _gen(seed)
        lengths = tuple(int(v) for v in torch.randint(2, N + 1, (B,), generator=g))
        ids = torch.randint(2, 20, (B, N), generator=g) * _padding_mask(B, N, lengths)
        ids[:, 0] = 1                                                  # [bos]
        mask = _padding_mask(B, N, lengths)
        null_ids, null_mask = torch.zeros(1, N, dtype=torch.long), _padding_mask(1, N, (1,))
        null_ids[0, 0] = 1                                             # "" = [bos] alone
        drop = torch.rand(B, generator=g) < p
        # the package's own step (stage3.LatentDiffusionTask.drop_condition) on a stand-in for the task
        task = type("TextTask", (), {"conditioning": "text", "null_ids": null_ids, "null_mask": null_mask})()
        ref_ids, ref_mask = LatentDiffusionTask.drop_condition(task, (ids, mask), drop)
        out = fn(ids.clone(), mask.clone(), drop, null_ids, null_mask)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"expected (ids, mask), got {type(out).__name__}")
        where = f"{B} prompts, {int(drop.sum())} dropped"
        for mine, ref, what in ((out[0], ref_ids, "ids"), (out[1], ref_mask, "mask")):
            if not isinstance(mine, torch.Tensor) or tuple(mine.shape) != tuple(ref.shape) or mine.dtype != ref.dtype:
                raise CheckFailed(f"{what}, {where}: expected a {ref.dtype} tensor {tuple(ref.shape)}, got "
                                  f"{getattr(mine, 'dtype', type(mine).__name__)} {tuple(getattr(mine, 'shape', ()))}")
            if not torch.equal(mine, ref):
                rows = (mine != ref).reshape(B, -1).any(1).nonzero().flatten().tolist()
                raise CheckFailed(f"{what}, {where}: rows {rows} differ from the package's")
    return run


# ---------------------------------------------------------------- 08: rectified flow
def _flow_path(shape: tuple[int, ...], seed: int, ends: bool = False) -> Case:
    def run(fn):
        g = _gen(seed)
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.rand(shape[0], generator=g)
        if ends:
            t[0], t[-1] = 0.0, 1.0                                    # the data end and the noise end exactly
        flow = RectifiedFlow()
        out = fn(x0, eps, t)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"expected (x_t, v), got {type(out).__name__}")
        _close(out[0], flow.q_sample(x0, t, eps), f"x_t for shape {shape}", rtol=1e-5, atol=1e-6)
        _close(out[1], flow.target(x0, eps, t), f"v for shape {shape}", rtol=1e-5, atol=1e-6)
    return run


def _shift_time(shift: float, n: int) -> Case:
    def run(fn):
        u = torch.linspace(0, 1, n, dtype=torch.float64)
        _close(fn(u, shift), shift_time(u, shift), f"shifted times (shift {shift:g}, {n} points)", rtol=1e-9,
               atol=1e-12)
    return run


def _heun_step(t: float, t_next: float, w: float, seed: int) -> Case:
    def run(fn):
        flow = RectifiedFlow(FlowConfig())
        model = _toy_denoiser(4, seed)
        g = _gen(seed + 100)
        x = torch.randn(3, 4, 6, 6, generator=g)
        y, null = torch.tensor([1, 4, 7]), torch.full((3,), 10)

        def velocity(x_: torch.Tensor, t_: float) -> torch.Tensor:   # the guided v at time t_ (flow.guided_v)
            return flow.guided_v(model, x_, t_, y, null, w)
        ref = flow.step(model, x, t, t_next, y, null, w, sampler="heun")
        _close(fn(x, t, t_next, velocity), ref, f"x_next (t={t:g} -> {t_next:g}, w={w:g})", rtol=1e-5, atol=1e-5)
    return run


# ---------------------------------------------------------------- 09: editing in the latent
def _ddim_invert(kind: str, T: int, t: int, t_next: int, seed: int) -> Case:
    def run(fn):
        diffusion, _, _ = _schedule(kind, T)
        g = _gen(seed)
        x, eps = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(2))
        ab_t = 1.0 if t == editing.CLEAN else float(diffusion.alpha_bars[t])   # the clean end: alpha_bar = 1
        ab_next = float(diffusion.alpha_bars[t_next])
        ref = editing.ddim_invert_step(diffusion, eps, t, t_next, x)
        where = "x0" if t == editing.CLEAN else f"t={t}"
        _close(fn(x, eps, ab_t, ab_next), ref, f"x_next ({kind} schedule, {where} -> t={t_next})",
               rtol=1e-5, atol=1e-5)
    return run


def _inpaint_merge(kind: str, T: int, level: int, shape: tuple[int, ...], seed: int) -> Case:
    def run(fn):
        objective = DDPMObjective(DiffusionConfig(num_timesteps=T, schedule=kind))
        g = _gen(seed)
        z, z0, eps = (torch.randn(shape, generator=g) for _ in range(3))
        mask = torch.rand(shape[0], 1, *shape[2:], generator=g) < 0.5              # (B, 1, h, w), True = regenerate
        ab = 1.0 if level == editing.CLEAN else float(objective.diffusion.alpha_bars[level])
        ref = torch.where(mask, z, editing.noise_to(objective, z0, level, eps))    # as editing.edit_latent does
        where = "the clean level" if level == editing.CLEAN else f"t={level}"
        _close(fn(z, z0, eps, mask, ab), ref, f"merged latent ({kind} schedule, {where}, shape {shape})",
               rtol=1e-5, atol=1e-6)
    return run

EXERCISES: dict[str, Exercise] = {e.name: e for e in (
    Exercise("reparameterize", "01_autoencoder", "z = mean + exp(logvar / 2) * eps",
             (_reparameterize((2, 4, 8, 8), 0, 1.0), _reparameterize((3, 2, 5, 7), 7, 3.0),
              _reparameterize((1, 1, 4, 4), 11, 0.1))),
    Exercise("kl", "01_autoencoder", "KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)",
             (_kl((2, 4, 8, 8), 0, 1.0), _kl((3, 2, 5, 7), 7, 3.0), _kl((1, 8, 2, 2), 11, 0.05))),
    Exercise("lpips", "02_perceptual_adversarial", "d(x, y) = sum_l mean_hw ||w_l (f_hat_x - f_hat_y)||^2",
             (_lpips((2, 3, 32, 32), 0, 0.1), _lpips((3, 3, 24, 40), 5, None), _lpips((1, 3, 16, 16), 9, 0.5))),
    Exercise("hinge_d_loss", "02_perceptual_adversarial", "L_D = 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_rec))])",
             (_hinge(torch.tensor([2.0, 0.5, -0.3]), torch.tensor([-1.5, 0.2, 1.0])),
              _hinge((4, 1, 6, 6), (4, 1, 6, 6), seed=3), _hinge((2, 1, 5, 5), (3, 1, 5, 5), seed=4))),
    Exercise("adaptive_weight", "02_perceptual_adversarial", "lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4), clamped",
             (_adaptive(0, 1e4), _adaptive(1, 1e-2), _adaptive(2, 1e4, gan_grad=False), _adaptive(3, 1e4))),
    Exercise("scale_factor", "03_latent_space", "s = 1 / std(z), z ~ q(z | x) over the training images",
             (_scale_factor(1, 100, 16, 64, 0), _scale_factor(3, 40, 8, 16, 1), _scale_factor(1, 65, 8, 64, 2))),
    Exercise("q_sample", "04_ddpm", "x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps",
             (_q_sample("linear", 1000, (3, 1, 8, 8), [0, 250, 999], 0),
              _q_sample("cosine", 1000, (4, 3, 5, 5), [1, 10, 500, 998], 1),
              _q_sample("linear", 50, (2, 2, 4, 4), [49, 7], 2))),
    Exercise("q_posterior", "04_ddpm", "mu_tilde = c1 x0 + c2 x_t, beta_tilde = (1 - ab_prev) / (1 - ab_t) beta_t",
             (_q_posterior("linear", 1000, (1, 1, 8, 8), 300, 0), _q_posterior("linear", 1000, (2, 3, 4, 4), 1, 1),
              _q_posterior("cosine", 1000, (2, 1, 4, 4), 700, 2), _q_posterior("linear", 50, (3, 2, 4, 4), 49, 3))),
    Exercise("p_mean", "04_ddpm", "mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)",
             (_p_mean("linear", 1000, (1, 1, 8, 8), 300, 0), _p_mean("linear", 1000, (2, 3, 4, 4), 999, 1),
              _p_mean("cosine", 1000, (2, 1, 4, 4), 40, 2), _p_mean("linear", 50, (3, 2, 4, 4), 1, 3))),
    Exercise("eps_loss", "04_ddpm", "L_simple = mean ||eps - eps_theta(x_t, t, y)||^2",
             (_eps_loss("linear", 1000, (4, 1, 8, 8), True, 0), _eps_loss("cosine", 1000, (3, 3, 6, 6), True, 1),
              _eps_loss("linear", 50, (5, 2, 4, 4), False, 2))),
    Exercise("ddim_step", "04_ddpm", "x_prev = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma^2) eps + sigma z",
             (_ddim("linear", 1000, 600, 560, 0.0, 0), _ddim("linear", 1000, 300, 250, 1.0, 1),
              _ddim("cosine", 1000, 999, 899, 0.5, 2), _ddim("linear", 1000, 20, -1, 0.0, 3))),
    Exercise("guidance", "04_ddpm", "eps = eps_uncond + w (eps_cond - eps_uncond)",
             (_guidance(3.0, (2, 1, 8, 8), 0), _guidance(1.0, (3, 2, 4, 4), 1), _guidance(0.0, (2, 1, 4, 4), 2),
              _guidance(7.5, (4, 3, 4, 4), 3))),
    Exercise("encode_latents", "05_latent_diffusion",
             "z0 = (mode(q(z | x)) - shift_factor) * scale_factor (the latent cache)",
             (_encode_latents(1, 8, 32, 0.8, 0), _encode_latents(3, 5, 8, 2.5, 1, shift_factor=-0.8),
              _encode_latents(1, 1, 16, 0.3, 2, shift_factor=0.5))),
    Exercise("decode_latents", "05_latent_diffusion",
             "x = clamp(decode(z0 / scale_factor + shift_factor), -1, 1), once per image",
             (_decode_latents(1, 8, 8, 0.8, 1.0, 0), _decode_latents(3, 3, 2, 2.5, 3.0, 1, shift_factor=-0.8),
              _decode_latents(1, 1, 4, 0.25, 0.5, 2, shift_factor=0.5))),
    Exercise("patchify", "06_dit", "(B, C, H, W) -> (B, N, P*P*C), patches row-major, (p1, p2, c) inside",
             (_patchify((1, 4, 8, 8), 2, 0), _patchify((2, 3, 6, 10), 2, 1), _patchify((3, 4, 8, 8), 4, 2),
              _patchify((2, 2, 3, 5), 1, 3))),
    Exercise("unpatchify", "06_dit", "(B, N, P*P*C) -> (B, C, h P, w P), the inverse of patchify",
             (_unpatchify(1, 4, 4, 4, 2, 0), _unpatchify(2, 3, 3, 5, 2, 1), _unpatchify(2, 2, 2, 2, 4, 2))),
    Exercise("sincos_2d", "06_dit", "PE(x, y) = [sin(x w), cos(x w), sin(y w), cos(y w)], w_k = 10000^(-k / (D/4))",
             (_sincos_2d(32, 4, 4), _sincos_2d(64, 16, 16), _sincos_2d(8, 3, 5), _sincos_2d(128, 2, 7))),
    Exercise("modulate", "06_dit", "adaLN: x (1 + scale) + shift, per sample, over every token",
             (_modulate(2, 16, 32, 0), _modulate(3, 5, 8, 1), _modulate(1, 1, 4, 2))),
    Exercise("adaln_block", "06_dit", "x + gate1 Attn(modulate(LN(x))), then + gate2 MLP(modulate(LN(x)))",
             (_adaln_block(2, 16, 32, 2, 0), _adaln_block(3, 7, 16, 4, 1), _adaln_block(1, 4, 64, 1, 2))),
    Exercise("drop_prompts", "07_text_to_image", "condition dropout: a dropped caption becomes \"\" ([bos] alone), "
             "ids and mask together",
             (_drop_prompts(8, 6, 0, 0.5), _drop_prompts(5, 9, 1, 1.0), _drop_prompts(6, 4, 2, 0.0),
              _drop_prompts(16, 7, 3, 0.3))),
    Exercise("cross_attention", "07_text_to_image", "x + W_O softmax(Q K^T / sqrt(d) + M) V, Q from the feature map, "
             "K and V from the prompt, M = -inf at padding",
             (_cross_attention(2, 32, 16, 2, (8, 8), (6, 1), 0), _cross_attention(3, 16, 8, 4, (4, 6), (3, 5, 2), 1),
              _cross_attention(1, 8, 12, 1, (2, 2), (4,), 2), _cross_attention(2, 24, 24, 3, (3, 3), (7, 7), 3))),
    Exercise("flow_path", "08_flow_matching", "x_t = (1 - t) x0 + t eps, v = dx_t / dt = eps - x0",
             (_flow_path((4, 4, 8, 8), 0), _flow_path((3, 1, 5, 7), 1, ends=True), _flow_path((2, 3, 4, 4), 2))),
    Exercise("shift_time", "08_flow_matching", "t = shift u / (1 + (shift - 1) u) (SD3 Sec. 5.3.2)",
             (_shift_time(3.0, 9), _shift_time(1.0, 5), _shift_time(0.5, 17), _shift_time(6.0, 2))),
    Exercise("heun_step", "08_flow_matching", "x' = x + dt v(x, t); x_next = x + dt (v(x, t) + v(x', t_next)) / 2, "
             "plain Euler when t_next = 0",
             (_heun_step(0.75, 0.5, 3.0, 0), _heun_step(0.9, 0.3, 1.0, 1), _heun_step(0.25, 0.0, 3.0, 2),
              _heun_step(0.2, 0.6, 2.0, 3))),
    Exercise("ddim_invert_step", "09_editing", "x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t); "
             "x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next) eps",
             (_ddim_invert("linear", 1000, 20, 40, 0), _ddim_invert("linear", 1000, editing.CLEAN, 0, 1),
              _ddim_invert("cosine", 1000, 500, 700, 2), _ddim_invert("linear", 50, 10, 30, 3))),
    Exercise("inpaint_merge", "09_editing", "z = m z + (1 - m) (sqrt(ab) z0 + sqrt(1 - ab) eps), the kept part "
             "noised to the new level",
             (_inpaint_merge("linear", 1000, 480, (2, 4, 8, 8), 0), _inpaint_merge("linear", 1000, editing.CLEAN,
                                                                                   (3, 4, 8, 8), 1),
              _inpaint_merge("cosine", 1000, 999, (1, 3, 5, 7), 2), _inpaint_merge("linear", 50, 0, (2, 2, 4, 4), 3))),
)}


def grade(name: str, answer: Any) -> Result:
    """Run every case of exercise `name` on `answer` (visible first); the first failure is the result."""
    if name not in EXERCISES:
        raise ValueError(f"unknown exercise {name!r}; valid: {', '.join(EXERCISES)}")
    cases = EXERCISES[name].cases
    for i, case in enumerate(cases):
        label = "visible check" if i == 0 else f"hidden check {i}/{len(cases) - 1}"
        try:
            with torch.random.fork_rng(devices=[]):
                case(answer)
        except NotImplementedError as e:
            return Result(name, "not attempted", str(e) or "NotImplementedError")
        except CheckFailed as e:
            return Result(name, "failed", f"{label}: {e}")
        except Exception as e:  # noqa: BLE001 - a student's bug of any kind is a failed check, said plainly
            return Result(name, "failed", f"{label}: raised {type(e).__name__}: {e}")
    hidden = len(cases) - 1
    return Result(name, "passed", f"visible check and {hidden} hidden check{'s' if hidden != 1 else ''}")


def record(result: Result, path: str | os.PathLike | None = None) -> None:
    """Append `result` to the JSON list in `path` (default: $LDM_COURSE_RESULTS; nothing when unset)."""
    path = path or os.environ.get(RESULTS_ENV)
    if not path:
        return
    results = json.loads(open(path).read()) if os.path.exists(path) and os.path.getsize(path) else []
    results.append({"name": result.name, "status": result.status, "message": result.message})
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def check(name: str, answer: Any) -> Result:
    """The notebooks' check cell: grade, print one line, record; raise when not passed (nbgrader counts that)."""
    result = grade(name, answer)
    mark = {"passed": "PASS", "failed": "FAIL", "not attempted": "TODO"}[result.status]
    print(f"[{mark}] {name}: {result.status} ({result.message})")
    record(result)
    if result.status == "failed":
        raise CheckFailed(f"{name}: {result.message}") from None
    if result.status == "not attempted":
        raise NotImplementedError(f"{name}: not attempted yet ({result.message})") from None
    return result
