"""Deep-feature reuse between sampling steps (DeepCache, Ma et al., CVPR 2024).

A U-Net's deep features change slowly from one step to the next. With `cache_interval` k, a
sampling loop runs the full network at its calls 0, k, 2k, ... and in between only the shallow
blocks (the first `cache_depth` encoder blocks and their decoder partners, with fresh skips),
starting the decoder's shallow part from the deep features of the last full call
(`UNet.forward`'s `cache_depth` / `deep`). k = 1 is the plain network, bit for bit.

The cache belongs to one loop over one batch, so each row's features are its own: a row's
calls are full or shallow by its own call count, whatever else is in the batch (the step
engine keeps a row's features with the row: `adm.diffusion.rows`). Only the denoiser is cached;
the classifier's guidance gradient is computed afresh at every guided step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

MAX_CACHE_INTERVAL = 10  # beyond this the reused features are too stale to be worth offering


def check_cache_interval(cache_interval: int) -> int:
    """cache_interval as an int in [1, MAX_CACHE_INTERVAL], or a ValueError naming it."""
    if isinstance(cache_interval, bool) or int(cache_interval) != cache_interval or not (
            1 <= cache_interval <= MAX_CACHE_INTERVAL):
        raise ValueError(f"cache_interval={cache_interval!r}: an integer from 1 (off) to "
                         f"{MAX_CACHE_INTERVAL}")
    return int(cache_interval)


def cache_depth_of(model: nn.Module, cache_depth: int | None = None) -> int:
    """The depth at which `model` (an ADM U-Net, possibly wrapped by torch.compile) is split:
    `cache_depth`, else the model's default (its full-resolution blocks: `UNet.cache_depth`).
    A ValueError if the model cannot reuse deep features."""
    inner = getattr(model, "_orig_mod", model)
    default = getattr(inner, "cache_depth", None)
    if default is None:
        raise ValueError(f"cache_interval > 1 needs a U-Net that can reuse its deep features "
                         f"(adm.models.UNet); got {type(inner).__name__}")
    depth = default if cache_depth is None else int(cache_depth)
    blocks = len(inner.input_blocks)
    if not 1 <= depth <= blocks:
        raise ValueError(f"cache_depth={cache_depth}: 1 to {blocks} (the encoder's blocks)")
    return depth


def is_full_call(calls: int, cache_interval: int) -> bool:
    """Whether a loop's call number `calls` (0-based) runs the full network."""
    return calls % cache_interval == 0


class DeepCache:
    """`model(x, t, **kwargs)` for one sampling loop with deep-feature reuse: call i runs the
    full network when i % cache_interval == 0 (keeping its deep features), else the shallow
    blocks on the kept ones. Returns what the model returns without caching ([N, C', H, W]).

    :param model: an ADM U-Net (or torch.compile of one; its two call shapes compile once each).
    :param cache_interval: k >= 2 (1 would be the plain model: don't wrap it).
    :param cache_depth: encoder blocks kept in the shallow calls (None: the model's default).
    """

    def __init__(self, model: nn.Module, cache_interval: int, cache_depth: int | None = None):
        self.model, self.interval = model, check_cache_interval(cache_interval)
        self.depth = cache_depth_of(model, cache_depth)
        self.calls = 0
        self.deep: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        full = is_full_call(self.calls, self.interval)
        out, self.deep = self.model(x, t, cache_depth=self.depth,
                                    deep=None if full else self.deep, **kwargs)
        self.calls += 1
        return out
