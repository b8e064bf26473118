"""What the benchmark suite (bench.py) measures: our models and diffusers' twins at the same configuration,
the models and inputs of each table, and one tool the tables compare against the default:
  TwoForwardCFG   a denoiser wrapper that runs classifier-free guidance's [cond; null] batch as two
                  separate forwards, the baseline for diffusion.guided_eps's one batched forward.
Mapping our configs onto diffusers' follows convert.py (autoencoder) and tests/test_dit.py (DiT); where
the architectures differ, the pair's `note` says how.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.config import AUTOENCODER_PRESETS, DIT_PRESETS, UNET_PRESETS, AutoencoderConfig, DiTConfig, \
    UNetConfig, get_preset
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.dit import DiT
from ldm_scratch.unet import UNet

NUM_CLASSES = 10      # MNIST digits
CONTEXT_LEN = 8       # TextEncoderConfig.max_length: tokens per prompt


@dataclass
class Case:
    """One model at one input: `call()` runs the forward and returns the output tensor."""
    model: nn.Module
    call: Callable[[], torch.Tensor]
    batch: int
    shape: str            # the input per sample, e.g. "1x32x32"

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class TwoForwardCFG(nn.Module):
    """Runs a denoiser on a [cond; null] batch of 2B as two forwards of B and concatenates: the
    unbatched way to do classifier-free guidance, to time (and test) against the batched one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        B = x.shape[0] // 2
        halves = []
        for part in (slice(0, B), slice(B, None)):
            c = cond[part] if isinstance(cond, torch.Tensor) else \
                tuple(None if ci is None else ci[part] for ci in cond) if isinstance(cond, tuple) else cond
            halves.append(self.model(x[part], t[part], c))
        return torch.cat(halves)  # 2 x (B, C, H, W) -> (2B, C, H, W)


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _shape(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape[1:]))


def _randn(*shape: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _labels(B: int, device) -> torch.Tensor:
    return (torch.arange(B) % NUM_CLASSES).to(device)


def _timesteps(B: int, device) -> torch.Tensor:
    return torch.linspace(0, 999, B).long().to(device)


# -------------------------------------------------------------------------------------------------
# Ours and diffusers' twins
# -------------------------------------------------------------------------------------------------

def autoencoder_pair(cfg: AutoencoderConfig, B: int, size: int, device, with_reference: bool) -> dict:
    torch.manual_seed(0)
    x = _randn(B, cfg.in_channels, size, size, device=device).clamp(-1, 1)
    ours = AutoencoderKL(cfg).to(device)
    out = {"ours": Case(ours, lambda: ours(x, sample_posterior=False)[0], B, _shape(x)),
           "note": "decoder output of the posterior mode; same widths, levels, groups, single-head mid attention"}
    if with_reference:
        import diffusers
        n = len(cfg.ch_mult)
        ref = diffusers.AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.z_channels,
            block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_groups, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n).to(device)
        out["diffusers"] = Case(ref, lambda: ref(x).sample, B, _shape(x))
    return out


