"""The EMA update of `torch.optim.swa_utils.AveragedModel`, with an optional warm-up.

The reference averages at a fixed rate from the first step (`ema = rate·ema + (1−rate)·θ`).
Over a short run that average is mostly the initial weights: at rate 0.999, 300 steps leave
0.999³⁰⁰ ≈ 74% of the random initialisation in it. With `warmup`, update n (0-based) uses
`min(rate, (1 + n) / (10 + n))` instead (TensorFlow's `ExponentialMovingAverage(num_updates)`),
so early averages follow the weights closely and the rate takes over once n passes
(10·rate − 1)/(1 − rate) (9,989 updates at 0.999); long runs average as the reference does.
"""
from __future__ import annotations

from typing import Callable

import torch


def ema_multi_avg_fn(rate: float, warmup: bool = False) -> Callable:
    """An AveragedModel `multi_avg_fn`: lerps the averaged parameters towards the model's.

    AveragedModel passes `num_averaged` as a tensor on the parameters' device, counting from 1
    here (the loop starts the average at the initial weights), so the decay is computed on the
    device: no host-device sync per step."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"EMA rate {rate} must be in (0, 1)")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        if not warmup:
            torch._foreach_lerp_(averaged, current, 1.0 - rate)
            return
        n = num_averaged.to(torch.float32) - 1  # updates before this one
        decay = torch.clamp((1 + n) / (10 + n), max=rate)
        for avg, cur in zip(averaged, current):  # avg += (1 − decay)·(cur − avg)
            avg.lerp_(cur, (1 - decay).to(avg.dtype))

    return update
