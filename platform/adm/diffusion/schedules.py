"""Beta schedules: how much noise each of the T forward steps adds.

The two schedules of the ADM paper (and of Nichol & Dhariwal 2021 before it), float64 numpy
arrays of shape [T] like the reference's:

- ``linear``: Ho et al.'s 1e-4 .. 0.02 over 1000 steps, scaled by 1000/T so that any step count
  describes (nearly) the same process; at T = 20 its last beta is exactly 1, which the
  reference accepts.
- ``cosine``: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) on s ∈ [0, 1], discretised as
  β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas [T] (float64) that discretise a continuous ᾱ(s), s ∈ [0, 1] (the cumulative product
    of 1 − β up to time s): β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta). `max_beta` < 1 keeps
    the last steps away from the singularity ᾱ = 0."""
    n = num_diffusion_timesteps
    bars = np.array([alpha_bar(i / n) for i in range(n + 1)], dtype=np.float64)
    return np.minimum(1.0 - bars[1:] / bars[:-1], max_beta)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The betas [T] (float64) of a named schedule, ``"linear"`` or ``"cosine"`` (see the module
    docstring). Raises ValueError naming an unknown schedule or a non-positive step count."""
    n = int(num_diffusion_timesteps)
    if n < 1:
        raise ValueError(f"diffusion_steps={num_diffusion_timesteps}: need at least one step")
    if schedule_name == "linear":
        scale = 1000 / n
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(n, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise_schedule {schedule_name!r}: expected one of {SCHEDULES}")