def _attn_flags(cfg: UNetConfig) -> list[bool]:
    return [cfg.sample_size // 2 ** i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]


def unet_case(cfg: UNetConfig, B: int, device, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = UNet(cfg).to(device)
    x, t = _randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device), _timesteps(B, device)
    cond = _labels(B, device) if cfg.num_classes else \
        _randn(B, CONTEXT_LEN, cfg.context_dim, seed=1, device=device) if cfg.context_dim else None
    return Case(model, lambda: model(x, t, cond), B, _shape(x))


def unet_pair(cfg: UNetConfig, B: int, device, with_reference: bool) -> dict:
    """Class-conditional -> diffusers.UNet2DModel; cross-attention -> diffusers.UNet2DConditionModel."""
    ours = unet_case(cfg, B, device)
    out: dict = {"ours": ours}
    widths, attn = tuple(cfg.ch * m for m in cfg.ch_mult), _attn_flags(cfg)
    common = dict(sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  block_out_channels=widths, layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups,
                  norm_eps=1e-6, resnet_time_scale_shift="scale_shift", downsample_padding=1,
                  flip_sin_to_cos=True, freq_shift=0)
    x, t = _randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device), _timesteps(B, device)
    if cfg.num_classes:
        out["note"] = ("UNet2DModel: same widths, res blocks, scale-shift norm, attention levels and mid "
                       "attention; its heads = width // attention_head_dim, set to match ours at the deepest "
                       "width; class embedding added to temb as ours")
        if with_reference:
            import diffusers
            ref = diffusers.UNet2DModel(
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                attention_head_dim=widths[-1] // cfg.num_heads, num_class_embeds=cfg.num_classes + 1,
                **common).to(device)
            y = _labels(B, device)
            out["diffusers"] = Case(ref, lambda: ref(x, t, class_labels=y).sample, B, _shape(x))
    else:
        out["note"] = ("UNet2DConditionModel: its Transformer2D adds proj_in/out, LayerNorms and a GEGLU "
                       "feed-forward around self+cross attention (ours: self+cross only), so it does more "
                       "work per block: compare GFLOPs too")
        if with_reference:
            import diffusers
            ref = diffusers.UNet2DConditionModel(
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads,  # diffusers' legacy name: this IS the number of heads here
                **common).to(device)
            ctx = _randn(B, CONTEXT_LEN, cfg.context_dim, seed=1, device=device)
            out["diffusers"] = Case(ref, lambda: ref(x, t, encoder_hidden_states=ctx).sample, B, _shape(x))
    return out


def dit_pair(cfg: DiTConfig, B: int, device, with_reference: bool) -> dict:
    torch.manual_seed(0)
    ours = DiT(cfg).to(device)
    x, t, y = _randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device), \
        _timesteps(B, device), _labels(B, device)
    out = {"ours": Case(ours, lambda: ours(x, t, y), B, _shape(x)),
           "note": "DiTTransformer2DModel, the config mapping of tests/test_dit.py's weight-copy conformance "
                   "test; diffusers recomputes the t and label embeddings in every block"}
    if with_reference:
        import diffusers
        ref = diffusers.DiTTransformer2DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
            sample_size=cfg.sample_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
            norm_eps=1e-6).to(device)
        out["diffusers"] = Case(ref, lambda: ref(x, timestep=t, class_labels=y).sample, B, _shape(x))
    return out


def _ae(name: str) -> AutoencoderConfig:
    return get_preset(AUTOENCODER_PRESETS, name, "autoencoder")


def _unet(name: str, **changes) -> UNetConfig:
    return dataclasses.replace(get_preset(UNET_PRESETS, name, "U-Net"), **changes)


def _dit(name: str, **changes) -> DiTConfig:
    return dataclasses.replace(get_preset(DIT_PRESETS, name, "DiT"), **changes)


# pair name -> build(quick, device, with_reference) -> {"ours": Case, "diffusers": Case, "note": str}
PAIRS: dict[str, Callable[..., dict]] = {
    "AE small-f4": lambda q, d, with_reference=True: autoencoder_pair(
        _ae("tiny") if q else _ae("small-f4"), 2 if q else 16, 16 if q else 32, d, with_reference),
    "AE small-f8": lambda q, d, with_reference=True: autoencoder_pair(
        _ae("tiny") if q else _ae("small-f8"), 2 if q else 8, 16 if q else 64, d, with_reference),
    "UNet small (class)": lambda q, d, with_reference=True: unet_pair(
        _unet("tiny" if q else "small", num_classes=NUM_CLASSES), 2 if q else 32, d, with_reference),
    "UNet small-latent (cross-attn)": lambda q, d, with_reference=True: unet_pair(
        _unet("tiny-latent", context_dim=32) if q else _unet("small-latent", context_dim=64),
        2 if q else 64, d, with_reference),
    "DiT dit-small-latent": lambda q, d, with_reference=True: dit_pair(
        _dit("dit-tiny" if q else "dit-small-latent", num_classes=NUM_CLASSES), 2 if q else 64, d, with_reference),
}


# -------------------------------------------------------------------------------------------------
# The levers, sampling and latent-vs-pixel tables' models
# -------------------------------------------------------------------------------------------------

def _ae_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
    recon, posterior = m(batch[0])
    # L1 + LDM's KL weight: the cheap part of the stage-1 loss (no perceptual net, no discriminator)
    return (recon.float() - batch[0]).abs().mean() + 1e-6 * posterior.kl().mean()


