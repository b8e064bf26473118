"""Stage 1: the KL-regularised autoencoder (Rombach et al. 2022, Sec. 3 and App. G).

Images (B, C, H, W) in [-1, 1] -> a diagonal Gaussian posterior q(z|x) over latents (B, c, H/f, W/f)
-> a decoder back to (B, C, H, W). Stage 2 dreams in (z - shift_factor) * scale_factor (scale_latents;
shift_factor is 0 for the SD layout); the decoder renders the final latent once (unscale_latents, decode). The layout (and so the parameter names convert.py maps onto) follows LDM/SD:

  Encoder: conv_in -> per level [num_res_blocks ResnetBlocks, Downsample except at the last level]
           -> mid (ResnetBlock, single-head SelfAttention2d, ResnetBlock) -> GroupNorm, SiLU, conv_out
           -> 2c channels (mean and log-variance)  -> quant_conv (1x1)
  Decoder: post_quant_conv (1x1) -> conv_in -> mid -> per level, deepest first,
           [num_res_blocks + 1 ResnetBlocks, Upsample except at the shallowest level]
           -> GroupNorm, SiLU, conv_out

The two 1x1 convs are leftovers of LDM's shared code with the VQ model (they sit where its codebook
projection sat); they are kept because SD's weights contain them. The SD layout has no init_weights():
LDM and SD train from PyTorch's default initialisation, and so do we.

Residual autoencoding (cfg.shortcut = "residual"; Chen et al. 2024, "Deep Compression Autoencoder",
arXiv:2410.10733, Sec. 3.1): every learned piece that changes a shape becomes a residual over a
parameter-free shortcut S, out = S(in) + branch(in) (the ResnetBlocks and the attention already are):
  down (encoder)  S(h) = pixel_unshuffle(h, 2), then the mean of each channel's 4 sub-pixels (= 2x2 area mean)
  up (decoder)    S(h) = pixel_shuffle(every channel repeated 4 times, 2)              (= nearest x2)
  width a -> b    S = tile_b(fold_m(h)), m = C * floor(min(a, b) / C), C = image channels (layers.py):
                  fold_m(h)[k] = mean{ h[j] : j = k (mod m) }, tile_b(h)[k] = h[k mod m]; used by the
                  ResnetBlocks that change width (for SD's learned 1x1 conv) and at the four ends:
  encoder         h = conv_in(x) + S(x)        moments = conv_out(SiLU(GroupNorm(h))) + [S(h) | L0]
  decoder         h = conv_in(z) + S(z)        x_rec   = conv_out(SiLU(GroupNorm(h))) + S(h)
Since m is a multiple of C, channel k carries image channel k mod C at every width: S never mixes
colours. Widths that are not multiples of C (32 channels, 3 colours) are the reason for m: fold
averages every channel into the group of its colour (groups then differ in size by one), tile repeats
the first m; the branch still reads every channel. The logvar half of the moments has no feature to
copy: its shortcut is the constant L0 = 2 ln(2/255), a posterior std of one 8-bit grey level.
quant_conv and post_quant_conv are left out (a 1x1 conv next to a conv adds nothing), so
parameters(residual) = parameters(none) - every 1x1 conv of the SD layout.

With every branch zero, as init_weights leaves it, the model is exactly a non-learned codec:
  mean[k] = A_f(x)[k mod C],  logvar = L0,  decode(mean) = N_f(A_f(x))
With free_latent_channels, the channels k >= m = C floor(c / C) (channel 3 of c = 4 with C = 3) are
left to the branches: mean[k] = 0 there at step 0 and the decoder's shortcut reads only the first m, so the
codec above holds on the first m channels and the rest start empty. Without it channel 3 starts as a second
copy of red, and the decoder's fold averages it with channel 0.
With cfg.up_shortcut = "bicubic" the up shortcut is bicubic interpolation x2 instead (still parameter-free;
the channel maps commute with it), so decode(mean) = (B_2)^log2(f) (A_f(x)): the untrained codec is then the
area-down / bicubic-up floor itself (photo-f8c4: 21.78 dB on the astronaut, the floor 21.75, nearest 20.13).
A_f: the mean of each f x f pixel block; N_f: nearest upsampling by f (the down shortcuts compose to A_f,
the up shortcuts to N_f; the channel maps only copy and average channels of one colour). Why it trains
faster: the SD layout starts from random convs and must first learn to carry the image through ~20
layers and back, the identity, before it can improve on anything (small-f8 was still under the area
+ bicubic floor after 948 steps: 17.35 vs 21.75 dB). Here step 0 already is a codec, each branch only
learns a correction to it, and every layer's gradient arrives through the shortcuts undiminished. DC-AE
widens the channels at each downsampling, so its shortcut keeps 2 of 4 sub-pixels; we keep SD's widths,
where the shortcut path is exactly the area codec. Note the learning rate: Adam moves every weight by
about lr in its first steps, and with ~25 zero branches adding to the image at once, lr 2e-4 throws
the codec away in a few steps (scripts/ae_recipe.py measures what works).
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_scratch.checkpoint import load_model_folder, save_model_folder
from ldm_scratch.config import AutoencoderConfig, config_from_dict, config_to_dict
from ldm_scratch.layers import (ChannelShortcut, Downsample, Normalize, ResidualDownsample, ResidualUpsample,
                                ResnetBlock, SelfAttention2d, Upsample)

# LDM's clamp on the posterior log-variance. Above: var = e^20 ~ 5e8 is already far beyond any useful
# latent spread, and it keeps exp(logvar) (and the KL's var term) finite instead of overflowing to inf
# (fp32 exp overflows near 88). Below: std = e^-15 ~ 3e-7 is already a point mass at latent scale; the
# reconstruction loss alone would push logvar to -inf, and the KL's -logvar term would follow it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# How far past [-1, 1] an input may stray before encode refuses it: resampling and augmentation overshoot
# by a few hundredths, while the usual mistakes are far outside (0..255 pixels: 255; [0, 1] scaled twice: 2+).
RANGE_SLACK = 0.1
# The residual design's logvar shortcut: std = 2/255, one 8-bit grey level in [-1, 1] units (see above).
RESIDUAL_LOGVAR = 2 * math.log(2 / 255)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's 2c channels split into mean | logvar."""

    def __init__(self, parameters: torch.Tensor):
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(f"expected (B, 2c, ...) parameters (mean and logvar stacked on dim 1), "
                             f"got shape {tuple(parameters.shape)}")
        mean, logvar = parameters.chunk(2, dim=1)  # (B, 2c, h, w) -> 2 x (B, c, h, w)
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_mean_logvar(cls, mean: torch.Tensor, logvar: torch.Tensor) -> "DiagonalGaussian":
        return cls(torch.cat([mean, logvar], dim=1))  # 2 x (B, c, h, w) -> (B, 2c, h, w)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample (Kingma & Welling 2014, Sec. 2.4): gradients flow to mean and logvar.
        A `generator` must live on the same device as the latents (e.g. torch.Generator("cuda"))."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        # z = mean + std * eps, eps ~ N(0, I)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent (= the mean): what you use to reconstruct without noise."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other), summed over all but the batch dim: (B,). `other=None` means N(0, I)."""
        dims = tuple(range(1, self.mean.dim()))
        if other is None:
            # KL(N(mu, var) || N(0, 1)) = 0.5 * sum(mu^2 + var - 1 - log var)
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        # KL(N(mu1, var1) || N(mu2, var2)) = 0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - log var1 + log var2)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x), summed over all but the batch dim: (B,)."""
        dims = tuple(range(1, self.mean.dim()))
        # -log N(x; mu, var) = 0.5 * (log(2 pi) + log var + (x - mu)^2 / var)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=dims)


