"""Classifier guidance in a limited interval of noise levels (Kynkäänniemi et al., *Applying
Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models*,
NeurIPS 2024): guidance at high noise costs diversity, at low noise it does little, so it is
applied only where the step's noise level is inside (lo, hi].

The unit is the paper's: EDM's noise level σ = √((1 − ᾱ_t) / ᾱ_t) (x_t / √ᾱ_t = x_0 + σ·ε), which
is the same for any number of steps and any respacing of a chain, and lets the paper's intervals
carry over (its ImageNet-512 EDM2 interval is (0.28, 5.42]). On ADM's linear 1000-step chain σ
runs from 0.01 (t = 0) to 157 (t = 999); (0.28, 5.42] is t = 82 … 578.

A guidance function with an interval is `cond_fn` with an `interval` attribute (`limited`); the
sampling loops ask `guidance_at` at each step, from the step's ᾱ on the host (no device sync), and
outside the interval they run the unguided step (the classifier is not called at all).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

Interval = tuple[float, float]


def check_interval(interval: Sequence[float] | None) -> Interval | None:
    """(lo, hi) as floats, with 0 <= lo < hi (hi may be inf); None stays None. A ValueError says
    what is wrong."""
    if interval is None:
        return None
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or math.isnan(values[0]) or math.isnan(values[1]) \
            or not 0.0 <= values[0] < values[1]:
        raise ValueError(f"guidance_interval {list(interval)}: expected [lo, hi], noise levels "
                         "sigma with 0 <= lo < hi (hi may be inf)")
    return values


def sigma(alpha_bar: float) -> float:
    """EDM's noise level of a step with cumulative ᾱ: √((1 − ᾱ) / ᾱ)."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def in_interval(interval: Interval | None, alpha_bar: float) -> bool:
    """Whether a step at ᾱ is guided: everywhere without an interval, else lo < σ <= hi."""
    if interval is None:
        return True
    return interval[0] < sigma(float(alpha_bar)) <= interval[1]


def limited(cond_fn: Callable, interval: Sequence[float] | None) -> Callable:
    """`cond_fn`, to be applied only at steps whose σ is in `interval` (None: every step)."""
    interval = check_interval(interval)
    if interval is None:
        return cond_fn

    def cond_in_interval(*args, **kwargs):
        return cond_fn(*args, **kwargs)

    cond_in_interval.interval = interval
    return cond_in_interval


def guidance_at(cond_fn: Callable | None, alpha_bar: float) -> Callable | None:
    """The guidance of a step at ᾱ: `cond_fn`, or None where its interval leaves the step out."""
    if cond_fn is None or in_interval(getattr(cond_fn, "interval", None), alpha_bar):
        return cond_fn
    return None
