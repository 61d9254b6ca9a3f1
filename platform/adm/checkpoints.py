"""Loading any checkpoint (released or exported) the way generation, serving and evaluation
all do: where its flags come from, whether the file fits them, and building it on a worker.

A model URI is a state-dict file (local or s3://). Its flags come from the `flags.json` in the
same folder (what training exports, see `adm.train.checkpoint`), or from a released file's
preset (`adm.presets`), whose README sampling settings then serve as defaults. A
`classes.json` beside the file, when present, names the classes (for `--classes 'tench,...'`).

Every state dict the platform reads (released files, exports, `run.init_from`, the FID
Inception) goes through `read_state_dict` (`weights_only=True`) and `state_dict_mismatch`.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from typing import IO, Callable, Mapping

import torch
import torch.nn as nn

from . import factory, storage
from .config import ConfigError, UserError
from .presets import Preset, preset


class CheckpointError(UserError, ValueError):
    """A checkpoint that is refused or does not fit the model."""


def read_state_dict(path_or_file: str | IO[bytes], name: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (parameter and buffer name -> tensor), read with
    `weights_only=True` from a path, an s3:// URI or an open binary file; `name` is what the
    errors call it (default: the path, or the file's name).

    Accepts a plain state dict (the released files) or a dict holding one under "state_dict"
    / "model". A pickle that wants to build arbitrary objects (run code) is refused, and so is
    a file torch cannot read at all, each with a CheckpointError."""
    name = name or str(getattr(path_or_file, "name", path_or_file))
    if isinstance(path_or_file, str) and "://" in path_or_file:
        path_or_file = io.BytesIO(storage.read_bytes(path_or_file))
    try:
        obj = torch.load(path_or_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load checkpoint {name}: it is not a plain tensor file and loading it "
            f"would run pickled code (weights_only=True refused it: {str(e).splitlines()[0]})"
        ) from None
    except (EOFError, RuntimeError) as e:  # empty, truncated or not a torch file at all
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {name} is not a readable torch file ({reason})"
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


def load_checkpoint(model: nn.Module, path: str | IO[bytes]) -> nn.Module:
    """Load a released (or exported) checkpoint into `model`, strictly; returns the model."""
    state_dict = read_state_dict(path)
    check_state_dict(model, state_dict, f"checkpoint {getattr(path, 'name', path)}")
    model.load_state_dict(state_dict, strict=True)
    return model


@dataclass(frozen=True)
class ModelSpec:
    """One network of the run, resolved and checked: `role` is the setting that named it
    ("model", "classifier" or "upsampler"), `kind` its builder's ("diffusion", "upsampler",
    "classifier"), `flags` the guided-diffusion flags that build it, `sha256` the file's."""

    role: str
    uri: str
    kind: str
    flags: dict
    sha256: str
    preset: str | None = None
    classes: list | None = field(default=None, compare=False)

    def settings(self) -> dict:
        """What of it decides the samples (settings.json)."""
        return {"uri": self.uri, "preset": self.preset, "flags": self.flags,
                "sha256": self.sha256}


def beside(uri: str, name: str) -> str:
    """The file `name` in the folder holding `uri`."""
    if storage.is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(os.path.abspath(uri)), name)


def _preset(role: str, name: str, kind: str) -> Preset:
    try:
        p = preset(name)
    except KeyError as e:
        raise ConfigError(f"{role}_preset: {e.args[0]}") from None
    if p.kind != kind:
        raise ConfigError(f"{role}_preset: {name} is a {p.kind} preset; {role} needs a {kind}")
    return p


def _flags(role: str, uri: str, preset_name: str | None, kind: str) -> dict:
    if preset_name:
        return _preset(role, preset_name, kind).model_flags
    flags_uri = beside(uri, "flags.json")
    if not storage.is_file(flags_uri):
        raise ConfigError(f"{role}: no flags.json beside {uri}; for a released file give its "
                          f"preset (--{role.replace('_', '-')}-preset NAME)")
    flags = storage.read_json(flags_uri)
    if not isinstance(flags, dict):
        raise ConfigError(f"{role}: {flags_uri} does not hold a mapping of flags")
    return flags


