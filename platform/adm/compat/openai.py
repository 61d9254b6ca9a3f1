"""Released guided-diffusion checkpoints, loaded as they are: plain state dicts read with
`weights_only=True` and checked key by key against the model built from their flags.

The builders that take guided-diffusion's flag names live in `adm.factory`; they are re-exported
here so that the reference-shaped ``from adm.compat import openai; openai.create_model(flags)``
keeps working.
"""
from __future__ import annotations

import io
import pickle
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ..config import UserError
from ..factory import (  # noqa: F401 - the guided-diffusion-shaped API, re-exported
    ALL_DEFAULTS, CLASSIFIER_DEFAULTS, DIFFUSION_DEFAULTS, MODEL_DEFAULTS, SCRIPT_DEFAULTS,
    SUPERRES_DEFAULTS, FlagError, create_classifier, create_diffusion, create_model,
    create_superres_model, format_flags, parse_flags)


class CheckpointError(UserError, ValueError):
    """A checkpoint that is refused or does not fit the model."""


def read_state_dict(path_or_file) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, read with `weights_only=True`.

    Accepts a plain state dict (the released files) or a dict holding one under "state_dict"
    / "model". A pickle that wants to build arbitrary objects (run code) is refused."""
    name = getattr(path_or_file, "name", path_or_file)
    if isinstance(path_or_file, str) and "://" in path_or_file:
        from .. import storage  # s3:// and other URIs go through the one storage module

        path_or_file = io.BytesIO(storage.read_bytes(path_or_file))
    try:
        obj = torch.load(path_or_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load checkpoint {name}: it is not a plain tensor file and loading it "
            f"would run pickled code (weights_only=True refused it: {str(e).splitlines()[0]})"
        ) from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {name} does not hold a state dict of tensors")
    return obj


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        skip: Callable[[str], bool] = lambda key: False) -> str:
    """What keeps `state_dict` from loading strictly into `model` (missing keys, unexpected
    keys, shape mismatches, 8 of each named), or "" when it fits. Keys where `skip` is true are
    not compared. `model` may live on the meta device."""
    own = {k: v for k, v in model.state_dict().items() if not skip(k)}
    given = {k: v for k, v in state_dict.items() if not skip(k)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in given and given[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:8])}{more}")
    return "; ".join(problems)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     name: str = "checkpoint") -> None:
    """Raise a CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise CheckpointError(f"{name} does not fit {type(model).__name__} built from these "
                              f"flags: {problems}")


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a released (or exported) checkpoint into `model`, strictly; returns the model."""
    state_dict = read_state_dict(path)
    check_state_dict(model, state_dict, f"checkpoint {getattr(path, 'name', path)}")
    model.load_state_dict(state_dict, strict=True)
    return model
