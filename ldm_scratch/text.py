"""The prompt encoder tau(y): a word-level tokenizer and a tiny transformer, our stand-in for CLIP's
text tower (Radford et al. 2021, Sec. 2.4).

Where it sits in the pipeline: beside the denoiser. A caption "a red 7 on grass" becomes token ids
(B, N) and a padding mask (B, N); the TextEncoder turns them into one feature per token, a context
(B, N, D) that the U-Net reads through cross-attention (Rombach et al. 2022, Sec. 3.3, Eq. 3:
K = W_K tau(y), V = W_V tau(y)). Stable Diffusion likewise feeds the U-Net every token's output of
CLIP's last layer, not one pooled vector. `pooled` (a masked mean) is there for models that want a
single vector per prompt, e.g. DiT's adaLN conditioning.

Two simplifications against CLIP, both because our captions are short sentences from a closed set:
  - words, not byte-pair encoding: the vocabulary is the set of words in the training captions, and a
    word outside it becomes [unk], with a warning that lists such words (CLIP's BPE never fails, but
    silently splits an unseen word into pieces the model may never have trained on);
  - bidirectional attention: CLIP's text transformer is causal (it was built like GPT-2), so a token
    sees only its left; ours lets "7" see "red" and "grass" too. Padding is masked out of the keys,
    so pad tokens never change a real token's output.
Every encoding starts with [bos], so the empty prompt "" is [bos] alone: a real, learnable token
that serves as the null condition for classifier-free guidance (the U-Net's cross-attention needs at
least one unmasked token per row; an all-padding row would give softmax over nothing = NaN).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TextEncoderConfig
from .layers import attention

PAD, BOS, UNK = "[pad]", "[bos]", "[unk]"
SPECIAL_TOKENS = (PAD, BOS)  # ids 0 and 1, before every word
PAD_ID, BOS_ID = 0, 1


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary: prompts -> (ids (B, L) int64, mask (B, L) bool).

    Token ids: 0 = [pad], 1 = [bos], 2.. = the words in `vocab` order, then [unk] last (if `unk`). Every
    row is [bos] w1 w2 ... [pad] [pad], L = max_length; mask is True on [bos] and the words.
    Prompts are lowercased and split on whitespace, so the vocabulary holds lowercase words.

    Prompts a model was not trained on, handled as diffusers' CLIP tokenizer does, with a warning:
      - too long: cut to the first max_length - 1 words (diffusers cuts to the tokenizer's 77 tokens);
      - an unknown word: [unk], one warning per encode() listing every unknown word. [unk] keeps the
        other words at the positions they were trained at ("a purple 7 on grass": "7" stays third),
        where dropping the word would shift them. No training caption holds an unknown word, so [unk]'s
        embedding stays as initialised: it stands for "some word", not for what the user meant.
    Backwards compatibility: [unk] is the LAST id, so every word keeps the id it had before [unk] existed
    (cached token ids stay valid). A tokenizer saved before then (to_dict without "unk") loads with
    unk=False: its text encoder has no embedding row for [unk], so an unknown word stays a ValueError
    that lists the vocabulary. Mapping it to [pad] instead would mask the word out, which that model never
    saw during training either; an error keeps an old pipeline's behaviour exactly what it was.
    """

    def __init__(self, vocab: list[str], max_length: int, unk: bool = True):
        vocab = list(vocab)
        bad = [w for w in vocab if not isinstance(w, str) or not w or w != w.lower() or len(w.split()) != 1]
        if bad:
            raise ValueError(f"vocabulary words must be non-empty lowercase strings without spaces, got {bad}")
        if set(vocab) & {*SPECIAL_TOKENS, UNK}:
            raise ValueError(f"the vocabulary must not contain the special tokens {(*SPECIAL_TOKENS, UNK)}: "
                             f"they are added as ids 0 and 1 (and the last id)")
        if not isinstance(unk, bool):
            raise ValueError(f"unk must be True or False, got {unk!r}")
        if len(set(vocab)) != len(vocab):
            dups = sorted({w for w in vocab if vocab.count(w) > 1})
            raise ValueError(f"the vocabulary has duplicate words: {dups}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (room for [bos]), got {max_length!r}")
        self.words = vocab
        self.max_length = max_length
        self.unk_id = len(SPECIAL_TOKENS) + len(vocab) if unk else None  # the last id, after every word
        self.itos = list(SPECIAL_TOKENS) + vocab + ([UNK] if unk else [])  # id -> token
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}  # token -> id

    @classmethod
    def from_captions(cls, captions: list[str], max_length: int | None = None) -> Tokenizer:
        """The sorted set of words in `captions`; max_length defaults to the longest caption's words + 1 ([bos])."""
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"expected a non-empty list of caption strings, got {type(captions).__name__}")
        split = [c.lower().split() for c in captions]
        vocab = sorted({w for words in split for w in words})
        return cls(vocab, max(len(words) for words in split) + 1 if max_length is None else max_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids: the words plus [pad], [bos] (and [unk]); TextEncoderConfig.vocab_size."""
        return len(self.itos)

    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (one string or B strings) -> ids (B, L) int64 and mask (B, L) bool, L = max_length.
        Too-long prompts are cut and unknown words become [unk], each with one warning (class docstring)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"expected a prompt string or a non-empty list of them, got {prompts!r}")
        ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.int64)  # (B, L), all [pad]
        cut, unknown = [], []  # the prompts truncated, the unknown words (in order, once each)
        for b, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {b} should be a string, got {type(prompt).__name__}: {prompt!r}")
            words = prompt.lower().split()
            if len(words) + 1 > self.max_length:  # [bos] takes one of the max_length positions
                cut.append(prompt)
                words = words[:self.max_length - 1]
            # "[pad]" or "[bos]" typed in a prompt are words like any other, not the special tokens
            new = [w for w in words if (w not in self.stoi or w in SPECIAL_TOKENS) and w not in unknown]
            if new and self.unk_id is None:
                raise ValueError(f"unknown word {new[0]!r} in prompt {prompt!r}; the vocabulary is: "
                                 f"{', '.join(self.words)} (this tokenizer was saved without [unk])")
            unknown += new
            token_ids = [self.unk_id if w in unknown else self.stoi[w] for w in words]
            ids[b, :len(words) + 1] = torch.tensor([BOS_ID] + token_ids)
        limit = self.max_length - 1
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than {limit} words (max_length {self.max_length} "
                          f"includes [bos]) cut to their first {limit}: {', '.join(map(repr, cut[:3]))}"
                          f"{', ...' if len(cut) > 3 else ''}", stacklevel=2)
        if unknown:
            warnings.warn(f"unknown words {unknown} encoded as {UNK}, a token no training caption held; "
                          f"the vocabulary is: {', '.join(self.words)}", stacklevel=2)
        return ids, ids != PAD_ID

    def decode(self, ids: torch.Tensor | list) -> list[str]:
        """ids (B, L) or (L,) -> B prompts (lowercase words joined by spaces; [pad] and [bos] dropped)."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)  # (L,) -> (1, L)
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"expected integer ids shaped (B, L) or (L,), got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in 0..{self.vocab_size - 1}, got range [{ids.min()}, {ids.max()}]")
        return [" ".join(self.itos[i] for i in row if i >= len(SPECIAL_TOKENS)) for row in ids.tolist()]

    def to_dict(self) -> dict:
        """JSON-ready: the words (ids 2..), max_length and whether [unk] follows them; [pad], [bos] are implied."""
        return {"vocab": list(self.words), "max_length": self.max_length, "unk": self.unk_id is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """Rebuild from `to_dict()`; a malformed dict is a ValueError saying what was expected. A dict without
        "unk" was saved before [unk] existed: it loads without it (the class docstring says why)."""
        required, optional = {"vocab", "max_length"}, {"unk"}
        if not isinstance(d, dict) or not required <= set(d) <= required | optional:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"expected a tokenizer dict with keys {sorted(required)} (and optionally "
                             f"{sorted(optional)}), got {got}")
        if not isinstance(d["vocab"], list) or not all(isinstance(w, str) for w in d["vocab"]):
            raise ValueError(f"tokenizer dict: 'vocab' should be a list of strings, got {d['vocab']!r}")
        return cls(d["vocab"], d["max_length"], d.get("unk", False))  # the constructor checks every field

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Tokenizer({len(self.words)} words{' + [unk]' if self.unk_id is not None else ''}, " \
               f"max_length={self.max_length})"


