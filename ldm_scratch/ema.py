"""Polyak averaging of a model's weights during training (Ho et al. 2020 sample with EMA weights, decay
0.9999; LDM too). The Trainer (train.py) keeps one EMA per run and swaps it in to sample and to save.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Exponential moving average of a module's weights (Polyak averaging, as in DDPM/LDM):

        theta_ema <- decay * theta_ema + (1 - decay) * theta

    Integer buffers (counters) are copied, not averaged. Sampling uses the averaged weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)  # ema + (1 - decay) (theta - ema)
            else:
                self.shadow[k].copy_(v)

    @torch.no_grad()
    def swap(self, module: nn.Module) -> None:
        """Exchange the module's weights with the averaged ones (call twice to undo)."""
        for k, v in module.state_dict().items():
            tmp = v.detach().clone()
            v.copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
