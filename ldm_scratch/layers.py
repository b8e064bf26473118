"""Building blocks shared by both stages: GroupNorm, the ResNet block, attention (the one function every
attention layer calls) and spatial self-attention, down/upsampling and the sinusoidal timestep embedding;
the parameter-free shortcuts of residual autoencoding (DC-AE) around down/upsampling and width changes.

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


# On the CPU under bf16 autocast, PyTorch's fused attention kernel is the slow path at our sizes: its
# backward measured ~10x slower in bf16 than in fp32 (39 vs 3.8 ms per call, batch 64, N = 16-64 tokens),
# over half of a latent U-Net's or DiT's bf16 training step (ldm_scratch/bench.py, "levers"). Two plain
# matmuls with the softmax in fp32 made those steps 1.3-3.5x faster. Above this many query x key
# pairs the plain path's (N, M) score matrix costs more memory than the fused kernel saves time, so
# large maps (e.g. SD's 64 x 64 = 4096 positions) keep the fused kernel. Set False to always fuse.
# Without autograd (sampling) there is no backward, and what is fastest depends on the map's size. The fp32
# copy of the scores is the plain path's cost there: at 64 x 64 pairs and a sampling batch it made the plain
# path slower than the fused kernel (1,000 guided latent U-Net samples, 8 x 8 = 64 positions: 45 s plain, 33 s
# fused, 2-core AMD EPYC with AVX512-BF16). It buys nothing without a backward: torch's CPU softmax of a bf16
# tensor accumulates in fp32 and rounds once, the same values (tests/test_levers.py). So, without autograd:
# fewer than NO_GRAD_BF16_SOFTMAX_MIN_PAIRS pairs (the DiT's 16 tokens), the plain path as in training (its
# fp32 softmax measured faster on such short rows); up to NO_GRAD_BF16_SOFTMAX_MAX_PAIRS (64 tokens), the plain
# path with the softmax in bf16: 2.2x faster than the fused kernel per call at (250, 4 heads, 64, 12), 1.9-2.9x
# at head widths 12-64, 2 threads of that AMD; beyond (128 tokens and up) the fused kernel, 2-5x faster there.
# 1,000 guided latent U-Net samples, 50 DDIM steps, batches of 256: 28.7 -> 25.3 s (README "Speed").
CPU_BF16_PLAIN_ATTENTION = True
PLAIN_ATTENTION_MAX_PAIRS = 1024 * 1024
FUSED_NO_GRAD_MIN_PAIRS = 1024
NO_GRAD_BF16_SOFTMAX_MIN_PAIRS = FUSED_NO_GRAD_MIN_PAIRS
NO_GRAD_BF16_SOFTMAX_MAX_PAIRS = 64 * 64
# True: every call takes the plain matmuls. metrics.count_flops sets it while counting, because
# torch's FLOP counter has no formula for the CPU fused kernel and would count attention as 0.
PLAIN_ATTENTION_EVERYWHERE = False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              plain: bool | None = None) -> torch.Tensor:
    """Scaled dot-product attention, q (B, heads, N, d), k and v (B, heads, M, d) -> (B, heads, N, d).

    mask: bool, broadcastable to (B, heads, N, M), True where a query may attend (padded keys: False).
    Vaswani et al. 2017, Eq. 1. The same maths either way; only the kernel differs (see above).
    plain: None chooses as above; True / False force the plain matmuls / the fused kernel (tests, bench).
    """
    pairs = q.shape[-2] * k.shape[-2]
    # sampling-sized and short enough for the plain path with the softmax left in bf16 (see above)
    bf16_softmax = (not torch.is_grad_enabled() and q.dtype == torch.bfloat16
                    and NO_GRAD_BF16_SOFTMAX_MIN_PAIRS <= pairs <= NO_GRAD_BF16_SOFTMAX_MAX_PAIRS)
    if plain is None:
        fused_no_grad = not torch.is_grad_enabled() and pairs >= FUSED_NO_GRAD_MIN_PAIRS and not bf16_softmax
        plain = PLAIN_ATTENTION_EVERYWHERE or (CPU_BF16_PLAIN_ATTENTION and q.device.type == "cpu" and q.dtype == torch.bfloat16
                 and pairs <= PLAIN_ATTENTION_MAX_PAIRS and not fused_no_grad)
    if not plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _plain(q, k, v, mask, bf16_softmax)


def _plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           bf16_softmax: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V as two matmuls; the softmax in fp32 unless bf16_softmax (same forward values)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, N, d) @ (B, heads, d, M) -> (B, heads, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # weight exactly 0 after the softmax
    # training keeps the fp32 copy (dropping it would save about 3% of a latent U-Net step, from per-call timings)
    weights = scores.softmax(dim=-1) if bf16_softmax else scores.float().softmax(dim=-1).to(v.dtype)
    return weights @ v  # (B, heads, N, M) @ (B, heads, M, d) -> (B, heads, N, d)



class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual.

    GroupNorm -> q, k, v (per-position linear maps) -> softmax(q k^T / sqrt(d)) v -> linear -> + x.
    Calls `attention` (the fused kernel, or plain matmuls where those measured faster).
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
        h = attention(q, k, v)  # (B, heads, N, d)
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


# Residual autoencoding (Chen et al. 2024, "Deep Compression Autoencoder", Sec. 3.1): parameter-free
# shortcuts around resampling and width changes, so a learned block computes a residual over them.
class ChannelShortcut(nn.Module):
    """Parameter-free width change (B, a, h, w) -> (B, b, h, w), DC-AE's channel averaging and duplicating
    (Chen et al. 2024): fold_m (average groups of channels), then tile_b (repeat channels), with
    m = period * floor(min(a, b) / period). Since m is a multiple of the period, channel k keeps its
    class k mod period (the autoencoder's period is the image channels: channel k carries colour k mod C).

      fold_m(h)[k] = mean{ h[j] : j = k (mod m) }      tile_b(h)[k] = h[k mod m]

    free=True leaves the channels past m out (the autoencoder's free latent channels): fold reads only h[:m],
    and tile writes zeros to channels k >= m instead of copies.
    """

    def __init__(self, a: int, b: int, period: int = 1, free: bool = False):
        super().__init__()
        self.m = period * (min(a, b) // period)
        # free: widening from a latent (a -> b > a) reads only its first m channels; narrowing to a latent
        # (a -> b < a) writes zeros to its channels past m
        self.read_first_m = free and self.m < a < b
        self.zero_past_m = free and self.m < b < a
        if self.m == 0:
            raise ValueError(f"a channel shortcut {a} -> {b} with period {period} needs both widths >= {period}")
        self.groups = -(-a // self.m)  # ceil(a / m): the last group may be short of channels
        counts = torch.bincount(torch.arange(a) % self.m, minlength=self.m).float()  # channels per group
        self.register_buffer("counts", counts.view(self.m, 1, 1), persistent=False)
        self.register_buffer("index", torch.arange(b) % self.m, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, a, H, W = h.shape
        if self.read_first_m:  # free channels in: the shortcut ignores them
            h, a = h[:, :self.m], self.m
        if a != self.m:  # fold_m(h)[k] = mean{ h[j] : j = k (mod m) }
            h = F.pad(h, (0, 0, 0, 0, 0, self.groups * self.m - a))  # zero channels complete the last group
            h = h.reshape(B, self.groups, self.m, H, W).sum(1) / self.counts.to(h.dtype)  # -> (B, m, H, W)
        if len(self.index) != self.m:  # tile_b(h)[k] = h[k mod m]
            if self.zero_past_m:  # free channels out: zeros past m, no copies
                return F.pad(h, (0, 0, 0, 0, 0, len(self.index) - self.m))  # (B, m, H, W) -> (B, b, H, W)
            h = h[:, self.index]  # (B, m, H, W) -> (B, b, H, W)
        return h


def space_to_channel_shortcut(h: torch.Tensor) -> torch.Tensor:
    """DC-AE's downsampling shortcut at a kept width: pixel_unshuffle, then average each channel's 4
    sub-pixels, which is the 2x2 area mean."""
    B, C, H, W = h.shape
    h = F.pixel_unshuffle(h, 2)  # (B, C, H, W) -> (B, 4C, H/2, W/2); channel 4c + s = sub-pixel s of c
    return h.reshape(B, C, 4, H // 2, W // 2).mean(2)  # -> (B, C, H/2, W/2)


def channel_to_space_shortcut(h: torch.Tensor) -> torch.Tensor:
    """DC-AE's upsampling shortcut at a kept width: repeat each channel 4 times, then pixel_shuffle,
    which is nearest-neighbour upsampling."""
    h = h.repeat_interleave(4, dim=1)  # (B, C, h, w) -> (B, 4C, h, w)
    return F.pixel_shuffle(h, 2)  # -> (B, C, 2h, 2w)


class ResidualDownsample(Downsample):
    """SD's stride-2 conv plus the space-to-channel shortcut (same parameters as Downsample)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + space_to_channel_shortcut(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class ResidualUpsample(Upsample):
    """SD's nearest-upsample + conv plus a parameter-free shortcut (same parameters as Upsample): DC-AE's
    channel-to-space one (mode "nearest"), or bicubic interpolation at the same width (mode "bicubic")."""

    def __init__(self, channels: int, mode: str = "nearest"):
        super().__init__(channels)
        if mode not in ("nearest", "bicubic"):
            raise ValueError(f"unknown upsampling shortcut {mode!r}; valid: nearest, bicubic")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bicubic":
            short = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        else:
            short = channel_to_space_shortcut(x)
        return super().forward(x) + short  # (B, C, H, W) -> (B, C, 2H, 2W)
