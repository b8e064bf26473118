"""Polyak averaging of a model's weights during training (Ho et al. 2020 sample with EMA weights, decay
0.9999; LDM too). The Trainer (train.py) keeps one EMA per run and swaps it in to sample and to save.

The warm-up matters for short runs. A fixed decay d keeps a fraction d^n of the *initial* weights after n
steps: at d = 0.999 that is e^-2.4 = 9% after 2,400 steps, and those random weights bias every noise
prediction the averaged model makes (the symptom: deterministic DDIM gets *worse* with more steps, because
each step adds the same systematic error). The warm-up lets the decay grow with the number of updates,

    d_n = min(d, (1 + n) / (10 + n))          (TensorFlow's ExponentialMovingAverage `num_updates`; LDM's LitEma)

so after n updates the average covers roughly the last tenth of training, whatever the run length, and
the initial weights' share falls as prod_k (1 - 9 / (10 + k)) ~ (10 / n)^9: nothing left after a few dozen
steps. Long runs reach the cap d and behave exactly as the fixed-decay EMA.
"""
from __future__ import annotations

import torch
from torch import nn

# d_n = min(d, (1 + n) / (WARMUP_OFFSET + n)): the 10 of TensorFlow's and LDM's warm-up.
WARMUP_OFFSET = 10


def ema_decay_at(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay used for update number `num_updates` (0 = the first update after initialisation)."""
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (WARMUP_OFFSET + num_updates))


class EMA:
    """Exponential moving average of a module's weights (Polyak averaging, as in DDPM/LDM):

        theta_ema <- d_n * theta_ema + (1 - d_n) * theta,   d_n = ema_decay_at(decay, n, warmup)

    Integer buffers (counters) are copied, not averaged. Sampling uses the averaged weights.
    `num_updates` counts the updates so far; the Trainer restores it from the step count on resume.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @property
    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay_at(self.decay, self.num_updates, self.warmup)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay
        averaged, live = [], []
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                averaged.append(self.shadow[k])
                live.append(v.detach())
            else:
                self.shadow[k].copy_(v)
        if averaged:  # ema + (1 - d) (theta - ema) for every tensor in one multi-tensor op (a loop of lerp_ otherwise)
            torch._foreach_lerp_(averaged, live, 1.0 - d)
        self.num_updates += 1

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
