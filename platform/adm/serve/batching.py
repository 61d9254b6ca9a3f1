"""How one `@serve.batch` call of concurrent requests becomes model calls (no Ray here).

Requests whose sampling settings are equal (same sampler, steps, guidance scale, ...) share
model calls; a batch holding several settings runs one group after the other. Each group's
rows run in calls of exactly `rows` rows, the last one padded with copies of its last row
(dropped after), so every model call has the same shape. With per-image seeds (`index_seeds`)
that makes an image depend on its seed and settings alone, not on what else was batched with
it: the same request gives the same bytes alone or in a crowd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Job:
    """One request's rows for one stage.

    `args` are the `adm.diffusion.sample` keywords as sorted (name, value) pairs (the batching
    key); `labels` [n] int64 class ids; `seeds` n per-image generator seeds; `low_res`
    [n, h, w, 3] uint8 base images for the upsampler stage, else None."""

    args: tuple
    labels: np.ndarray
    seeds: tuple
    low_res: np.ndarray | None = None

    @classmethod
    def make(cls, args: dict, labels, seeds, low_res: np.ndarray | None = None) -> "Job":
        return cls(tuple(sorted(args.items())), np.asarray(labels, dtype=np.int64).reshape(-1),
                   tuple(int(s) for s in seeds), low_res)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Output:
    """A job's images [n, H, W, 3] uint8, and the batch that made them: how many requests and
    images the `@serve.batch` call held, and in how many settings groups."""

    images: np.ndarray
    batch_requests: int
    batch_images: int
    groups: int


# call(args, labels [rows], seeds (rows), low_res [rows, h, w, 3] | None) -> [rows, H, W, 3]
ModelCall = Callable[[dict, np.ndarray, list, "np.ndarray | None"], np.ndarray]


def group_by_args(jobs: list[Job]) -> dict[tuple, list[int]]:
    """Job indices by sampling settings, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.args, []).append(i)
    return groups


def _run_group(jobs: list[Job], call: ModelCall, rows: int) -> list[np.ndarray]:
    """The images of jobs that share settings, in model calls of exactly `rows` rows."""
    args = dict(jobs[0].args)
    labels = np.concatenate([j.labels for j in jobs])
    seeds = [s for j in jobs for s in j.seeds]
    low = np.concatenate([j.low_res for j in jobs]) if jobs[0].low_res is not None else None
    out = []
    for start in range(0, len(labels), rows):
        n = min(rows, len(labels) - start)
        pad = start + np.r_[np.arange(n), np.full(rows - n, n - 1)]  # repeat the last row
        images = call(args, labels[pad], [seeds[i] for i in pad],
                      low[pad] if low is not None else None)
        out.append(images[:n])
    images = np.concatenate(out)
    bounds = np.cumsum([0] + [len(j) for j in jobs])
    return [images[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def run_batch(jobs: list[Job], call: ModelCall, rows: int) -> list[Output]:
    """Every job's images (in job order), grouped by settings into padded model calls."""
    groups = group_by_args(jobs)
    images: list[np.ndarray | None] = [None] * len(jobs)
    for idx in groups.values():
        for i, im in zip(idx, _run_group([jobs[i] for i in idx], call, rows)):
            images[i] = im
    total = sum(len(j) for j in jobs)
    return [Output(im, len(jobs), total, len(groups)) for im in images]
