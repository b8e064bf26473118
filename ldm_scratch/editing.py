"""Editing a real image in the latent: img2img (SDEdit), deterministic inversion, and inpainting.

The latent is where a real image gets edited: encode it once, move it along the noise process, decode once.
    image (B, C, H, W) in [-1, 1] -> AutoencoderKL.scale_latents(encode(.).mode()) -> z0 (B, c, h, w)
    -> noise z0 to a level set by the strength s -> denoise from there with the new condition -> z0'
    -> decode(unscale_latents(z0')), once
(The posterior's mode, not a sample: an edit is then a deterministic function of the image, the noise and
the condition, and strength 0 gives back the autoencoder's own reconstruction.)

img2img, SDEdit (Meng et al. 2022, Sec. 3): noising forgets the fine detail and keeps the coarse layout;
the reverse process, under a new condition, repaints the detail. The strength s in [0, 1] says how far:
  DDPM   diffusers' img2img convention: of the sampler's N DDIM times tau_{N-1} > ... > tau_0, run the
         last k = round(s N) (at least 1 when s > 0), starting from
           z_s = sqrt(alpha_bar_tau) z0 + sqrt(1 - alpha_bar_tau) eps,  tau = tau_{k-1}   (Ho et al. 2020, Eq. 4)
         s = 1 starts from eps itself, exactly as plain sampling does (at tau_{N-1} = 980 of 1000, "leading"
         spacing, sqrt(alpha_bar) = 0.006: the sampler treats pure noise as that level, and so do we).
  flow   s is the time itself: z_s = (1 - s) z0 + s eps, the straight path at t = s (flow.py), integrated
         to 0 in k = round(u_s N) steps, u_s = unshift_time(s): the step size plain sampling would take.
  s = 0 runs no step (z0' = z0: the reconstruction); s = 1 is plain sampling from the same eps.

Deterministic inversion: an eta = 0 sampler is the discretisation of an ODE (Song et al. 2021, Sec. 4.3,
Eq. 13; for rectified flow dx/dt = v), which can be run backwards, image -> noise. DDIM's step tau_i -> tau_{i-1},
    x_{i-1} = sqrt(ab_{i-1}) (x_i - sqrt(1 - ab_i) eps_i) / sqrt(ab_i) + sqrt(1 - ab_{i-1}) eps_i   (Eq. 12)
with eps_i = eps_theta(x_i, tau_i), solved for x_i with eps_i taken at the point we have, x_{i-1}:
    x_i = sqrt(ab_i) (x_{i-1} - sqrt(1 - ab_{i-1}) eps) / sqrt(ab_{i-1}) + sqrt(1 - ab_i) eps,
    eps = eps_theta(x_{i-1}, tau_i)      (Dhariwal & Nichol 2021, App. F; Mokady et al. 2023, Sec. 3)
It is exact as the steps shrink (x_{i-1} -> x_i), first order in the step size, and starts from x0 itself
(ab = 1), mirroring the sampler's final jump to x0. The flow's inverse is the same ODE integrated upwards
(RectifiedFlow.invert). Classifier-free guidance makes the field less smooth, and the round trip worse.

Inpainting without retraining (Lugmayr et al. 2022, "RePaint", Eq. 8, without its resampling; the
"blended" latent inpainting of Avrahami et al. 2023): after every step the known region (mask 0) is replaced
by the encoded image noised to the step's new level with the same eps; only the masked region (mask 1) is
denoised freely. The mask is given in pixels and max-pooled to the latent grid (`mask_to_latent`).
Deterministic samplers trace z_t = sqrt(ab) z0 + sqrt(1 - ab) eps (DDPM) or (1 - t) z0 + t eps (flow) for
a denoiser that knows z0, so one fixed eps is the path the known region would follow; at the last level
it is z0 itself, so the known latent comes back exactly. The decoded image does not: the decoder renders the
kept latent no better than its own reconstruction, and the repainted cells next door reach into the kept pixels
through its receptive field. So by default the image's own pixels are pasted back where the pixel mask is 0
(`paste_pixels`, what image editors and diffusers' `apply_overlay` do): only the masked pixels are new.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ldm_scratch.autoencoder import RANGE_SLACK
from ldm_scratch.diffusion import Cond, Denoiser, GaussianDiffusion, NullCond
from ldm_scratch.flow import RectifiedFlow, unshift_time
from ldm_scratch.objectives import DDPMObjective, Objective

# The deterministic samplers each objective edits with: DDPM's ancestral sampler runs all T steps from pure
# noise and cannot be inverted; DDIM (eta = 0) can.
EDIT_SAMPLERS = {"ddpm": ("ddim",), "flow": ("euler", "heun")}
CLEAN = -1   # DDPM's level after the last step: "t = -1", alpha_bar = 1, the sampler's final jump to x0


# ------------------------------------------------------------------------------ inputs, checked at the door
def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 = the reconstruction, 1 = plain sampling); "
                         f"got {strength!r}")


def check_edit_sampler(objective: Objective, sampler: str) -> None:
    valid = EDIT_SAMPLERS[objective.name]
    if sampler not in valid:
        raise ValueError(f"sampler {sampler!r} cannot edit: editing needs a deterministic sampler; this pipeline's "
                         f"objective ({objective.name}) edits with {', '.join(valid)}")


def image_to_tensor(image: Any, channels: int, size: int, f: int) -> Tensor:
    """A PIL image, a uint8 array ((H, W), (H, W, C) or (B, H, W, C)), a list of those, or a float tensor
    ((C, H, W) or (B, C, H, W)) in [-1, 1] -> (B, C, H, W) float32 in [-1, 1], every way it can be wrong named."""
    if isinstance(image, (list, tuple)) and image and not isinstance(image[0], (int, float)):
        return torch.cat([image_to_tensor(im, channels, size, f) for im in image])
    if isinstance(image, Image.Image):
        grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
        image = np.asarray(image.convert("L" if grey else "RGB"))   # RGBA, P, CMYK -> RGB (alpha dropped)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 in 0..255 ((H, W), (H, W, C) or (B, H, W, C)), got "
                             f"{image.dtype}; for floats pass a torch tensor (B, C, H, W) in [-1, 1]")
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"numpy images must be (H, W), (H, W, C) or (B, H, W, C); got shape {image.shape}")
        arr = image[None, :, :, None] if image.ndim == 2 else image[None] if image.ndim == 3 else image
        # {0..255} -> [-1, 1]: x / 127.5 - 1, the inverse of pipeline.to_pil's (x + 1) * 127.5
        # (B, H, W, C) -> (B, C, H, W), transposed in numpy so the tensor has the standard strides (a permuted
        # view with C = 1 would read as channels-last to the convolutions, which then round differently)
        image = torch.from_numpy(np.array(arr.transpose(0, 3, 1, 2), order="C")).float() / 127.5 - 1
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a PIL image, a uint8 numpy array or a float tensor in [-1, 1]; "
                         f"got {type(image).__name__}")
    if not image.is_floating_point():
        hint = ": divide by 127.5 and subtract 1" if image.dtype == torch.uint8 else ""
        raise ValueError(f"image tensors must be float in [-1, 1], got dtype {image.dtype}{hint}")
    if image.dim() == 3:
        image = image.unsqueeze(0)                                         # (C, H, W) -> (1, C, H, W)
    if image.dim() != 4:
        raise ValueError(f"image tensors must be (C, H, W) or (B, C, H, W); got shape {tuple(image.shape)}")
    B, C, H, W = image.shape
    if C != channels:
        what = {1: "a grey image", 3: "an RGB image"}.get(C, f"{C} channels")
        raise ValueError(f"this pipeline's autoencoder takes {channels} channel(s), got {C} ({what}) in shape "
                         f"{tuple(image.shape)}" + ("; convert it (PIL: image.convert('L'))" if channels == 1 else ""))
    if H % f or W % f:
        raise ValueError(f"image size {H}x{W} is not divisible by the autoencoder's downsampling factor f={f}; "
                         f"this pipeline takes {size}x{size}")
    if (H, W) != (size, size):
        raise ValueError(f"image size {H}x{W}: this pipeline makes {size}x{size} images (latent "
                         f"{size // f}x{size // f} times f={f}); resize it to {size}x{size}")
    lo, hi = (v.item() for v in torch.aminmax(image.detach().float()))   # NaN makes both NaN
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image has NaN or inf values; expected float values in [-1, 1]")
    if hi > 1 + RANGE_SLACK or lo < -1 - RANGE_SLACK:   # the autoencoder's own slack for decoded images
        hint = ": divide by 127.5 and subtract 1" if hi > 2 else ""
        raise ValueError(f"expected an image in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return image.float()


def mask_to_latent(mask: Any, image_shape: tuple[int, ...], f: int) -> Tensor:
    """A pixel mask (H, W) or (B, 1, H, W), 1 = regenerate, as a tensor, a numpy array or a PIL image
    (white = regenerate) -> (B or 1, 1, H/f, W/f) bool. A latent cell is regenerated when any of its f x f
    pixels is: then no pixel the user wants repainted is pinned to the old content."""
    return F.max_pool2d(mask_to_pixels(mask, image_shape).float(), f) > 0  # (B, 1, H, W) -> (B, 1, H/f, W/f)


def mask_to_pixels(mask: Any, image_shape: tuple[int, ...]) -> Tensor:
    """The pixel mask, checked, as (B or 1, 1, H, W) bool (True = regenerate); mask_to_latent says which forms."""
    B, _, H, W = image_shape
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        # uint8 masks are 0..255 images (> 127 = regenerate); others are read as numbers in [0, 1]
        mask = torch.from_numpy(mask > 127 if mask.dtype == np.uint8 else mask.astype(np.float32))
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, a numpy array or a PIL image; got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None, None]                                            # (H, W) -> (1, 1, H, W)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or tuple(mask.shape[2:]) != (H, W):
        raise ValueError(f"mask must be (H, W) or (B, 1, H, W) matching the image's {H}x{W} pixels and batch "
                         f"{B} (or 1); got shape {tuple(mask.shape)}")
    mask = mask.float()
    if mask.numel() and not (0 <= mask.min().item() and mask.max().item() <= 1):   # NaN fails too
        raise ValueError(f"mask values must be in [0, 1] (1 = regenerate, 0 = keep); got values up to "
                         f"{mask.max().item():g}" + (": divide by 255" if mask.max().item() > 1 else ""))
    return mask > 0.5


# ------------------------------------------------------------------------------ the noise levels
def levels(objective: Objective, strength: float, num_steps: int, shift: float | None = None) -> list:
    """The levels an edit of this strength visits, noisiest first, ending clean (len = steps run + 1).
    DDPM: integer times, then CLEAN (-1); flow: times in [0, 1] down to 0 (see the module docstring)."""
    if isinstance(objective, DDPMObjective):
        ts = objective.diffusion.ddim_timesteps(num_steps)              # tau_{N-1} > ... > tau_0
        k = 0 if strength == 0 else max(1, round(strength * num_steps))  # the last k of them
        return ts[num_steps - k:] + [CLEAN]
    if strength == 0:
        return [0.0]
    shift = objective.cfg.shift if shift is None else shift
    k = max(1, round(unshift_time(strength, shift) * num_steps))        # plain sampling's step size
    return objective.timesteps(k, shift, t_start=strength)


def noise_to(objective: Objective, z0: Tensor, level: int | float, eps: Tensor) -> Tensor:
    """z0 noised to `level` with the given eps: q_sample for either objective; the clean level is z0 itself."""
    if level == CLEAN and isinstance(objective, DDPMObjective):
        return z0
    if isinstance(objective, DDPMObjective):
        # Ho et al. 2020, Eq. 4: z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps
        return objective.diffusion.q_sample(z0, torch.full((z0.shape[0],), level, device=z0.device), eps)
    return objective.q_sample(z0, level, eps)                           # (1 - t) z0 + t eps


def step(objective: Objective, model: Denoiser, z: Tensor, level: int | float, level_next: int | float,
         cond: Cond, null_cond: NullCond, guidance_scale: float, sampler: str, eta: float = 0.0,
         generator: torch.Generator | None = None) -> Tensor:
    """One sampler step towards the clean end: DDIM (Song et al. 2021, Eq. 12) or the flow's Euler / Heun,
    the same calls GaussianDiffusion.sample_ddim and RectifiedFlow.sample make."""
    if isinstance(objective, DDPMObjective):
        diffusion: GaussianDiffusion = objective.diffusion
        t_batch = torch.full((z.shape[0],), level, device=z.device, dtype=torch.long)
        eps = diffusion.guided_eps(model, z, t_batch, cond, null_cond, guidance_scale)
        return diffusion.ddim_step(eps, level, level_next, z, eta, generator)
    return objective.step(model, z, level, level_next, cond, null_cond, guidance_scale, sampler)


def ddim_invert_step(diffusion: GaussianDiffusion, eps: Tensor, t: int, t_next: int, x: Tensor) -> Tensor:
    """One DDIM inversion step x_t -> x_{t_next}, t_next > t (t = CLEAN: x is x0), given eps = eps_theta(x_t, t_next)."""
    ab_t = 1.0 if t == CLEAN else float(diffusion.alpha_bars[t])
    ab_next = float(diffusion.alpha_bars[t_next])
    # Eq. 12's predicted x0, at the point we have: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    # Eq. 12 with sigma = 0, towards the noisier level: x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next) eps
    return math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps


# ------------------------------------------------------------------------------ the edits, in the latent
@torch.no_grad()
def edit_latent(objective: Objective, model: Denoiser, z0: Tensor, strength: float, num_steps: int,
                cond: Cond = None, null_cond: NullCond = None, guidance_scale: float = 1.0, sampler: str = "ddim",
                generator: torch.Generator | None = None, eps: Tensor | None = None, mask: Tensor | None = None,
                eta: float = 0.0, shift: float | None = None, progress: bool = False) -> Tensor:
    """img2img (mask None) or inpainting (mask (B or 1, 1, h, w) bool, True = regenerate) of scaled latents z0
    (B, c, h, w) -> z0' (B, c, h, w) float32. eps: the noise (default drawn from `generator`, as sampling
    draws x_T, so strength 1 is plain sampling from the same generator); eta: DDIM's noise (DDPM only)."""
    check_strength(strength)
    z0 = z0.float()
    if eps is None:
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)   # the same draw as x_T in sampling
    lv = levels(objective, strength, num_steps, shift)
    pure = isinstance(objective, DDPMObjective) and len(lv) == num_steps + 1   # s = 1: start from eps itself
    z = eps.float() if pure else noise_to(objective, z0, lv[0], eps)
    if mask is not None:   # the known region starts on its own path too (matters only for DDPM at s = 1)
        z = torch.where(mask, z, noise_to(objective, z0, lv[0], eps))
    for i in tqdm(range(len(lv) - 1), desc=f"edit ({sampler})", disable=not progress):
        z = step(objective, model, z, lv[i], lv[i + 1], cond, null_cond, guidance_scale, sampler, eta, generator)
        if mask is not None:
            # RePaint, Eq. 8: x_{t-1} = m * x_{t-1}^unknown + (1 - m) * x_{t-1}^known, the known part noised
            # to the new level; torch.where keeps it bit-exact (at the clean level it is z0 itself)
            z = torch.where(mask, z, noise_to(objective, z0, lv[i + 1], eps))
    return z