def _read(role: str, uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError(f"{role}: no file at {uri}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{role}: cannot read {uri}: {e}") from None


def build(kind: str, flags: dict, role: str = "model") -> nn.Module:
    """The network of `flags` (random weights), a ConfigError naming `role` on bad flags."""
    try:
        return factory.BUILDERS[kind](flags)
    except (factory.FlagError, ValueError, TypeError) as e:
        raise ConfigError(f"{role}: its flags do not build a {kind} model: {e}") from None


def resolve(role: str, uri: str, preset_name: str | None, kind: str) -> ModelSpec:
    """Find `uri`'s flags, read the file and check that it fits them (keys and shapes), on the
    meta device (no weights allocated twice). Raises a ConfigError naming `role`."""
    if preset_name:
        _preset(role, preset_name, kind)  # an unknown preset is named before the file
    raw = _read(role, uri)  # a missing file is named before its flags
    flags = _flags(role, uri, preset_name, kind)
    try:
        state_dict = read_state_dict(io.BytesIO(raw), uri)
    except CheckpointError as e:
        raise ConfigError(f"{role}: {e}") from None
    with torch.device("meta"):
        net = build(kind, flags, role)
    try:
        check_state_dict(net, state_dict, uri)
    except CheckpointError as e:
        raise ConfigError(f"{role}: {e}") from None
    classes_uri = beside(uri, "classes.json")
    classes = storage.read_json(classes_uri) if storage.is_file(classes_uri) else None
    return ModelSpec(role, uri, kind, dict(flags), hashlib.sha256(raw).hexdigest(),
                     preset_name, classes)


def load(spec: ModelSpec, device: torch.device) -> nn.Module:
    """The network of `spec` with its weights, in eval mode on `device` (on a worker)."""
    net = build(spec.kind, spec.flags, spec.role)
    load_checkpoint(net, spec.uri)
    return net.eval().requires_grad_(False).to(device)


def num_classes(spec: ModelSpec) -> int:
    """The number of classes of a (possibly unconditional) model or classifier's flags."""
    return int(spec.flags.get("num_classes", factory.MODEL_DEFAULTS["num_classes"]))


def is_class_cond(spec: ModelSpec) -> bool:
    return spec.kind == "classifier" or bool(spec.flags.get("class_cond", False))


def image_size(spec: ModelSpec) -> int:
    """The side of the images the network makes (upsampler: large_size) or reads."""
    if spec.kind == "upsampler":
        return int(spec.flags.get("large_size", factory.SUPERRES_DEFAULTS["large_size"]))
    return int(spec.flags.get("image_size", factory.MODEL_DEFAULTS["image_size"]))


def small_size(spec: ModelSpec) -> int:
    """An upsampler's input side."""
    return int(spec.flags.get("small_size", factory.SUPERRES_DEFAULTS["small_size"]))


def check_chain(base: ModelSpec, classifier: ModelSpec | None,
                upsampler: ModelSpec | None) -> None:
    """Refuse networks that cannot work together, naming the one at fault: a classifier that
    reads another image size than the base model makes, or has other classes than a
    class-conditional base; an upsampler whose input size is not the base's output size."""
    size = image_size(base)
    if classifier is not None:
        if image_size(classifier) != size:
            raise ConfigError(f"classifier: it reads {image_size(classifier)}px images; the base "
                              f"model makes {size}px")
        if is_class_cond(base) and num_classes(classifier) != num_classes(base):
            raise ConfigError(f"classifier: it has {num_classes(classifier)} classes; the base "
                              f"model has {num_classes(base)}")
    if upsampler is not None and small_size(upsampler) != size:
        raise ConfigError(f"upsampler: its small_size is {small_size(upsampler)}; the base model "
                          f"makes {size}px images")