def _resnet_block(c_in: int, c_out: int, cfg: AutoencoderConfig) -> ResnetBlock:
    block = ResnetBlock(c_in, c_out, dropout=cfg.dropout, groups=cfg.norm_groups)
    if cfg.shortcut == "residual" and c_in != c_out:
        block.skip = ChannelShortcut(c_in, c_out, cfg.in_channels)  # parameter-free, not SD's learned 1x1
    return block


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, 2c, H/f, W/f): the mean and log-variance of q(z|x), stacked."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]  # e.g. ch 128, ch_mult (1,2,4,4) -> 128, 256, 512, 512
        g, p = cfg.norm_groups, cfg.dropout
        self.residual = cfg.shortcut == "residual"
        down = ResidualDownsample if self.residual else Downsample
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c_out in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                [_resnet_block(c_in if j == 0 else c_out, c_out, cfg) for j in range(cfg.num_res_blocks)])
            # asymmetric (right/bottom) padding: SD's convention, needed for its weights to give its outputs
            level.downsample = down(c_out, padding="asymmetric") if i < len(widths) - 1 else nn.Identity()
            self.down.append(level)
            c_in = c_out
        self.mid_block1 = ResnetBlock(c_in, c_in, dropout=p, groups=g)
        self.mid_attn = SelfAttention2d(c_in, num_heads=1, groups=g) if cfg.mid_attention else nn.Identity()
        self.mid_block2 = ResnetBlock(c_in, c_in, dropout=p, groups=g)
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)
        if self.residual:
            self.shortcut_in = ChannelShortcut(cfg.in_channels, cfg.ch, cfg.in_channels)
            self.shortcut_out = ChannelShortcut(c_in, cfg.z_channels, cfg.in_channels,  # to the c means
                                                free=cfg.free_latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C, H, W) -> (B, ch, H, W)
        if self.residual:
            h = h + self.shortcut_in(x)  # copies of the image channels: (B, C, H, W) -> (B, ch, H, W)
        for level in self.down:
            for block in level.blocks:
                h = block(h)  # (B, C_in, h, w) -> (B, C_out, h, w)
            h = level.downsample(h)  # (B, C_out, h, w) -> (B, C_out, h/2, w/2), except at the last level
        h = self.mid_block1(h)
        h = self.mid_attn(h)  # global mixing at the coarsest grid, where H*W tokens are fewest
        h = self.mid_block2(h)
        moments = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_last, H/f, W/f) -> (B, 2c, H/f, W/f)
        if self.residual:
            mean = self.shortcut_out(h)  # (B, C_last, H/f, W/f) -> (B, c, H/f, W/f)
            moments = moments + torch.cat([mean, torch.full_like(mean, RESIDUAL_LOGVAR)], dim=1)  # [mean | L0]
        return moments