# ----------------------------------------------------------------------------- transformer


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (Vaswani et al. 2017, with the
    LayerNorm moved inside the residual branch as in GPT-2 and CLIP, which trains without warm-up)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # queries, keys and values in one matmul
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention; mask (B, N) True = a real token, the only keys a query may attend to."""
        q, k, v = rearrange(self.qkv(x), "b n (three heads d) -> three b heads n d",
                            three=3, heads=self.num_heads)  # (B, N, 3D) -> 3 x (B, heads, N, D/heads)
        # softmax(Q K^T / sqrt(d)) V, with masked keys given weight exactly 0 (a boolean attn_mask is True
        # where attention is allowed). Pad *queries* still compute an output; nothing downstream reads it.
        attn_mask = mask[:, None, None, :]  # (B, N) -> (B, 1, 1, N): the same keys for every head and query
        if self.training and self.dropout:  # attention dropout: only the fused kernel has it
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout)
        else:
            h = attention(q, k, v, attn_mask)  # (B, heads, N, D/heads)
        h = rearrange(h, "b heads n d -> b n (heads d)")  # (B, heads, N, D/heads) -> (B, N, D)
        return F.dropout(self.proj(h), self.dropout, self.training)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x), mask)  # (B, N, D)
        x = x + self.mlp(self.ln2(x))  # (B, N, D) -> (B, N, hidden) -> (B, N, D)
        return x


class TextEncoder(nn.Module):
    """tau(y): token ids (B, N) + mask (B, N) -> context (B, N, D), one feature per token.

      ids -> token embedding + learned position embedding -> depth x TransformerBlock -> LayerNorm
    Outputs at padded positions are set to 0: they carry no information, and zeros make the output a
    function of the real tokens alone.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"TextEncoderConfig.vocab_size must count the words plus [pad], [bos] (and [unk]) "
                             f"(set it to tokenizer.vocab_size), got {cfg.vocab_size}")
        if cfg.max_length < 1 or cfg.depth < 0:
            raise ValueError(f"need max_length >= 1 and depth >= 0, got {cfg.max_length} and {cfg.depth}")
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Learned, not sinusoidal, as in CLIP: only max_length positions ever exist.
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.dim))
        self.blocks = nn.ModuleList([TransformerBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
                                     for _ in range(cfg.depth)])
        self.ln_final = nn.LayerNorm(cfg.dim)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2/CLIP-style initialisation, each entry with its reason."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # std 0.02 (GPT-2): small enough that the 2-layer stack starts near the identity
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # std 0.02 token embeddings (GPT-2, CLIP): every word starts distinct but near the origin
        nn.init.normal_(self.token_emb.weight, std=0.02)
        # std 0.01 positions (CLIP): position is a smaller signal than the word itself
        nn.init.normal_(self.pos_emb, std=0.01)
        for block in self.blocks:
            # Each block adds two residual branches; scaling their last layer by 1/sqrt(2 * depth)
            # (GPT-2, Radford et al. 2019, Sec. 2.3) keeps the residual stream's variance independent of depth.
            scale = 0.02 / math.sqrt(2 * len(self.blocks))
            nn.init.normal_(block.proj.weight, std=scale)
            nn.init.normal_(block.mlp[2].weight, std=scale)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor):
            raise ValueError(f"expected tensors ids (B, N) and mask (B, N), got {type(ids).__name__} "
                             f"and {type(mask).__name__}")
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool or ids.shape[0] == 0:
            raise ValueError(f"expected integer ids shaped (B, N) with B >= 1, got {ids.dtype} {tuple(ids.shape)}")
        if not 1 <= ids.shape[1] <= self.cfg.max_length:
            raise ValueError(f"expected 1 to max_length={self.cfg.max_length} tokens per prompt, got {ids.shape[1]}")
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"expected a bool mask shaped like ids {tuple(ids.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.cfg.vocab_size - 1}, "
                             f"got range [{ids.min()}, {ids.max()}]")
        if not mask.any(dim=1).all():
            raise ValueError("every prompt needs at least one real token (mask True); encode '' to get [bos]")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, N) int64, mask (B, N) bool (True = real token) -> context (B, N, D)."""
        self._check(ids, mask)
        N = ids.shape[1]
        x = self.token_emb(ids) + self.pos_emb[:, :N]  # (B, N) -> (B, N, D)
        for block in self.blocks:
            x = block(x, mask)  # (B, N, D)
        x = self.ln_final(x)  # (B, N, D)
        return x * mask[:, :, None].to(x.dtype)  # zero the pad positions: (B, N, D)

    @staticmethod
    def pooled(context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over the real tokens: context (B, N, D), mask (B, N) -> (B, D)."""
        if context.dim() != 3 or mask.shape != context.shape[:2]:
            raise ValueError(f"expected context (B, N, D) and mask (B, N), got {tuple(context.shape)} "
                             f"and {tuple(mask.shape)}")
        m = mask[:, :, None].to(context.dtype)  # (B, N) -> (B, N, 1)
        # mean = sum_n m_n c_n / sum_n m_n; the clamp only guards an all-padding row (then 0, not NaN)
        return (context * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B, N, D) -> (B, D)
