"""Loading any checkpoint (released or exported) the way generation, serving and evaluation
all do: where its flags come from, whether the file fits them, building it on a worker, and the
conversions between the networks' [-1, 1] tensors and uint8 images.

A model URI is a state-dict file (local or s3://). Its flags come from the `flags.json` in the
same folder (what training exports, see `adm.train.checkpoint`), or from a released file's
preset (`adm.presets`), whose README sampling settings then serve as defaults. A
`classes.json` beside the file, when present, names the classes (for `--classes 'tench,...'`).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import factory, storage
from .compat import openai
from .config import ConfigError
from .presets import Preset, preset

# Precision setting -> the dtype the networks run under autocast (None: float32 throughout).
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

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
        state_dict = openai.read_state_dict(io.BytesIO(raw))
    except openai.CheckpointError as e:
        raise ConfigError(f"{role}: {e}") from None
    with torch.device("meta"):
        net = build(kind, flags, role)
    try:
        openai.check_state_dict(net, state_dict, f"{uri}")
    except openai.CheckpointError as e:
        raise ConfigError(f"{role}: {e}") from None
    classes_uri = beside(uri, "classes.json")
    classes = storage.read_json(classes_uri) if storage.is_file(classes_uri) else None
    return ModelSpec(role, uri, kind, dict(flags), hashlib.sha256(raw).hexdigest(),
                     preset_name, classes)


def load(spec: ModelSpec, device: torch.device) -> nn.Module:
    """The network of `spec` with its weights, in eval mode on `device` (on a worker)."""
    net = build(spec.kind, spec.flags, spec.role)
    openai.load_checkpoint(net, spec.uri)
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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8, as the reference's sample scripts do."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, device) -> torch.Tensor:
    """[N, H, W, C] uint8 -> [N, C, H, W] float32 in [-1, 1] (the reference's base samples)."""
    x = torch.from_numpy(np.array(images)).to(device)  # a writable copy (Ray blocks are not)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1