class Decoder(nn.Module):
    """(B, c, H/f, W/f) -> (B, C, H, W). Mirrors the encoder with one extra ResnetBlock per level (LDM)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        g, p = cfg.norm_groups, cfg.dropout
        self.residual = cfg.shortcut == "residual"
        up = (lambda c: ResidualUpsample(c, cfg.up_shortcut)) if self.residual else Upsample
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid_block1 = ResnetBlock(c_in, c_in, dropout=p, groups=g)
        self.mid_attn = SelfAttention2d(c_in, num_heads=1, groups=g) if cfg.mid_attention else nn.Identity()
        self.mid_block2 = ResnetBlock(c_in, c_in, dropout=p, groups=g)
        # self.up[0] is the deepest level (the order forward runs them in, and diffusers' order;
        # CompVis numbers them the other way round, see convert.py)
        self.up = nn.ModuleList()
        for i, c_out in enumerate(reversed(widths)):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                [_resnet_block(c_in if j == 0 else c_out, c_out, cfg) for j in range(cfg.num_res_blocks + 1)])
            level.upsample = up(c_out) if i < len(widths) - 1 else nn.Identity()
            self.up.append(level)
            c_in = c_out
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)
        if self.residual:
            self.shortcut_in = ChannelShortcut(cfg.z_channels, widths[-1], cfg.in_channels,
                                               free=cfg.free_latent_channels)
            self.shortcut_out = ChannelShortcut(c_in, cfg.in_channels, cfg.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, c, H/f, W/f) -> (B, C_last, H/f, W/f)
        if self.residual:
            h = h + self.shortcut_in(z)  # copies of the latent channels: (B, c, ...) -> (B, C_last, ...)
        h = self.mid_block1(h)
        h = self.mid_attn(h)
        h = self.mid_block2(h)
        for level in self.up:
            for block in level.blocks:
                h = block(h)  # (B, C_in, h, w) -> (B, C_out, h, w)
            h = level.upsample(h)  # (B, C_out, h, w) -> (B, C_out, 2h, 2w), except at the last level
        x = self.conv_out(F.silu(self.norm_out(h)))  # (B, ch, H, W) -> (B, C, H, W)
        if self.residual:
            x = x + self.shortcut_out(h)  # the mean of each colour's channels: (B, ch, H, W) -> (B, C, H, W)
        return x


class AutoencoderKL(nn.Module):
    """Encoder + Gaussian posterior + decoder. The loss (losses.py) is separate: the model knows no training."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.validate()  # again: a field may have been set after the config was made
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if cfg.shortcut == "residual":  # the SD layout's 1x1 leftovers (see above) have no place here
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
        else:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """SD layout: PyTorch's defaults (as LDM and SD). Residual: every branch zero, so that training
        starts from the non-learned codec and each branch learns a correction to it."""
        if self.cfg.shortcut == "residual":
            zero_residual_branches(self)

    @property
    def scale_factor(self) -> float:
        """1 / std of the training latents; stage 2 works on (z - shift_factor) * scale_factor. In the config."""
        return self.cfg.scale_factor

    @scale_factor.setter
    def scale_factor(self, value: float) -> None:
        self.cfg.scale_factor = float(value)

    @property
    def shift_factor(self) -> float:
        """Mean of the training latents, subtracted before scaling (SD3/FLUX); 0.0 for the SD layout."""
        return self.cfg.shift_factor

    @shift_factor.setter
    def shift_factor(self, value: float) -> None:
        self.cfg.shift_factor = float(value)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents -> the space stage 2 works in: (z - shift_factor) * scale_factor, zero mean and
        unit spread over the training images. (B, c, h, w) -> (B, c, h, w)."""
        return (z - self.shift_factor) * self.scale_factor if self.shift_factor else z * self.scale_factor

    def unscale_latents(self, z0: torch.Tensor) -> torch.Tensor:
        """Inverse of scale_latents: z0 / scale_factor + shift_factor, ready for decode."""
        return z0 / self.scale_factor + self.shift_factor if self.shift_factor else z0 / self.scale_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        _check_images(x, self.cfg)
        moments = self.quant_conv(self.encoder(x))  # (B, C, H, W) -> (B, 2c, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _check_latents(z, self.cfg)
        return self.decoder(self.post_quant_conv(z))  # (B, c, H/f, W/f) -> (B, C, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, c, H/f, W/f)
        return self.decode(z), posterior

    # ------------------------------------------------------------------ model folder
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `folder/config.json` (scale_factor included) and `folder/model.pt`."""
        save_model_folder(folder, self, {"model": "AutoencoderKL", "config": config_to_dict(self.cfg)})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "AutoencoderKL":
        """Rebuild from a folder written by save_pretrained; mismatches raise CheckpointError naming the file."""
        model, _ = load_model_folder(folder, _build_from_config_dict, map_location)
        return model


