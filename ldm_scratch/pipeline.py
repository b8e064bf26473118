"""The three rooms in one object: LatentDiffusionPipeline (Rombach et al. 2022, Sec. 3 and Fig. 3).

    prompt -> Tokenizer -> TextEncoder tau(y) -> context (B, N, D)     (or class labels, or nothing)
    z_T ~ N(0, I) (B, c, h, w) -> the objective's sampler (DDPM: DDIM / DDPM steps of eps_theta(z_t, t, cond);
        rectified flow: Euler / Heun steps of v_theta), with classifier-free guidance (Ho & Salimans 2022)
        as ONE batched forward on [cond; null] -> z0
    z0 / scale_factor + shift_factor -> AutoencoderKL.decode -> images (B, C, H, W) in [-1, 1], decoded once
    -> output_type: diffusers' "pil", "np", "pt" (both in [0, 1]) or "latent" (z0, undecoded), or our "tensor"

The denoiser never sees pixels: it dreams in the autoencoder's scaled latent space, and the decoder
renders only the final z0. `img2img`, `invert` and `inpaint` edit a real image through the same latent
(`encode` it, move it along the noise process, `decode` once): the maths is in editing.py. A trained pipeline is a local folder laid out like diffusers':
    model_index.json          which denoiser, which conditioning, package versions
    autoencoder/              config.json + model.pt (AutoencoderKL's own format; scale_factor inside)
    denoiser/                 config.json {"model": "unet" | "dit", "config": {...}} + model.pt
    scheduler/config.json     the objective's to_dict() (objectives.py): {"objective": "ddpm", T, betas, ...}
                              or {"objective": "flow", t_sampling, shift, ...}; a plain DiffusionConfig
                              (no "objective" key, the format before objectives) loads as DDPM
    text_encoder/             config.json (TextEncoderConfig + the tokenizer's vocabulary) + model.pt
Every file is written atomically; every missing, corrupt or mismatched file is a CheckpointError
naming it. This file holds no training code: stage3.py trains what it assembles.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import numpy as np
from PIL import Image
from torch import Tensor, nn

from ldm_scratch import __version__, editing
from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError, atomic_json_save, load_model_folder, read_json, save_model_folder
from ldm_scratch.config import TextEncoderConfig, UNetConfig, config_from_dict, config_to_dict
from ldm_scratch.device import CompiledForSampling, autocast, resolve_precision
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.objectives import DDPMObjective, Objective, objective_from_dict
from ldm_scratch.text import TextEncoder, Tokenizer
from ldm_scratch.unet import UNet

CONDITIONINGS = ("class", "text", "none")
# diffusers' four names (VaeImageProcessor.postprocess), then ours: "tensor" is the decoder's own [-1, 1] range,
# what our metrics and image grids read. See `postprocess` for each one's shape and range.
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "tensor")
DENOISER_KINDS = ("unet", "dit")
# kind -> (config class, model class). Both denoisers share one interface: forward(x, t, cond), .cfg with
# in_channels / sample_size / num_classes / context_dim, .null_class, .num_params().
DENOISERS: dict[str, tuple[type, type]] = {"unet": (UNetConfig, UNet)}
DIT_IMPORT_ERROR = ""
try:  # dit.py was written alongside this file; until it imports, "dit" is a known kind that cannot be built
    from ldm_scratch.config import DiTConfig
    from ldm_scratch.dit import DiT
    DENOISERS["dit"] = (DiTConfig, DiT)
except ImportError as e:
    DIT_IMPORT_ERROR = str(e)


def build_denoiser(kind: str, cfg: Any) -> nn.Module:
    """A fresh "unet" or "dit" from its config dataclass; a wrong kind or config is a ValueError."""
    if kind not in DENOISER_KINDS:
        raise ValueError(f"unknown denoiser {kind!r}; valid denoisers: {', '.join(DENOISER_KINDS)}")
    if kind not in DENOISERS:
        raise ValueError(f"denoiser {kind!r} needs ldm_scratch/dit.py, which did not import: {DIT_IMPORT_ERROR}")
    cfg_cls, model_cls = DENOISERS[kind]
    if not isinstance(cfg, cfg_cls):
        raise ValueError(f"a {kind!r} denoiser is built from a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return model_cls(cfg)


def denoiser_kind(model: nn.Module) -> str:
    for kind, (_, model_cls) in DENOISERS.items():
        if isinstance(model, model_cls):
            return kind
    raise ValueError(f"the denoiser must be one of {', '.join(DENOISER_KINDS)}, got {type(model).__name__}")


@dataclass
class PipelineOutput:
    """`images`: what `output_type` asked for (see `postprocess`): PIL images, an array or a tensor."""
    images: list[Image.Image] | np.ndarray | Tensor


def to_pil(x: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N PIL images (grey "L" for C = 1, "RGB" for C = 3)."""
    # [-1, 1] -> {0..255}: (x + 1) * 127.5, rounded, so -1 -> 0 and 1 -> 255 exactly
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()  # (N, C, H, W) -> (N, H, W, C)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def postprocess(x: Tensor, output_type: str) -> list[Image.Image] | np.ndarray | Tensor:
    """Decoded images x (N, C, H, W) in [-1, 1] -> output_type, with diffusers' conventions for its names:
      "pil"     N PIL images (grey "L" for C = 1, "RGB" for C = 3)
      "np"      a float32 numpy array (N, H, W, C) in [0, 1], on the CPU
      "pt"      a float tensor (N, C, H, W) in [0, 1], on the pipeline's device
      "tensor"  ours: x itself, (N, C, H, W) in [-1, 1], the range the autoencoder was trained on
    ("latent" never gets here: __call__ returns z0 before decoding.)"""
    if output_type == "tensor":
        return x
    if output_type == "pil":
        return to_pil(x)
    x01 = (x + 1) / 2  # [-1, 1] -> [0, 1]: diffusers' denormalize, x / 2 + 0.5
    if output_type == "pt":
        return x01
    return x01.permute(0, 2, 3, 1).cpu().numpy()  # "np": (N, C, H, W) -> (N, H, W, C)


