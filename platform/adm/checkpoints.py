"""Loading any checkpoint (released or exported) the way generation, serving and evaluation
all do: where its flags come from, whether the file fits them, and building it on a worker.

A model URI is a state-dict file (local or s3://): a torch file (`.pt`, the released files) or
a safetensors file (`.safetensors`, which training exports beside each `.pt`). Its flags come
from, in this order: a released file's preset (`adm.presets`) when one is named, whose README
sampling settings then serve as defaults; the `flags.json` in the same folder (what training
exports, see `adm.train.checkpoint`); the "flags" entry of a safetensors file's metadata. The
class names likewise come from a `classes.json` beside the file, else the metadata's
"classes" (for `--classes 'tench,...'`); both are optional.

Every state dict the platform reads (released files, exports, `run.init_from`, the FID
Inception) goes through `read_state_dict` (`weights_only=True` for torch files; safetensors
files are never unpickled) and `state_dict_mismatch`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Mapping

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError

from . import factory, storage
from .config import ConfigError, UserError
from .presets import Preset, preset


class CheckpointError(UserError, ValueError):
    """A checkpoint that is refused or does not fit the model."""


SAFETENSORS_SUFFIX = ".safetensors"
# The metadata keys of an exported safetensors file whose values are JSON text (safetensors
# metadata maps strings to strings).
FLAGS_KEY, CLASSES_KEY = "flags", "classes"


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes start a safetensors header: a little-endian u64 length
    then the header's JSON "{". A torch zip starts "PK\\x03\\x04" and a legacy torch pickle
    "\\x80\\x02", so neither is taken for one."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def is_safetensors(name: str, head: bytes = b"") -> bool:
    """Whether a file is read as safetensors: its name ends in `.safetensors` (then it is
    never unpickled, whatever it holds), or its first bytes `head` are a safetensors header
    (a file whose name does not say, such as an S3 key without a suffix)."""
    return str(name).endswith(SAFETENSORS_SUFFIX) or looks_like_safetensors(head)


def to_safetensors(state_dict: Mapping[str, torch.Tensor], flags: Mapping | None = None,
                   classes: list | None = None) -> bytes:
    """A state dict as safetensors bytes: the same keys, dtypes and values (on the CPU), with
    the flags that build its network and the class names in the metadata, as JSON text. The
    keys' order is safetensors' own (state dicts load by name, so nothing depends on it)."""
    metadata = {"format": "pt"}  # the convention other readers (transformers, diffusers) check
    if flags is not None:
        metadata[FLAGS_KEY] = json.dumps(dict(flags), sort_keys=True)
    if classes is not None:
        metadata[CLASSES_KEY] = json.dumps(list(classes))
    # safetensors writes each tensor's own bytes: views (non-contiguous) and GPU tensors are
    # copied out first.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return safetensors.torch.save(tensors, metadata)


def _unreadable_safetensors(name: str, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {name} is not a readable safetensors file ({reason})")


def safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """The string metadata ("__metadata__") of a safetensors file's bytes, {} when it has
    none; read from the header alone (a u64 length, then that much JSON), so no tensor is
    copied. A CheckpointError naming `name` when the header is not one."""
    size = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    if not 0 <= size <= len(data) - 8:
        raise _unreadable_safetensors(name, "its header is cut short or missing")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError) as e:
        raise _unreadable_safetensors(name, f"its header is not JSON: {e}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _unreadable_safetensors(name, "its metadata is not a mapping of strings")
    return metadata


def _read_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except SafetensorError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _unreadable_safetensors(name, reason) from None


def _head(path_or_file: str | IO[bytes], size: int = 9) -> bytes:
    """The first `size` bytes of a local path or an open (seekable) file, which is left
    where it was."""
    if isinstance(path_or_file, str):
        with open(path_or_file, "rb") as f:
            return f.read(size)
    at = path_or_file.tell()
    head = path_or_file.read(size)
    path_or_file.seek(at)
    return head


def read_state_dict(path_or_file: str | IO[bytes], name: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (parameter and buffer name -> tensor, on the CPU), read from
    a path, an s3:// URI or an open binary file; `name` is what the errors call it (default:
    the path, or the file's name).

    A safetensors file (`is_safetensors`: by its name's `.safetensors`, else by its first
    bytes) is read with safetensors, which holds tensors only. Any other file is read with
    `torch.load(weights_only=True)`: a plain state dict (the released files) or a dict
    holding one under "state_dict" / "model". A pickle that wants to build arbitrary objects
    (run code) is refused, and so is a file that cannot be read at all, each with a
    CheckpointError."""
    name = name or str(getattr(path_or_file, "name", path_or_file))
    if isinstance(path_or_file, str) and "://" in path_or_file:
        path_or_file = io.BytesIO(storage.read_bytes(path_or_file))
    # (Recent torch.load reads a safetensors *path* by itself, but not an open file or bytes,
    # which is how resolve() and s3:// read; the format is told here, for every torch.)
    if is_safetensors(name, _head(path_or_file)):
        data = (storage.read_bytes(path_or_file) if isinstance(path_or_file, str)
                else path_or_file.read())
        return _read_safetensors(data, name)
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
    keys, shape mismatches, 8 of each named: missing keys and mismatches in the model's order,
    unexpected keys sorted), or "" when it fits. Keys where `skip` is true are not compared.
    `model` may live on the meta device."""
    own = {k: v for k, v in model.state_dict().items() if not skip(k)}
    given = {k: v for k, v in state_dict.items() if not skip(k)}
    missing = [k for k in own if k not in given]
    # sorted: a file's own order is not the model's (safetensors stores keys by size and
    # name), and the same extra keys read the same from a .pt and a .safetensors
    unexpected = sorted(k for k in given if k not in own)
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


def _recorded(role: str, uri: str, raw: bytes, key: str) -> Any:
    """The JSON value under `key` in the metadata of `uri` (whose bytes are `raw`) when it is
    a safetensors file that records one, else None; a ConfigError naming `role` when the
    file's header or that value cannot be read."""
    if not is_safetensors(uri, raw[:9]):
        return None
    try:
        text = safetensors_metadata(raw, uri).get(key)
    except CheckpointError as e:
        raise ConfigError(f"{role}: {e}") from None
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{role}: the {key!r} metadata of {uri} is not JSON: {e}") from None


