"""Data: shard writing, Ray Data pipelines and the reference's preprocessing.

The names users know from guided-diffusion's image_datasets.py are here, with its
signatures: ``center_crop_arr``, ``random_crop_arr``, ``superres_low_res``; plus the dataset builders ``image_dataset`` and
``superres_dataset`` and their ``DataConfig``. Importing this package does not import Ray Data;
the builders load it on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adm.data.config import DataConfig
from adm.data.preprocess import (
    BadImageError,
    center_crop_arr,
    decode_image,
    random_crop_arr,
    superres_low_res,
    to_model_range,
)

if TYPE_CHECKING:  # pragma: no cover
    from adm.data.datasets import (  # noqa: F401
        image_dataset,
        superres_dataset,
        train_data_config,
    )

_LAZY = {"image_dataset", "superres_dataset", "train_data_config"}

__all__ = [
    "BadImageError",
    "DataConfig",
    "center_crop_arr",
    "decode_image",
    "image_dataset",
    "random_crop_arr",
    "superres_dataset",
    "superres_low_res",
    "to_model_range",
    "train_data_config",
]


def __getattr__(name: str) -> Any:
    # The Ray Data pipelines import ray.data (slow, ~1 s); the preprocessing functions are used
    # on their own (sampling, evaluation) and should not pay for it.
    if name in _LAZY:
        from adm.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'adm.data' has no attribute {name!r}")
