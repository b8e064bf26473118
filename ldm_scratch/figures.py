"""The pictures a training run writes beside its checkpoint: sample/reconstruction grids and the
loss curves (train.py calls both; the stages' sample() methods call save_image_grid).
Built on matplotlib's Figure, not pyplot, so they never touch a notebook's backend.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def save_image_grid(rows: list[torch.Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Save rows of images (each (B, C, H, W) in [-1, 1]) as one PNG grid, one tensor per row."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
    n = max(r.shape[0] for r in rows)
    fig = Figure(figsize=(1.2 * n, 1.2 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, row in enumerate(rows):
        imgs = ((row.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # (B,C,H,W) -> (B,H,W,C)
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < imgs.shape[0]:
                img = imgs[j].numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_history(history: list[dict], path: str | os.PathLike, keys: list[str] | None = None) -> None:
    """One small panel per logged quantity (default: all) against the step: the loss-curve PNG."""
    from matplotlib.figure import Figure
    keys = keys or sorted({k for h in history for k in h if k != "step"})
    cols = min(4, len(keys))
    if not history or not cols:
        return
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    for ax, key in zip(fig.subplots(rows, cols, squeeze=False).flat, keys):
        steps, values = zip(*[(h["step"], h[key]) for h in history if key in h] or [(0, 0.0)])
        ax.plot(steps, values, lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=80)
