"""Stage 2 denoiser: the U-Net eps_theta(x_t, t, cond) -> eps_pred, same shape as x_t.

The architecture is the DDPM U-Net (Ho et al. 2020, App. B) with the improvements of Dhariwal &
Nichol 2021 (Sec. 3: time embedding as a GroupNorm scale-shift, multi-head attention, zero-initialised
residual branches) and the cross-attention conditioning of Rombach et al. 2022 (Sec. 3.3). In the
pipeline it sits in the middle room: it denoises pixels (04_ddpm) or scaled latents z_t (05, 07).

  x (B, C, H, W) -> conv_in -> encoder levels (ResBlocks [+ attention], Downsample), skips saved
                 -> middle: ResBlock, attention, ResBlock
                 -> decoder levels (concat skip, ResBlocks [+ attention], Upsample)
                 -> GroupNorm -> SiLU -> conv_out (zero-initialised) -> eps_pred (B, C, H, W)
  t (B,) -> sinusoidal -> Linear -> SiLU -> Linear = temb (B, 4 ch), fed to every ResBlock
  cond:  num_classes > 0  -> labels (B,) int64; Embedding(label) is added to temb. The extra row
                             `null_class` (= num_classes) is "no label", for classifier-free guidance.
         context_dim > 0  -> context (B, N, context_dim), or (context, mask) with mask (B, N) bool,
                             True = a real token, False = padding that no query may attend to.
The two kinds of conditioning are exclusive: one `cond` argument, one meaning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .denoiser_inputs import check_cond, check_t
from .config import UNetConfig
from .layers import Downsample, Normalize, ResnetBlock, SelfAttention2d, Upsample, attention, timestep_embedding


class CrossAttention2d(nn.Module):
    """Queries from the feature map, keys and values from a context sequence, with a residual.

    Rombach et al. 2022, Eq. 3: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with
    Q = W_Q phi(z_t) (the flattened feature map), K = W_K tau(y), V = W_V tau(y) (the encoded prompt).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1, groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = Normalize(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(context_dim, channels)  # K and V map the context's width onto the feature width
        self.v = nn.Linear(context_dim, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, H*W, C)
        q = rearrange(self.q(h), "b n (heads d) -> b heads n d", heads=self.num_heads)  # (B, heads, H*W, d)
        k = rearrange(self.k(context), "b n (heads d) -> b heads n d", heads=self.num_heads)  # (B, heads, N, d)
        v = rearrange(self.v(context), "b n (heads d) -> b heads n d", heads=self.num_heads)  # (B, heads, N, d)
        # A boolean attn_mask is True where attention is allowed: padded tokens get weight exactly 0.
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, N) -> (B, 1, 1, N)
        h = attention(q, k, v, attn_mask)  # (B, heads, H*W, d)
        h = self.proj_out(rearrange(h, "b heads n d -> b n (heads d)"))  # (B, H*W, C)
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # (B, H*W, C) -> (B, C, H, W)