@torch.no_grad()
def invert_latent(objective: Objective, model: Denoiser, z0: Tensor, num_steps: int, cond: Cond = None,
                  null_cond: NullCond = None, guidance_scale: float = 1.0, sampler: str = "ddim",
                  shift: float | None = None, progress: bool = False) -> Tensor:
    """Scaled latents z0 (B, c, h, w) -> the noise z_T that the deterministic sampler (num_steps, the same
    guidance) turns back into about z0: edit_latent(strength=1, eps=z_T) regenerates it."""
    if isinstance(objective, RectifiedFlow):
        return objective.invert(model, z0.float(), cond, null_cond, guidance_scale, num_steps, sampler, shift,
                                progress=progress)
    diffusion: GaussianDiffusion = objective.diffusion
    ups = [CLEAN] + diffusion.ddim_timesteps(num_steps)[::-1]           # CLEAN, tau_0, tau_1, ..., tau_{N-1}
    x = z0.float()
    for t, t_next in tqdm(list(zip(ups[:-1], ups[1:])), desc="DDIM inversion", disable=not progress):
        # the time label of the sampling step this undoes (tau_next -> tau), at the point we have
        t_batch = torch.full((x.shape[0],), t_next, device=x.device, dtype=torch.long)
        eps = diffusion.guided_eps(model, x, t_batch, cond, null_cond, guidance_scale)
        x = ddim_invert_step(diffusion, eps, t, t_next, x)
    return x