def residual_branch_ends(model: AutoencoderKL) -> list[nn.Module]:
    """The last layer of every learned branch of a residual model (zero them: the non-learned codec)."""
    if model.cfg.shortcut != "residual":
        raise ValueError(f"only a shortcut='residual' model has residual branches, got {model.cfg.shortcut!r}")
    ends = [model.encoder.conv_in, model.encoder.conv_out, model.decoder.conv_in, model.decoder.conv_out]
    last = {ResnetBlock: "conv2", Downsample: "conv", Upsample: "conv", SelfAttention2d: "proj_out"}
    return ends + [getattr(m, name) for m in model.modules() for cls, name in last.items() if isinstance(m, cls)]


@torch.no_grad()
def zero_residual_branches(model: AutoencoderKL) -> AutoencoderKL:
    """Zero every branch's last weight and bias: the model becomes the non-learned codec (module
    docstring). Each such layer still gets a gradient (its input is not zero), so training moves it."""
    for layer in residual_branch_ends(model):
        layer.weight.zero_()
        layer.bias.zero_()
    return model


def _build_from_config_dict(d: dict) -> AutoencoderKL:
    if not isinstance(d, dict) or d.get("model") != "AutoencoderKL" or "config" not in d:
        got = d.get("model") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f'expected {{"model": "AutoencoderKL", "config": {{...}}}}, got model {got!r}')
    if isinstance(d["config"], dict) and "scale_factor" not in d["config"]:
        # every other field may fall back to its default (a wrong one then fails the weight check), but a
        # defaulted scale_factor of 1.0 would load silently and give washed-out or saturated samples
        raise ValueError("no 'scale_factor' in the autoencoder config (measure it: measure_scale_factor)")
    return AutoencoderKL(config_from_dict(AutoencoderConfig, d["config"], source="config.json"))


