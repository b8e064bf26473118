"""The input contract both denoisers share (unet.py's UNet and dit.py's DiT): eps_theta(x_t, t, cond).

t is a scalar or (B,) timesteps; cond is class labels (B,) int64 (None -> the null class of classifier-free
guidance, Ho & Salimans 2022), a context (B, N, D) with an optional bool mask (B, N), or None for an
unconditional model. Each bad input raises ValueError saying what was expected and what was given.
"""
from __future__ import annotations

import torch

Labels, Context, Mask = torch.Tensor | None, torch.Tensor | None, torch.Tensor | None


def check_t(x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
    """t as (B,) on x's device: a scalar is one timestep for the whole batch."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(B)
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"t must be a scalar or have shape (B,) = ({B},), got shape {tuple(t.shape)}")
    return t


def check_cond(x: torch.Tensor, cond, num_classes: int, context_dim: int, model: str,
               tokens: str = "N") -> tuple[Labels, Context, Mask]:
    """-> (labels or None, context or None, mask or None), validated against the model's config.
    `model` names the model in messages ("UNet", "DiT"); `tokens` is the letter its docs use for N."""
    B = x.shape[0]
    if not num_classes and not context_dim:
        if cond is not None:
            raise ValueError(f"this {model} is unconditional (num_classes=0, context_dim=0) but cond was given")
        return None, None, None
    if num_classes:
        if cond is None:  # no label = the null class (index num_classes): CFG's unconditional half
            return torch.full((B,), num_classes, dtype=torch.long, device=x.device), None, None
        if not isinstance(cond, torch.Tensor) or cond.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"a class-conditional {model} expects cond = integer labels (B,), got "
                             f"{cond.dtype if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        if cond.shape != (B,):
            raise ValueError(f"labels must have shape (B,) = ({B},), got {tuple(cond.shape)}")
        if cond.numel() and (cond.min() < 0 or cond.max() > num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = null class), "
                             f"got min {int(cond.min())}, max {int(cond.max())}")
        return cond.long(), None, None
    if cond is None:  # a context model's null is the encoded empty prompt, which only the caller has
        raise ValueError(f"this {model} is conditioned on a context (B, {tokens}, {context_dim}); cond=None given. "
                         "For classifier-free guidance pass the encoded empty prompt.")
    context, mask = cond if isinstance(cond, (tuple, list)) else (cond, None)
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != context_dim:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context must have shape (B, {tokens}, {context_dim}), got {shape}")
    if context.shape[0] != B:
        raise ValueError(f"context batch size {context.shape[0]} != x batch size {B}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != context.shape[:2]:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be bool of shape (B, {tokens}) = {tuple(context.shape[:2])}, got {got}")
        if not mask.any(dim=1).all():
            raise ValueError("every mask row needs at least one True (real) token; an all-padding row "
                             "leaves nothing to attend to (a softmax over nothing is NaN)")
    return None, context, mask
