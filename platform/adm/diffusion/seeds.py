"""Per-sample noise streams: a sample's randomness from its own seed, not from its batch.

`sample(..., seeds=[...])` gives row i its own `torch.Generator` seeded with seeds[i] (a
`RowNoise`, the samplers' `noise_fn`): x_T and every step's noise of that row come from it, so
a sample depends on its seed alone, not on the batch it was drawn in, its position there, or
the batch size (given kernels that are themselves batch-invariant). `index_seeds(seed, indices)`
derives such seeds from a run's seed and the samples' indices, which is what large-scale
generation uses.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Stream names for `index_seeds`: one independent stream per use of a sample's randomness.
STREAMS = {"base": 0, "upsampler": 1, "label": 2}


def index_seeds(seed: int, indices: Sequence[int] | np.ndarray | torch.Tensor,
                stream: str | int = "base") -> list[int]:
    """Per-sample 64-bit generator seeds: sample `indices[k]` of a run seeded with `seed` gets
    `SeedSequence([seed, stream, index])`'s first word, so streams of neighbouring indices (and
    of one index's stages) are statistically independent, not just offset by one.

    :param indices: [N] non-negative ints (a list, numpy array or int tensor).
    :param stream: a name in STREAMS (or its number): keeps e.g. the base model's and the
        upsampler's noise of one sample apart.
    """
    stream = STREAMS[stream] if isinstance(stream, str) else int(stream)
    return [int(np.random.SeedSequence([int(seed), stream, int(i)]).generate_state(1, np.uint64)[0])
            for i in np.asarray(indices, dtype=np.int64).reshape(-1)]


class RowNoise:
    """Standard normal noise with one `torch.Generator` per batch row.

    Row i of every draw comes from generator i (seeded with seeds[i]) alone, so it is the same
    whatever else is in the batch. Each draw is one `normal_` launch per row into a batch-sized
    buffer (no host-device sync; measured cost in benchmarks/generate.py). Floating-point
    identity of whole samples across batch sizes also needs batch-invariant network kernels:
    CPU MKL sgemm, for one, rounds rows differently for very small batches (< ~6 rows).
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, shape: Sequence[int],
                 device: torch.device | str):
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if len(seeds) != shape[0]:
            raise ValueError(f"seeds: {len(seeds)} seeds for a batch of {shape[0]}")
        self.shape, self.device = tuple(shape), torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __call__(self) -> torch.Tensor:
        """One draw: [N, C, H, W] float32, row i from generator i."""
        out = torch.empty(self.shape, device=self.device)
        for row, g in zip(out, self.generators):
            row.normal_(generator=g)
        return out
