"""Exponential moving averages of a model's parameters, at one or more rates."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class EMA:
    """`ema = rate * ema + (1 - rate) * param` after every optimizer step, per rate.

    Averages are kept in float32 on the parameters' device; buffers are not averaged (the ADM
    models have none)."""

    def __init__(self, model: nn.Module, rates: Sequence[float]):
        self.rates = [float(r) for r in rates]
        for r in self.rates:
            if not 0.0 < r < 1.0:
                raise ValueError(f"EMA rate {r} must be in (0, 1)")
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [[p.detach().float().clone() for _, p in model.named_parameters()]
                       for _ in self.rates]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = [p.detach().float() for p in model.parameters()]
        for rate, avg in zip(self.rates, self.params):
            torch._foreach_lerp_(avg, src, 1.0 - rate)  # avg += (1 - rate) * (src - avg)

    def state_dict(self, rate: float) -> dict[str, torch.Tensor]:
        """The averaged parameters at `rate`, keyed like the model's state dict (on CPU)."""
        avg = self.params[self.rates.index(float(rate))]
        return {n: p.cpu().clone() for n, p in zip(self.names, avg)}

    def load_state_dict(self, rate: float, state: dict[str, torch.Tensor]) -> None:
        avg = self.params[self.rates.index(float(rate))]
        for n, p in zip(self.names, avg):
            p.copy_(state[n])
