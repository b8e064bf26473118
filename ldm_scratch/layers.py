"""Building blocks shared by both stages: GroupNorm, the ResNet block, spatial self-attention,
down/upsampling and the sinusoidal timestep embedding.

The autoencoder (stage 1) uses these blocks without a time embedding; the U-Net (stage 2) passes
one, and the block then applies it as a scale-shift after the second GroupNorm
(Dhariwal & Nichol 2021, Sec. 3: "adaptive group normalisation").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from einops import rearrange


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 (the LDM/SD value). Groups are clipped to a divisor of `channels`."""
    groups = math.gcd(groups, channels)  # e.g. 32 groups for 128 channels, 8 for 16 channels
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Vaswani et al. 2017 Sec. 3.5 / Ho et al. 2020.

    emb[:, i] = cos(t * w_i), emb[:, half + i] = sin(t * w_i), with w_i = max_period^(-i / half).
    t: (B,) -> (B, dim)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B,) -> (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:  # odd widths get one zero column
        emb = F.pad(emb, (0, 1))  # (B, dim - 1) -> (B, dim)
    return emb


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> [+ time] -> GroupNorm -> SiLU -> dropout -> conv3x3, plus a skip.

    With `temb_dim`, the time embedding is projected to (scale, shift) and applied after the second
    norm as h * (1 + scale) + shift (scale-shift norm), so the same block serves both stages.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, 2 * out_ch) if temb_dim else None
        self.norm2 = Normalize(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 conv only where the widths differ, so the residual path stays the identity otherwise.
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.norm2(h)
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock was built with a time embedding; pass temb")
            scale, shift = self.temb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual.

    GroupNorm -> q, k, v (per-position linear maps) -> softmax(q k^T / sqrt(d)) v -> linear -> + x.
    Uses F.scaled_dot_product_attention (a fused kernel where the backend has one).
    """

    def __init__(self, channels: int, num_heads: int = 1, groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = Normalize(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, N, C), N = H * W
        q, k, v = (rearrange(proj(h), "b n (heads d) -> b heads n d", heads=self.num_heads)
                   for proj in (self.q, self.k, self.v))  # 3 x (B, heads, N, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        h = rearrange(h, "b heads n d -> b n (heads d)")  # (B, N, C)
        h = self.proj_out(h)
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # (B, N, C) -> (B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv3x3.

    padding="asymmetric" pads one pixel right and bottom only (the LDM/SD autoencoder, needed to load
    its weights exactly); padding="same" pads one pixel on every side (the DDPM U-Net).
    """

    def __init__(self, channels: int, padding: str = "same"):
        super().__init__()
        if padding not in ("same", "asymmetric"):
            raise ValueError(f"padding must be 'same' or 'asymmetric', got {padding!r}")
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H, W) -> (B, C, H + 1, W + 1)
        return self.conv(x)  # -> (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then conv3x3 (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)
