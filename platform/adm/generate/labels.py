"""Sample labels from (seed, index) alone, like every other random number of a sample.

`--classes` is "uniform" (each index draws a class uniformly), "balanced" (index i gets class
i mod K: equal counts, in order) or a comma list of class ids or, with a `classes.json` beside
the model, class names ("3,7,9", "tench,goldfish"): each index draws one of them uniformly.
"""
from __future__ import annotations

import numpy as np

from ..config import ConfigError
from ..diffusion.seeds import index_seeds

MODES = ("uniform", "balanced")


def parse_classes(spec: str, num_classes: int, names: list | None = None) -> str | list[int]:
    """`spec` checked against the model's `num_classes` (and class `names`, when known):
    a mode name, or the sorted-as-given list of class ids. ConfigError names the setting."""
    spec = str(spec).strip()
    if spec in MODES:
        return spec
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item.lstrip("-").isdigit():
            cls = int(item)
        elif names and item in names:
            cls = names.index(item)
        else:
            raise ConfigError(f"classes: {item!r} is not a class id"
                              + (" or a name in classes.json" if names else "")
                              + f" (expected uniform, balanced or ids in 0..{num_classes - 1})")
        if not 0 <= cls < num_classes:
            raise ConfigError(f"classes: the model has no class {cls} "
                              f"(it has {num_classes}: 0..{num_classes - 1})")
        out.append(cls)
    return out


def labels_for(indices, seed: int, classes: str | list[int], num_classes: int) -> np.ndarray:
    """[n] int64 labels of sample `indices` [n] of a run seeded with `seed`: each from
    (seed, index) alone (its "label" stream), so it does not depend on the batching."""
    indices = np.asarray(indices, dtype=np.int64)
    if classes == "balanced":
        return indices % num_classes
    words = np.array(index_seeds(seed, indices, "label"), dtype=np.uint64)
    if classes == "uniform":
        return (words % np.uint64(num_classes)).astype(np.int64)
    choices = np.asarray(classes, dtype=np.int64)
    return choices[(words % np.uint64(len(choices))).astype(np.int64)]