class AttentionBlock(nn.Module):
    """Self-attention, then (with a context) cross-attention: a "transformer-lite" block.

    SD's SpatialTransformer also has a feed-forward layer after the two attentions; we leave it out
    because the ResBlock that follows every attention block already does per-position channel mixing,
    and a 4x-wide MLP at every attention site would roughly double the CPU cost of those levels.
    """

    def __init__(self, channels: int, num_heads: int, groups: int, context_dim: int = 0):
        super().__init__()
        self.self_attn = SelfAttention2d(channels, num_heads, groups)
        self.cross_attn = CrossAttention2d(channels, context_dim, num_heads, groups) if context_dim else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context, mask)
        return x


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, each followed by attention when the level
    has any, then an optional Downsample/Upsample (`resample`)."""

    def __init__(self, res: list[ResnetBlock], attn: list[AttentionBlock], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample


class UNet(nn.Module):
    """eps_theta(x_t, t, cond): predicts the noise in x_t. See the module docstring for the diagram."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.num_classes and cfg.context_dim:
            raise ValueError("UNetConfig: set num_classes OR context_dim, not both "
                             f"(got num_classes={cfg.num_classes}, context_dim={cfg.context_dim})")
        self.cfg = cfg
        num_levels = len(cfg.ch_mult)
        # Each level after the first halves H and W, so inputs must be divisible by this factor.
        self.size_factor = 2 ** (num_levels - 1)
        level_sizes = [cfg.sample_size // 2 ** i for i in range(num_levels)]  # e.g. 32, 16, 8
        unused = sorted(set(cfg.attn_resolutions) - set(level_sizes))
        if unused:
            raise ValueError(f"attn_resolutions {unused} match no level; with sample_size {cfg.sample_size} "
                             f"and ch_mult {cfg.ch_mult} the feature-map sizes are {level_sizes}")
        ch, groups, heads, ctx = cfg.ch, cfg.norm_groups, cfg.num_heads, cfg.context_dim
        temb_dim = 4 * ch  # the DDPM width of the time embedding

        # Time: sinusoidal features of t, then an MLP (Ho et al. 2020, App. B).
        self.time_embed = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # Labels 0..num_classes-1 plus the null class at index num_classes (classifier-free guidance).
        self.null_class = cfg.num_classes if cfg.num_classes else None
        self.class_embed = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes else None

        def res(c_in: int, c_out: int) -> ResnetBlock:
            return ResnetBlock(c_in, c_out, temb_dim=temb_dim, dropout=cfg.dropout, groups=groups)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, heads, groups, ctx)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        # Encoder: record the width of every tensor pushed onto the skip stack; the decoder pops them.
        skip_chs, c = [ch], ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            res_blocks, attn_blocks = [], []
            for _ in range(cfg.num_res_blocks):
                res_blocks.append(res(c, ch * mult))
                c = ch * mult
                if level_sizes[i] in cfg.attn_resolutions:
                    attn_blocks.append(attn(c))
                skip_chs.append(c)
            last = i == num_levels - 1
            self.down.append(Level(res_blocks, attn_blocks, None if last else Downsample(c, padding="same")))
            if not last:
                skip_chs.append(c)

        self.mid_res1, self.mid_attn, self.mid_res2 = res(c, c), attn(c), res(c, c)

        # Decoder: one more ResBlock per level than the encoder, so every skip is consumed exactly once.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            res_blocks, attn_blocks = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res_blocks.append(res(c + skip_chs.pop(), ch * mult))
                c = ch * mult
                if level_sizes[i] in cfg.attn_resolutions:
                    attn_blocks.append(attn(c))
            self.up.append(Level(res_blocks, attn_blocks, Upsample(c) if i > 0 else None))

        self.norm_out = Normalize(c, groups)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero the last layer of every residual branch and of the network (Dhariwal & Nichol 2021;
        Ho et al. 2020's code does the same with init_scale=0)."""
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                # zero conv2: every ResBlock starts as its skip path, so depth does not blow up activations
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            if isinstance(m, (SelfAttention2d, CrossAttention2d)):
                # zero proj_out: attention starts as the identity and is learned in gradually
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        # zero conv_out: eps_pred = 0 at init, so the loss starts at E||eps||^2 = 1 per element, not the
        # large, noisy value a random output head would give; training starts from a stable point.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float,
                cond: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noised input; t: (B,) timesteps (or one for all); cond: labels (B,) int64,
        or context (B, N, D) or (context, mask). Returns eps_pred (B, C, H, W)."""
        self._check_x(x)
        t = check_t(x, t)
        labels, context, mask = check_cond(x, cond, self.cfg.num_classes, self.cfg.context_dim, "UNet", "N")

        temb = self.time_embed(timestep_embedding(t, self.cfg.ch))  # (B,) -> (B, ch) -> (B, 4 ch)
        if labels is not None:
            temb = temb + self.class_embed(labels)  # (B, 4 ch): the label shifts every ResBlock's scale-shift

        h = self.conv_in(x)  # (B, C, H, W) -> (B, ch, H, W)
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = block(h, temb)  # (B, c_in, h, w) -> (B, ch * mult, h, w)
                if len(level.attn):
                    h = level.attn[j](h, context, mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, c, h, w) -> (B, c, h / 2, w / 2)
                skips.append(h)

        h = self.mid_res1(h, temb)
        h = self.mid_attn(h, context, mask)
        h = self.mid_res2(h, temb)

        for level in self.up:
            for j, block in enumerate(level.res):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, c, h, w) -> (B, c + c_skip, h, w)
                h = block(h, temb)  # -> (B, ch * mult, h, w)
                if len(level.attn):
                    h = level.attn[j](h, context, mask)
            if level.resample is not None:
                h = level.resample(h)  # (B, c, h, w) -> (B, c, 2h, 2w)

        h = F.silu(self.norm_out(h))
        return self.conv_out(h)  # (B, ch, H, W) -> (B, out_channels, H, W)

    # ----------------------------------------------------------------------------------------------
    # Input checks: each says what was expected and what was given.
    # ----------------------------------------------------------------------------------------------

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor (B, C, H, W), got {shape}")
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, this UNet expects in_channels={self.cfg.in_channels}")
        H, W = x.shape[-2:]
        f = self.size_factor
        if H % f or W % f:
            ok = (-(-H // f) * f, -(-W // f) * f)  # round up to the next multiple of f
            raise ValueError(f"H and W must be divisible by {f} (= 2 ** (len(ch_mult) - 1), one halving per "
                             f"level after the first); got {H}x{W}, e.g. pad to {ok[0]}x{ok[1]}")
