"""Stage 2 denoiser, the transformer alternative: DiT (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", Sec. 3). A drop-in for the U-Net: eps_theta(z_t, t, cond) -> eps_pred on scaled latents.

  z_t (B, C, H, W) -> patchify: Conv2d, kernel = stride = P        -> tokens (B, N, D), N = (H/P) (W/P)
                   -> + fixed 2-D sin-cos position embedding        (Sec. 3.1 "Patchify")
                   -> depth x DiTBlock(tokens, c), c = t_emb [+ y_emb] (B, D)
                   -> final layer: adaLN LayerNorm -> Linear to P*P*C_out per token
                   -> unpatchify                                    -> eps_pred (B, C_out, H, W)
How the condition enters (cfg.cond_mode, the paper's Sec. 3.1 "DiT block design" ablation):
  "adaln"      adaLN-Zero: c = t_emb + y_emb regresses every block's shift, scale and gate. A context
               (B, M, D_ctx) is mean-pooled over its real tokens, projected and added to c: one vector
               for a whole prompt, a lossy summary (use "cross-attn" for text).
  "cross-attn" each block gets a cross-attention layer after self-attention, attending to the context
               (class labels: the label embedding as a 1-token context).
  "in-context" projected context tokens (class labels: the label token) are appended to the sequence and
               dropped after the last block.
In every mode adaLN-Zero carries t. (The paper's in-context and cross-attention variants also move t into
the tokens; we keep it in adaLN so that the ablation varies only how the condition enters.)
Labels 0..num_classes-1, plus null_class = num_classes, "no label", for classifier-free guidance; the
training task does the label dropout. cond is one of: labels (B,) int64 | None (-> null class) |
context (B, M, D_ctx) | (context, mask bool (B, M), True = a real token), as for the U-Net.
learn_sigma: the paper's models also output a variance (2C channels); our GaussianDiffusion uses eps only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .denoiser_inputs import check_cond, check_t
from .config import DiTConfig
from .layers import attention, timestep_embedding

COND_MODES = ("adaln", "cross-attn", "in-context")
# Width of the sinusoidal t features fed to the timestep MLP: DiT's value, independent of D.
TIME_FREQ_DIM = 256
# The Transformer's base wavelength for sinusoidal positions (Vaswani et al. 2017, Sec. 3.5).
MAX_PERIOD = 10000.0
LN_EPS = 1e-6      # DiT's LayerNorm epsilon
EMBED_STD = 0.02   # ViT/BERT's init std for embedding tables, which DiT keeps


def patchify(x: torch.Tensor, P: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C): every P x P patch flattened, patches in row-major order.
    DiT's patch embedding (a Conv2d with kernel = stride = P) is a Linear applied to these vectors."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=P, p2=P)


def unpatchify(x: torch.Tensor, P: int, h: int, w: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, h P, w P): the inverse of patchify, N = h * w."""
    return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=P, p2=P)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(M,) positions -> (M, dim): emb[:, k] = sin(pos w_k), emb[:, dim/2 + k] = cos(pos w_k),
    w_k = MAX_PERIOD^(-k / (dim/2)) (Vaswani et al. 2017, Sec. 3.5)."""
    k = torch.arange(dim // 2, dtype=torch.float64, device=pos.device)
    omega = MAX_PERIOD ** (-k / (dim / 2))                     # (dim/2,)
    angles = pos.double()[:, None] * omega[None]               # (M,) -> (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, dim)


def sincos_pos_embed_2d(dim: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """The fixed (h*w, dim) position table of DiT (from MAE): channels [0, dim/2) encode the column x,
    [dim/2, dim) the row y; rows of the table follow the tokens' row-major order."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # (h, w)
    emb = torch.cat([sincos_1d(x.flatten(), dim // 2), sincos_1d(y.flatten(), dim // 2)], dim=1)  # (h*w, dim)
    return emb.float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, one (shift, scale) per sample, broadcast over the N tokens.
    "1 +" makes scale = 0 the plain LayerNorm, which zero-initialised modulation starts from."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, D) with (B, D)


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of a context: (B, M, D) with mask (B, M) -> (B, D)."""
    if mask is None:
        return context.mean(dim=1)
    m = mask[..., None].to(context.dtype)                      # (B, M) -> (B, M, 1)
    return (context * m).sum(dim=1) / m.sum(dim=1)             # (B, M, D) -> (B, D)


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoidal features (B, 256) -> Linear -> SiLU -> Linear -> (B, D) (as the U-Net's)."""

    def __init__(self, D: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, TIME_FREQ_DIM))  # (B,) -> (B, 256) -> (B, D)


class LabelEmbedder(nn.Module):
    """Labels (B,) -> (B, D). The table has num_classes + 1 rows: row num_classes is the null label,
    "no class", which classifier-free guidance needs (Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, D: int):
        super().__init__()
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, D)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)  # (B,) -> (B, D)


class Attention(nn.Module):
    """Multi-head attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1): queries from the
    tokens x, keys and values from `source` (x itself for self-attention, a context for cross-attention)."""

    def __init__(self, D: int, num_heads: int, source_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(source_dim or D, D)  # K and V map the source's width onto D
        self.v = nn.Linear(source_dim or D, D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        q = rearrange(self.q(x), "b n (heads d) -> b heads n d", heads=self.num_heads)       # (B, heads, N, d)
        k = rearrange(self.k(source), "b m (heads d) -> b heads m d", heads=self.num_heads)  # (B, heads, M, d)
        v = rearrange(self.v(source), "b m (heads d) -> b heads m d", heads=self.num_heads)  # (B, heads, M, d)
        # A boolean attn_mask is True where attention is allowed: padded keys get weight exactly 0.
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, M) -> (B, 1, 1, M)
        h = attention(q, k, v, attn_mask)  # (B, heads, N, d)
        return self.proj(rearrange(h, "b heads n d -> b n (heads d)"))    # (B, N, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero (Peebles & Xie 2023, Sec. 3.1 and Fig. 3):
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
        x = x + gate1 * SelfAttn(modulate(LN(x), shift1, scale1))
        x = x + CrossAttn(LN(x), context)                 (cond_mode "cross-attn" only)
        x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))
    The modulation Linear starts at zero (DiT.init_weights): every gate is 0, the block is the identity."""

    def __init__(self, D: int, num_heads: int, mlp_ratio: float, cross_dim: int = 0):
        super().__init__()
        # No learned affine in the norms: adaLN's per-sample scale and shift take its place.
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(D, num_heads)
        self.norm_cross = nn.LayerNorm(D, eps=LN_EPS) if cross_dim else None
        self.cross_attn = Attention(D, num_heads, cross_dim) if cross_dim else None
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=LN_EPS)
        hidden = int(D * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), c (B, D); context (B, M, D_ctx) with context_mask (B, M) for cross-attention;
        x_mask (B, N): which of x's own tokens may be attended to (padding among appended tokens)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask=x_mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN LayerNorm (shift, scale from c), then a Linear from D to the P*P*C_out values of each patch."""

    def __init__(self, D: int, P: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=LN_EPS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, P * P * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, D) -> (B, N, P*P*C_out)