def paste_pixels(generated: Tensor, source: Tensor, pixel_mask: Tensor) -> Tensor:
    """generated where the pixel mask (B or 1, 1, H, W) is True (regenerated), source elsewhere; (B, C, H, W)."""
    return torch.where(pixel_mask.to(generated.device), generated, source.to(generated.device, generated.dtype))


def round_trip(pipe: Any, image: Any, num_steps: int, guidance_scale: float = 1.0, **kw: Any) -> tuple[Tensor, Tensor, dict]:
    """Invert `image` with `pipe` (a LatentDiffusionPipeline), regenerate from that noise with the same options
    -> (the regenerated images, the autoencoder's reconstruction (strength 0), both (B, C, H, W) in [-1, 1],
    {"steps", "guidance_scale", "psnr_db" between the two, "latent_rms" of z0' - z0}). kw: prompt,
    class_labels, sampler, shift, precision. The reconstruction is the ceiling any edit in the latent can reach."""
    from ldm_scratch.metrics import psnr
    precision = kw.get("precision", "auto")
    z0 = pipe.encode(image, precision)
    z_T = pipe.invert(image, num_inference_steps=num_steps, guidance_scale=guidance_scale, **kw)
    z_back = pipe.img2img(image, strength=1.0, noise=z_T, num_inference_steps=num_steps,
                          guidance_scale=guidance_scale, output_type="latent", **kw).images
    back, rec = pipe.decode(z_back, "tensor", precision), pipe.decode(z0, "tensor", precision)
    return back, rec, {"steps": num_steps, "guidance_scale": guidance_scale, "psnr_db": psnr(back, rec),
                       "latent_rms": (z_back - z0).pow(2).mean().sqrt().item()}


def inversion_psnr(pipe: Any, image: Any, steps: tuple[int, ...] = (10, 50), guidance_scales: tuple[float, ...] = (1.0,),
                   **kw: Any) -> list[dict]:
    """round_trip's numbers for every (steps, guidance scale): the table of the issue's "round-trip error
    against the autoencoder's own reconstruction, as a function of steps and guidance"."""
    return [round_trip(pipe, image, n, w, **kw)[2] for n in steps for w in guidance_scales]