def _check_images(x: torch.Tensor, cfg: AutoencoderConfig) -> None:
    """Say what the encoder expects, rather than failing deep inside a conv."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, {cfg.in_channels}, H, W), got {shape}; "
                         f"add a batch dimension with x.unsqueeze(0) for a single image")
    if not x.is_floating_point():
        hint = ": divide by 127.5 and subtract 1" if x.dtype == torch.uint8 else ""
        raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype}{hint}")
    B, C, H, W = x.shape
    if C != cfg.in_channels:
        raise ValueError(f"expected {cfg.in_channels} image channel(s) (cfg.in_channels), got {C} "
                         f"in shape {tuple(x.shape)}")
    f = cfg.f
    if H % f or W % f:
        # The asymmetric-padded encoder would accept it, but the decoder could not give back H x W.
        suggest = f"{math.ceil(H / f) * f}x{math.ceil(W / f) * f}"
        raise ValueError(f"image size {H}x{W} is not divisible by the downsampling factor f={f} "
                         f"(ch_mult has {len(cfg.ch_mult)} levels); use a size that is a multiple of {f}, "
                         f"e.g. {suggest}")
    if x.numel() == 0 or torch.compiler.is_compiling():
        # a compiled graph checks shapes when it is traced; reading values back (.item()) would break the graph
        return
    lo, hi = (v.item() for v in torch.aminmax(x.detach().float()))  # NaN in x makes both NaN
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"expected finite images in [-1, 1], got {bad} NaN/inf value(s) in shape {tuple(x.shape)}")
    if hi > 1 + RANGE_SLACK:
        hint = ": divide by 127.5 and subtract 1" if hi > 2 else ""  # far out: 0..255 pixels
        raise ValueError(f"expected [-1, 1], got values up to {hi:.4g}{hint}")
    if lo < -1 - RANGE_SLACK:
        raise ValueError(f"expected [-1, 1], got values down to {lo:.4g}")


def _check_latents(z: torch.Tensor, cfg: AutoencoderConfig) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != cfg.z_channels:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"expected latents of shape (B, {cfg.z_channels}, h, w) (cfg.z_channels), got {shape}")


@torch.no_grad()
def measure_scale_factor(model: AutoencoderKL, data: torch.Tensor | Iterable, batch_size: int = 64,
                         max_batches: int | None = None, sample_posterior: bool = True,
                         generator: torch.Generator | None = None) -> float:
    """scale_factor = 1 / std(z) over the training images (measure_latent_stats says how)."""
    return measure_latent_stats(model, data, batch_size, max_batches, sample_posterior, generator)[1]


@torch.no_grad()
def measure_latent_stats(model: AutoencoderKL, data: torch.Tensor | Iterable, batch_size: int = 64,
                         max_batches: int | None = None, sample_posterior: bool = True,
                         generator: torch.Generator | None = None) -> tuple[float, float]:
    """The mean and 1 / std of z over the training images, so stage 2 sees latents of unit spread.

    SD's 0.18215 is this number for its VAE on its data (Rombach et al. 2022, Sec. 4.3.2: the latents
    of a KL autoencoder are rescaled to unit variance, the std estimated from a batch of training
    latents); for our own autoencoders it must be measured, never copied. We use posterior *samples*,
    like SD's code, because samples are what the diffusion model is trained on (LDM encodes its
    training images with .sample()); with LDM's tiny KL weight the posterior std is small next to the
    spread of the means, so modes give nearly the same number. The std is over every element (one
    number for all channels), centred, accumulated in float64 over all batches, not just the first.

    Returns (mean, 1 / std): the shift_factor and the scale_factor. The std is centred, so it is the same
    number whether or not the mean is then subtracted (SD3 subtracts it; SD 1.x/2.x do not).

    data: an (N, C, H, W) tensor, or an iterable of batches (a tensor or an (x, label, ...) tuple).
    """
    was_training = model.training
    model.eval()  # dropout off: we measure the model as stage 2 will use it
    device = next(model.parameters()).device
    if isinstance(data, torch.Tensor):
        data = data.split(batch_size)
    n, total, total_sq = 0, 0.0, 0.0
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        posterior = model.encode(x.to(device))
        z = (posterior.sample(generator) if sample_posterior else posterior.mode()).double()
        n += z.numel()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
    model.train(was_training)
    if n < 2:
        raise ValueError("measure_scale_factor needs at least one image with more than one latent element")
    # unbiased variance = (sum z^2 - n * mean^2) / (n - 1)
    mean = total / n
    var = (total_sq - n * mean * mean) / (n - 1)
    return mean, 1.0 / math.sqrt(var)