class DiT(nn.Module):
    """eps_theta(z_t, t, cond) as a transformer on patches. See the module docstring for the diagram."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.cond_mode not in COND_MODES:
            raise ValueError(f"unknown cond_mode {cfg.cond_mode!r}; valid: {', '.join(COND_MODES)}")
        if cfg.num_classes and cfg.context_dim:
            raise ValueError("DiTConfig: set num_classes OR context_dim, not both "
                             f"(got num_classes={cfg.num_classes}, context_dim={cfg.context_dim})")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size ({cfg.hidden_size}) must be divisible by num_heads ({cfg.num_heads})")
        self.cfg = cfg
        D, P = cfg.hidden_size, cfg.patch_size
        self._check_size(cfg.sample_size, cfg.sample_size, "sample_size")
        self.null_class = cfg.num_classes if cfg.num_classes else None

        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=P, stride=P)
        grid = cfg.sample_size // P
        # Fixed, not learned (Sec. 3.1): a buffer, rebuilt from the config, so kept out of the state_dict.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, grid, grid), persistent=False)  # (N, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D) if cfg.num_classes else None
        conditional = bool(cfg.num_classes or cfg.context_dim)
        # Cross-attention reads the raw context, or the label embedding (width D) as a 1-token context.
        cross_dim = (cfg.context_dim or D) if cfg.cond_mode == "cross-attn" and conditional else 0
        # The other modes bring the context to width D first (pooled for adaln, per token for in-context).
        self.context_proj = nn.Linear(cfg.context_dim, D) if cfg.context_dim and not cross_dim else None
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cross_dim) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, P, cfg.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation (Peebles & Xie 2023, Sec. 3.1 "adaLN-Zero block"), one reason per entry."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # Xavier-uniform, zero bias: the ViT default, keeps activation variance steady through depth
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # the patch embedding is a Linear on flattened P x P x C patches (see patchify), so initialise it as one
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.cfg.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        # small normal for embedding tables and the t MLP: their inputs are one-hot or bounded sinusoids
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=EMBED_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBED_STD)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBED_STD)
        for block in self.blocks:
            # adaLN-Zero: zero the modulation so every gate is 0 and each block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                # zero the cross-attention output too: it has no gate, and the block must start as the identity
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        # zero the final layer: eps_pred = 0 at init, so the loss starts at E||eps||^2 = 1, like the U-Net's
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float,
                cond: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noised latent; t: (B,) timesteps (or one for all); cond: labels (B,) int64,
        None, context (B, M, D_ctx) or (context, mask). Returns eps_pred (B, C_out, H, W)."""
        self._check_x(x)
        t = check_t(x, t)
        labels, context, mask = check_cond(x, cond, self.cfg.num_classes, self.cfg.context_dim, "DiT", "M")
        mode, P = self.cfg.cond_mode, self.cfg.patch_size
        h, w = x.shape[-2] // P, x.shape[-1] // P

        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")  # (B, C, H, W) -> (B, N, D), N = h w
        tokens = tokens + self._pos_embed(h, w)                            # (N, D) broadcast over B
        N = tokens.shape[1]
        c = self.t_embedder(t)  # (B,) -> (B, D)
        if labels is not None:
            y = self.y_embedder(labels)  # (B,) -> (B, D)
            if mode == "adaln":
                c = c + y  # Sec. 3.1: the adaLN input is the sum of the t and class embeddings
            else:
                context, mask = y[:, None], None  # (B, D) -> (B, 1, D): the label as a 1-token context
        elif context is not None and mode == "adaln":
            c = c + self.context_proj(masked_mean(context, mask))  # (B, M, D_ctx) -> (B, D_ctx) -> (B, D)
        elif context is not None and mode == "in-context":
            context = self.context_proj(context)  # (B, M, D_ctx) -> (B, M, D)

        x_mask = None
        if mode == "in-context" and context is not None:
            tokens = torch.cat([tokens, context.to(tokens.dtype)], dim=1)  # (B, N, D) -> (B, N + M, D)
            if mask is not None:
                x_mask = F.pad(mask, (N, 0), value=True)  # (B, M) -> (B, N + M): image tokens always visible
            context, mask = None, None
        elif mode == "adaln":
            context, mask = None, None  # already folded into c

        for block in self.blocks:
            tokens = block(tokens, c, context, mask, x_mask)
        tokens = tokens[:, :N]  # drop any appended condition tokens: only image tokens become pixels
        out = self.final_layer(tokens, c)  # (B, N, D) -> (B, N, P*P*C_out)
        return unpatchify(out, P, h, w)     # -> (B, C_out, H, W)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The stored table at the built size; any other grid gets its own table, from the same formula."""
        grid = self.cfg.sample_size // self.cfg.patch_size
        if (h, w) == (grid, grid):
            return self.pos_embed
        return sincos_pos_embed_2d(self.cfg.hidden_size, h, w, self.pos_embed.device)

    # ----------------------------------------------------------------------------------------------
    # Input checks: each says what was expected and what was given (the same contract as UNet's).
    # ----------------------------------------------------------------------------------------------

    def _check_size(self, H: int, W: int, what: str = "x") -> None:
        P = self.cfg.patch_size
        if H % P or W % P or H < P or W < P:
            down = (max(H // P, 1) * P, max(W // P, 1) * P)
            up = (-(-H // P) * P, -(-W // P) * P)  # round up to the next multiple of P
            raise ValueError(f"{what}: the latent size {H}x{W} is not divisible by patch_size P={P} (each "
                             f"P x P patch is one token); use e.g. {down[0]}x{down[1]} or {up[0]}x{up[1]}")

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor (B, C, H, W), got {shape}")
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, this DiT expects in_channels={self.cfg.in_channels}")
        self._check_size(*x.shape[-2:])