_DIFFUSION = GaussianDiffusion()


def _denoiser_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
    x0, labels, t, eps = batch
    return _DIFFUSION.loss(m, x0, labels, t=t, eps=eps)


def lever_models(quick: bool) -> dict[str, tuple[nn.Module, Callable, Callable, bool]]:
    """name -> (model, batch(device) -> tuple, loss(model, batch) -> scalar, is convolutional)."""
    torch.manual_seed(0)
    B = 2 if quick else 64

    def denoiser_batch(C: int, S: int) -> Callable:
        return lambda d: (_randn(B, C, S, S, device=d), _labels(B, d), _timesteps(B, d),
                          _randn(B, C, S, S, seed=1, device=d))  # (x0, labels, t, eps)

    ae_cfg = _ae("tiny") if quick else _ae("small-f4")
    ae_size = 16 if quick else 32
    pixel = _unet("tiny" if quick else "small", num_classes=NUM_CLASSES)
    latent = _unet("tiny-latent" if quick else "small-latent", num_classes=NUM_CLASSES)
    dit = _dit("dit-tiny" if quick else "dit-small-latent", num_classes=NUM_CLASSES)
    return {
        f"AE {'tiny' if quick else 'small-f4'}": (
            AutoencoderKL(ae_cfg),
            lambda d: (_randn(B // 2, ae_cfg.in_channels, ae_size, ae_size, device=d).clamp(-1, 1),), _ae_loss, True),
        f"UNet {'tiny' if quick else 'small'}": (UNet(pixel), denoiser_batch(1, 32), _denoiser_loss, True),
        f"UNet {'tiny-latent' if quick else 'small-latent'}": (UNet(latent), denoiser_batch(4, 8), _denoiser_loss,
                                                               True),
        f"DiT {'dit-tiny' if quick else 'dit-small-latent'}": (DiT(dit), denoiser_batch(4, 8), _denoiser_loss, False),
    }


def sampling_autoencoder(quick: bool) -> AutoencoderKL:
    """The decoder run once after latent sampling: small-f4 renders 4x8x8 latents as 1x32x32 digits."""
    torch.manual_seed(0)
    return AutoencoderKL(_ae("tiny") if quick else _ae("small-f4"))


def sampling_models(quick: bool) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (class-conditional denoiser, works on latents)."""
    torch.manual_seed(0)
    return {"pixel UNet " + ("tiny" if quick else "small"):
            (UNet(_unet("tiny" if quick else "small", num_classes=NUM_CLASSES)), False),
            "latent UNet " + ("tiny-latent" if quick else "small-latent"):
            (UNet(_unet("tiny-latent" if quick else "small-latent", num_classes=NUM_CLASSES)), True),
            "latent DiT " + ("dit-tiny" if quick else "dit-small-latent"):
            (DiT(_dit("dit-tiny" if quick else "dit-small-latent", num_classes=NUM_CLASSES)), True)}


def latent_twin(cfg: UNetConfig, channels: int, size: int) -> UNetConfig:
    """The same widths on a (channels, size, size) input, attention kept at the same level index."""
    levels = [i for i, a in enumerate(_attn_flags(cfg)) if a]
    return dataclasses.replace(cfg, in_channels=channels, out_channels=channels, sample_size=size,
                               attn_resolutions=tuple(size // 2 ** i for i in levels))


def pixel_latent_twins(quick: bool) -> dict[str, UNetConfig]:
    pixel = _unet("tiny" if quick else "small", num_classes=NUM_CLASSES)
    return {f"UNet {'tiny' if quick else 'small'} pixel": pixel,
            f"UNet {'tiny' if quick else 'small'} widths, latent": latent_twin(pixel, 4, 8)}


def sd_size_twins() -> dict[str, UNetConfig]:
    """Stable Diffusion's sizes: a 512x512x3 image vs its f = 8 latent 64x64x4, one U-Net's widths."""
    base = _unet("small")
    return {"UNet small widths @512px": latent_twin(base, 3, 512),
            "UNet small widths @64 latent": latent_twin(base, 4, 64)}