class LatentDiffusionPipeline:
    """autoencoder + denoiser + objective (+ tokenizer and text encoder): sample images in one call.

    `objective`: an Objective (objectives.py: DDPMObjective or flow.RectifiedFlow), or a GaussianDiffusion,
    which is wrapped into a DDPMObjective around that same object (how every pipeline was built before)."""

    def __init__(self, autoencoder: AutoencoderKL, denoiser: nn.Module, objective: Objective | GaussianDiffusion,
                 tokenizer: Tokenizer | None = None, text_encoder: TextEncoder | None = None):
        if isinstance(objective, GaussianDiffusion):
            objective = DDPMObjective.from_diffusion(objective)
        if not isinstance(objective, Objective):
            raise ValueError(f"objective must be an Objective (DDPMObjective, RectifiedFlow) or a GaussianDiffusion; "
                             f"got {type(objective).__name__}")
        self.kind = denoiser_kind(denoiser)
        cfg = denoiser.cfg
        if (tokenizer is None) != (text_encoder is None):
            raise ValueError("pass the tokenizer and the text encoder together (text models), or neither")
        if cfg.in_channels != autoencoder.cfg.z_channels:
            raise ValueError(f"the denoiser takes {cfg.in_channels} channels but the autoencoder's latents have "
                             f"z_channels={autoencoder.cfg.z_channels}")
        if cfg.out_channels != cfg.in_channels:  # e.g. a DiT with learn_sigma: eps plus a variance
            raise ValueError(f"the denoiser outputs {cfg.out_channels} channels for {cfg.in_channels} in; "
                             "the objective trains one target (eps or v) alone (no learned variance): use out_channels = in_channels, "
                             "learn_sigma=False")
        if cfg.context_dim:
            if text_encoder is None:
                raise ValueError(f"this denoiser cross-attends to a text context (context_dim={cfg.context_dim}); "
                                 "pass tokenizer= and text_encoder=")
            if text_encoder.cfg.dim != cfg.context_dim:
                raise ValueError(f"the text encoder's width dim={text_encoder.cfg.dim} must equal the denoiser's "
                                 f"context_dim={cfg.context_dim}")
            if tokenizer.vocab_size != text_encoder.cfg.vocab_size or \
                    tokenizer.max_length > text_encoder.cfg.max_length:
                raise ValueError(f"the tokenizer ({tokenizer.vocab_size} ids, max_length {tokenizer.max_length}) "
                                 f"does not fit the text encoder (vocab_size {text_encoder.cfg.vocab_size}, "
                                 f"max_length {text_encoder.cfg.max_length})")
            self.conditioning = "text"
        elif text_encoder is not None:
            raise ValueError("a text encoder was given but the denoiser has no cross-attention (context_dim=0)")
        else:
            self.conditioning = "class" if cfg.num_classes else "none"
        self.autoencoder, self.denoiser, self.objective = autoencoder, denoiser, objective
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.compiled: CompiledForSampling | None = None  # set by compile()

    @property
    def diffusion(self) -> GaussianDiffusion:
        """The GaussianDiffusion of a DDPM pipeline (what pipe.diffusion was before objectives)."""
        if not isinstance(self.objective, DDPMObjective):
            raise AttributeError(f"this pipeline's objective is {self.objective.name!r}, not DDPM: it has no "
                                 "GaussianDiffusion; use pipe.objective")
        return self.objective.diffusion

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.autoencoder, self.denoiser, self.text_encoder) if m is not None]

    def to(self, device: torch.device | str) -> LatentDiffusionPipeline:
        for m in self.modules():
            m.to(device)
        if self.compiled is not None:  # frozen weights live on the old device: compile afresh
            self.compile(channels_last=self.compiled.channels_last, verbose=self.compiled.verbose,
                         inductor_patterns=self.compiled.inductor_patterns, pad_batches=self.compiled.pad_batches)
        return self

    def compile(self, enabled: bool = True, channels_last: bool | None = None,
                verbose: bool = True, inductor_patterns: bool = False,
                pad_batches: bool = True) -> LatentDiffusionPipeline:
        """Sample (and edit) through the denoiser compiled with torch.compile and its weights frozen in
        (device.CompiledForSampling): 2.1-2.6x faster sampling on the Intel box (README "Speed"), after 14-24 s
        of compiling at the first call of each batch shape, so it pays off from about a thousand images on. Off by
        default; compile(False) undoes it. channels_last (default: for the U-Net, whose convolutions gain from it)
        stores the denoiser's weights NHWC, in place, values unchanged. Training and save_pretrained always use
        the plain `denoiser`. inductor_patterns=True keeps inductor's pattern passes, which swap our attention for
        the fused kernel (slower here: device.CompiledDenoiser). pad_batches: a batch at most 1/8 smaller than one
        already compiled (the last of 1,000 images in batches of 256) runs padded to that size instead of compiling
        again (device.CompiledForSampling)."""
        if not enabled:
            self.compiled = None
            self.denoiser.to(memory_format=torch.contiguous_format)
            return self
        channels_last = self.kind == "unet" if channels_last is None else channels_last
        self.compiled = CompiledForSampling(self.denoiser, channels_last, verbose, inductor_patterns, pad_batches)
        return self

    @property
    def sampling_denoiser(self) -> nn.Module:
        """What the samplers call: the compiled wrapper after compile(), else the denoiser itself."""
        return self.denoiser if self.compiled is None else self.compiled

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, class_labels: int | list[int] | Tensor | None = None,
                 num_images: int | None = None, num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, sampler: str | None = None, eta: float = 0.0,
                 output_type: str = "pil", precision: str = "auto", batch_size: int = 256,
                 progress: bool = False, shift: float | None = None) -> PipelineOutput:
        """Generate images for prompts (text model), class labels (class model), or neither (unconditional).

        num_images: images per prompt / label (default 1); with neither given, the number of
        unconditional samples. guidance_scale w: eps_null + w (eps_cond - eps_null) (flow: on v); 1 = no
        guidance, and it is ignored (taken as 1) when there is no condition to guide towards.
        sampler: one of objective.sampler_names (default its first: "ddim" for DDPM, "euler" for flow).
        DDPM always runs all T steps (num_inference_steps is DDIM's); eta is DDIM's noise, shift the flow's
        timestep shift (default: the one saved in its config). Deterministic given `generator` (on this device).
        output_type: "pil" (default), "np" or "pt" (images in [0, 1], diffusers' conventions), "latent" (z0
        (N, c, h, w) in the scaled latent space, undecoded: decode(unscale_latents(z0)) renders it), or "tensor"
        (ours: (N, C, H, W) in [-1, 1]); `postprocess` has the shapes.
        """
        device = self.device
        sampler = self.objective.sampler_names[0] if sampler is None else sampler
        self._check_options(num_images, num_inference_steps, guidance_scale, sampler, eta, output_type,
                            precision, batch_size, shift)
        # the sampler's own options: DDIM's eta (no clip_x0: see below), or the flow's shift
        options = dict(eta=eta, clip_x0=False) if isinstance(self.objective, DDPMObjective) else dict(shift=shift)
        for m in self.modules():
            m.eval()
        cond, null, n, guided = self._condition(prompt, class_labels, num_images or 1, device, precision)
        w = float(guidance_scale) if guided else 1.0  # unconditional samples: cond = null, nothing to guide
        shape = (self.denoiser.cfg.in_channels, self.denoiser.cfg.sample_size, self.denoiser.cfg.sample_size)
        out = []
        for lo in range(0, n, batch_size):
            B = min(batch_size, n - lo)
            c = _take(cond, lo, lo + B)
            with autocast(device, precision):
                z0 = self.objective.sample(self.sampling_denoiser, (B, *shape), c, null, guidance_scale=w,
                                           num_steps=num_inference_steps, sampler=sampler, generator=generator,
                                           progress=progress, device=device, **options)
                if output_type == "latent":  # diffusers: the scaled z0 as the denoiser made it, never decoded
                    out.append(z0.float())
                    continue
                # No clip_x0 above: latents are not bounded to [-1, 1] (only pixels are), so clipping would
                # cut real content. Undo the unit-variance scaling (Sec. 4.3.2), then render once.
                x = self.autoencoder.decode(self.autoencoder.unscale_latents(z0))  # (B, c, h, w) -> (B, C, H, W)
            out.append(x.float().clamp(-1, 1))
        images = torch.cat(out)  # (N, C, H, W), or the latents (N, c, h, w)
        return PipelineOutput(images if output_type == "latent" else postprocess(images, output_type))

    def _check_options(self, num_images, num_inference_steps, guidance_scale, sampler, eta, output_type,
                       precision, batch_size, shift) -> None:
        """Every option checked before any work, each error saying what was expected and what was given;
        the sampler, its step count and the guidance by the objective (check_sample_args)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale!r}")
        if isinstance(self.objective, DDPMObjective):
            T = self.objective.T  # DDPM samples all T steps whatever num_inference_steps says, but checks it too
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                    or not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be an integer in 1..{T} (the training T); "
                                 f"got {num_inference_steps!r}")
            if shift is not None:
                raise ValueError(f"shift is a rectified-flow sampling option; this pipeline is DDPM (got {shift})")
            self.objective.check_sample_args(num_inference_steps, sampler, guidance_scale)
        else:
            if eta != 0:
                raise ValueError(f"eta is DDIM's noise; this pipeline's objective is {self.objective.name!r}, whose "
                                 f"samplers ({', '.join(self.objective.sampler_names)}) take none (got {eta})")
            self.objective.check_sample_args(num_inference_steps, sampler, guidance_scale, shift=shift)
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM's variance); got {eta}")
        for name, value in (("num_images", num_images), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        resolve_precision(precision, self.device)  # raises on an unknown name

    def _condition(self, prompt, class_labels, k: int, device: torch.device, precision: str):
        """-> (cond for every image or None, the null condition, number of images, whether to guide)."""
        kind = self.conditioning
        if prompt is not None and kind != "text":
            raise ValueError(f"this pipeline is {'class-conditional' if kind == 'class' else 'unconditional'}: "
                             f"it takes {'class_labels=' if kind == 'class' else 'neither prompt nor class_labels'}"
                             f", not a prompt")
        if class_labels is not None and kind != "class":
            raise ValueError(f"this pipeline is {'a text-to-image' if kind == 'text' else 'an unconditional'} model: "
                             f"it takes {'prompt=' if kind == 'text' else 'neither prompt nor class_labels'}, "
                             f"not class_labels")
        if kind == "none":
            return None, None, k, False
        if kind == "class":
            null = self.denoiser.null_class
            if class_labels is None:  # unconditional samples of a class model: every label is the null class
                return torch.full((k,), null, dtype=torch.long, device=device), null, k, False
            labels = _check_labels(class_labels, self.denoiser.cfg.num_classes)
            return labels.repeat_interleave(k).to(device), null, len(labels) * k, True  # (P,) -> (P k,)
        prompts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
        # The empty prompt ([bos] alone) is the null condition; encoding it in the same batch gives it the same
        # length. The tokenizer raises ValueError for an unknown word, listing the vocabulary.
        ids, mask = self.tokenizer.encode(list(prompts) + [""])  # (P + 1, L)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device, precision):
            context = self.text_encoder(ids, mask).float()  # (P + 1, L) -> (P + 1, L, D)
        null = (context[-1:], mask[-1:])  # (1, L, D), (1, L): repeated to the batch inside guided_eps
        if prompt is None:  # no prompt: unconditional samples, every image conditioned on the empty prompt
            return (null[0].expand(k, -1, -1), null[1].expand(k, -1)), null, k, False
        rows = torch.arange(len(prompts), device=device).repeat_interleave(k)  # (P k,): each prompt k times
        return (context[rows], mask[rows]), null, len(rows), True

    # ------------------------------------------------------------------ editing a real image (editing.py)
    @property
    def image_size(self) -> int:
        """The side of the images this pipeline makes and edits: the latent side times the autoencoder's f."""
        return self.denoiser.cfg.sample_size * self.autoencoder.cfg.f

    @torch.no_grad()
    def encode(self, image: Any, precision: str = "auto") -> Tensor:
        """Images (a PIL image or a list, a uint8 array, or a float tensor in [-1, 1]; checked by
        editing.image_to_tensor) -> scaled latents z0 = (mode - shift_factor) * scale_factor, (B, C, H, W) -> (B, c, h, w)."""
        x = editing.image_to_tensor(image, self.autoencoder.cfg.in_channels, self.image_size,
                                    self.autoencoder.cfg.f).to(self.device)
        self.autoencoder.eval()
        with autocast(self.device, precision):
            # the posterior's mode, not a sample: an edit is a deterministic function of its inputs
            return self.autoencoder.scale_latents(self.autoencoder.encode(x).mode().float())

    @torch.no_grad()
    def decode(self, z0: Tensor, output_type: str = "tensor", precision: str = "auto") -> Any:
        """Scaled latents z0 (B, c, h, w) -> images (B, C, H, W) in output_type, as __call__ renders them."""
        self.autoencoder.eval()
        with autocast(self.device, precision):
            x = self.autoencoder.decode(self.autoencoder.unscale_latents(z0.to(self.device)))  # (B, c, h, w) -> (B, C, H, W)
        return postprocess(x.float().clamp(-1, 1), output_type)

    def img2img(self, image: Any, strength: float = 0.6, prompt: str | list[str] | None = None,
                class_labels: int | list[int] | Tensor | None = None, num_inference_steps: int = 30,
                guidance_scale: float = 3.0, generator: torch.Generator | None = None, sampler: str | None = None,
                eta: float = 0.0, shift: float | None = None, noise: Tensor | None = None, output_type: str = "pil",
                precision: str = "auto", progress: bool = False) -> PipelineOutput:
        """SDEdit (Meng et al. 2022): encode `image`, noise it to `strength` (0 = the autoencoder's reconstruction,
        1 = plain sampling from the same noise), denoise with the new prompt / class labels (one, or one per
        image), decode once. noise: the eps to use (default drawn from `generator`; invert's output regenerates
        the image at strength 1). Samplers: DDIM (DDPM pipelines), Euler or Heun (flow). See editing.py."""
        return self._edit(image, None, strength, prompt, class_labels, num_inference_steps, guidance_scale,
                          generator, sampler, eta, shift, noise, output_type, precision, progress)

    def inpaint(self, image: Any, mask: Any, prompt: str | list[str] | None = None,
                class_labels: int | list[int] | Tensor | None = None, strength: float = 1.0,
                num_inference_steps: int = 30, guidance_scale: float = 3.0, generator: torch.Generator | None = None,
                sampler: str | None = None, eta: float = 0.0, shift: float | None = None,
                noise: Tensor | None = None, output_type: str = "pil", precision: str = "auto",
                progress: bool = False, paste: bool = True) -> PipelineOutput:
        """Inpainting without retraining: regenerate where the pixel mask (H, W) or (B, 1, H, W) is 1 (white),
        keep the rest; at every step the kept latent is the encoded image noised to that step's level.
        paste: put the image's own pixels back where the mask is 0 (default); False shows the decoder's
        rendering everywhere (within its reconstruction error of the image there, plus what the repainted
        cells next door leak through the decoder). Ignored for output_type "latent"."""
        return self._edit(image, mask, strength, prompt, class_labels, num_inference_steps, guidance_scale,
                          generator, sampler, eta, shift, noise, output_type, precision, progress, paste)

    @torch.no_grad()
    def invert(self, image: Any, prompt: str | list[str] | None = None,
               class_labels: int | list[int] | Tensor | None = None, num_inference_steps: int = 50,
               guidance_scale: float = 1.0, sampler: str | None = None, shift: float | None = None,
               precision: str = "auto", progress: bool = False) -> Tensor:
        """Deterministic inversion (DDIM with eta 0, or the flow's ODE upwards): images -> the noise z_T
        (B, c, h, w) that img2img(image, strength=1, noise=z_T) with the same options turns back into them."""
        sampler = self.objective.sampler_names[0] if sampler is None else sampler
        self._check_options(None, num_inference_steps, guidance_scale, sampler, 0.0, "latent", precision, 1, shift)
        editing.check_edit_sampler(self.objective, sampler)
        z0 = self.encode(image, precision)
        cond, null, w = self._edit_condition(prompt, class_labels, z0.shape[0], guidance_scale, precision)
        with autocast(self.device, precision):
            return editing.invert_latent(self.objective, self.sampling_denoiser, z0, num_inference_steps, cond, null,
                                         w, sampler, shift, progress)

    @torch.no_grad()
    def _edit(self, image, mask, strength, prompt, class_labels, num_inference_steps, guidance_scale, generator,
              sampler, eta, shift, noise, output_type, precision, progress, paste=False) -> PipelineOutput:
        """img2img and inpaint: every option checked before any work, then encode -> edit_latent -> decode."""
        sampler = self.objective.sampler_names[0] if sampler is None else sampler
        editing.check_strength(strength)
        self._check_options(None, num_inference_steps, guidance_scale, sampler, eta, output_type, precision, 1, shift)
        editing.check_edit_sampler(self.objective, sampler)
        f = self.autoencoder.cfg.f
        x = editing.image_to_tensor(image, self.autoencoder.cfg.in_channels, self.image_size, f)  # once: encode, paste
        z0 = self.encode(x, precision)                                 # (B, C, H, W) -> (B, c, h, w)
        m = None if mask is None else editing.mask_to_latent(
            mask, (z0.shape[0], 1, z0.shape[2] * f, z0.shape[3] * f), f).to(self.device)
        if noise is not None and tuple(noise.shape) != tuple(z0.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; these images' latents are {tuple(z0.shape)}")
        cond, null, w = self._edit_condition(prompt, class_labels, z0.shape[0], guidance_scale, precision)
        with autocast(self.device, precision):
            z = editing.edit_latent(self.objective, self.sampling_denoiser, z0, strength, num_inference_steps, cond,
                                    null, w, sampler, generator, None if noise is None else noise.to(self.device), m,
                                    eta, shift, progress)
        if output_type == "latent":
            return PipelineOutput(z)
        if mask is None or not paste:
            return PipelineOutput(self.decode(z, output_type, precision))
        out = editing.paste_pixels(self.decode(z, "tensor", precision), x, editing.mask_to_pixels(mask, x.shape))
        return PipelineOutput(postprocess(out, output_type))

    def _edit_condition(self, prompt, class_labels, B: int, guidance_scale: float, precision: str):
        """-> (cond for the B images, null, guidance): one prompt / label for all, or one per image."""
        given = prompt if prompt is not None else class_labels
        P = None if given is None else 1 if isinstance(given, (str, int)) else \
            given.numel() if isinstance(given, Tensor) else len(given) if isinstance(given, (list, tuple)) else 1
        if P not in (None, 1, B):
            raise ValueError(f"got {P} {'prompts' if prompt is not None else 'class labels'} for {B} image(s); "
                             "pass one (for every image) or one per image")
        for m in self.modules():
            m.eval()
        cond, null, n, guided = self._condition(prompt, class_labels, B if P in (None, 1) else 1, self.device,
                                                precision)
        return cond, null, float(guidance_scale) if guided else 1.0

    # ------------------------------------------------------------------ the folder
    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the folder described in the module docstring; model_index.json goes last, so a folder that
        has it is complete. `extra` (plain data, e.g. training settings) is recorded in model_index.json."""
        folder = Path(folder)
        self.autoencoder.save_pretrained(folder / "autoencoder")
        save_model_folder(folder / "denoiser", self.denoiser,
                          {"model": self.kind, "config": config_to_dict(self.denoiser.cfg)})
        atomic_json_save(self.objective.to_dict(), folder / "scheduler" / "config.json")
        components = ["autoencoder", "denoiser", "scheduler"]
        if self.text_encoder is not None:
            save_model_folder(folder / "text_encoder", self.text_encoder,
                              {"model": "TextEncoder", "config": config_to_dict(self.text_encoder.cfg),
                               "tokenizer": self.tokenizer.to_dict()})
            components.append("text_encoder")
        atomic_json_save({"pipeline": "LatentDiffusionPipeline", "denoiser": self.kind,
                          "conditioning": self.conditioning, "components": components,
                          "versions": {"ldm_scratch": __version__, "torch": torch.__version__},
                          **({"extra": extra} if extra else {})}, folder / "model_index.json")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike,
                        map_location: str | torch.device = "cpu") -> LatentDiffusionPipeline:
        """Rebuild a pipeline saved by save_pretrained (modules in eval mode, on `map_location`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such pipeline folder")
        index_file = folder / "model_index.json"
        index = read_json(index_file)
        if not isinstance(index, dict) or index.get("pipeline") != "LatentDiffusionPipeline":
            raise CheckpointError(f"{index_file}: not a LatentDiffusionPipeline index")
        kind, conditioning = index.get("denoiser"), index.get("conditioning")
        if kind not in DENOISER_KINDS or conditioning not in CONDITIONINGS:
            raise CheckpointError(f"{index_file}: 'denoiser' must be one of {', '.join(DENOISER_KINDS)} and "
                                  f"'conditioning' one of {', '.join(CONDITIONINGS)}; got {kind!r}, {conditioning!r}")
        if kind not in DENOISERS:
            raise CheckpointError(f"{index_file}: names a {kind!r} denoiser, but ldm_scratch/dit.py did not import")
        autoencoder = AutoencoderKL.from_pretrained(folder / "autoencoder", map_location)
        denoiser, _ = load_model_folder(folder / "denoiser", lambda d: _build_denoiser(kind, d), map_location)
        made = "text" if denoiser.cfg.context_dim else "class" if denoiser.cfg.num_classes else "none"
        if made != conditioning:
            raise CheckpointError(f"{index_file}: says conditioning {conditioning!r}, but the saved denoiser makes a "
                                  f"{made!r} model (num_classes / context_dim in denoiser/config.json)")
        objective = _load_scheduler(folder / "scheduler" / "config.json")
        tokenizer = text_encoder = None
        if conditioning == "text":
            tokenizers: list[Tokenizer] = []
            text_encoder, _ = load_model_folder(folder / "text_encoder",
                                                lambda d: _build_text_encoder(d, tokenizers), map_location)
            tokenizer = tokenizers[0]
        try:
            pipe = cls(autoencoder, denoiser, objective, tokenizer, text_encoder)
        except ValueError as e:
            raise CheckpointError(f"{folder}: the saved components do not fit together: {e}") from None
        for m in pipe.modules():
            m.eval()
        return pipe


# ---------------------------------------------------------------------------------- helpers
def _take(cond: Any, lo: int, hi: int) -> Any:
    """Rows lo..hi of a condition: labels (N,), (context (N, L, D), mask (N, L)), or None."""
    if cond is None:
        return None
    if isinstance(cond, tuple):
        return tuple(c[lo:hi] for c in cond)
    return cond[lo:hi]


def _check_labels(class_labels: int | list[int] | Tensor, num_classes: int) -> Tensor:
    """int, list of ints or a 1-D integer tensor -> (P,) int64, every label in 0..num_classes-1."""
    if isinstance(class_labels, Tensor):
        if class_labels.dim() > 1 or class_labels.is_floating_point() or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers (a 1-D tensor), got {class_labels.dtype} "
                             f"{tuple(class_labels.shape)}")
        labels = class_labels.reshape(-1).long().cpu()
    else:
        items = [class_labels] if isinstance(class_labels, int) else class_labels
        if not isinstance(items, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                           for c in items):
            raise ValueError(f"class_labels must be an int or a list of ints; got {class_labels!r}")
        labels = torch.tensor(list(items), dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty; pass at least one label, or none for unconditional samples")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class_labels {bad.tolist()} out of range; valid labels: 0..{num_classes - 1} "
                         f"(for unconditional samples pass no labels)")
    return labels


def _build_denoiser(kind: str, d: dict) -> nn.Module:
    """Inside load_model_folder, whose errors name denoiser/config.json."""
    if not isinstance(d, dict) or d.get("model") != kind or not isinstance(d.get("config"), dict):
        got = d.get("model") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f'expected {{"model": "{kind}", "config": {{...}}}} (model_index.json names a {kind}), '
                         f"got model {got!r}")
    cfg_cls, _ = DENOISERS[kind]
    return build_denoiser(kind, config_from_dict(cfg_cls, d["config"], "denoiser config"))


def _build_text_encoder(d: dict, tokenizers: list[Tokenizer]) -> TextEncoder:
    """Inside load_model_folder, whose errors name text_encoder/config.json; the tokenizer goes to `tokenizers`."""
    if not isinstance(d, dict) or d.get("model") != "TextEncoder" or not {"config", "tokenizer"} <= set(d):
        raise ValueError('expected {"model": "TextEncoder", "config": {...}, "tokenizer": {...}}')
    tokenizer = Tokenizer.from_dict(d["tokenizer"])
    cfg = config_from_dict(TextEncoderConfig, d["config"], "text encoder config")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the encoder vocab_size={cfg.vocab_size}")
    tokenizers.append(tokenizer)
    return TextEncoder(cfg)


def _load_scheduler(path: Path) -> Objective:
    """The objective of scheduler/config.json; a plain DiffusionConfig dict (saved before objectives) is DDPM."""
    try:
        return objective_from_dict(read_json(path), str(path))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build the objective: {e}") from None