def _flags(role: str, uri: str, preset_name: str | None, kind: str, raw: bytes) -> dict:
    """The flags of `uri`: its preset's when one is named, else its `flags.json` (which wins
    over anything the file records), else its safetensors metadata's "flags"."""
    if preset_name:
        return _preset(role, preset_name, kind).model_flags
    flags_uri = beside(uri, "flags.json")
    if storage.is_file(flags_uri):
        flags, source = storage.read_json(flags_uri), flags_uri
    else:
        flags, source = _recorded(role, uri, raw, FLAGS_KEY), f"the metadata of {uri}"
        if flags is None:
            raise ConfigError(f"{role}: no flags.json beside {uri} (nor flags in a safetensors "
                              f"file's metadata); for a released file give its preset "
                              f"(--{role.replace('_', '-')}-preset NAME)")
    if not isinstance(flags, dict):
        raise ConfigError(f"{role}: {source} does not hold a mapping of flags")
    return flags


def _classes(role: str, uri: str, raw: bytes) -> list | None:
    """The class names of `uri`: its `classes.json`, else its safetensors metadata's
    "classes", else None."""
    classes_uri = beside(uri, "classes.json")
    if storage.is_file(classes_uri):
        return storage.read_json(classes_uri)
    return _recorded(role, uri, raw, CLASSES_KEY)


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
    """Find `uri`'s flags (a `.pt` or `.safetensors` file: the preset, else `flags.json`
    beside it, else the safetensors metadata; see the module docstring), read the file and
    check that it fits them (keys and shapes), on the meta device (no weights allocated
    twice). Raises a ConfigError naming `role`."""
    if preset_name:
        _preset(role, preset_name, kind)  # an unknown preset is named before the file
    raw = _read(role, uri)  # a missing file is named before its flags
    flags = _flags(role, uri, preset_name, kind, raw)
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
    classes = _classes(role, uri, raw)
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
