"""Training state in a Ray checkpoint, and the export to the reference's file names.

A checkpoint directory holds `state.pt` (model, EMA averages, optimizer, grad scaler, step,
timestep-sampler state, all tensors and plain values, so it loads with `weights_only=True`)
and `meta.json` (step, kind, flags, config). The export writes what the reference writes:
`model%06d.pt`, `ema_<rate>_%06d.pt` (plain state dicts), `flags.json` (the model and
diffusion flags that build the model with `adm.factory` or the reference's scripts, and
nothing else) and the training data's `classes.json`; and beside each `.pt` the same state
dict as `.safetensors` (same keys, dtypes and values; the flags and classes in its metadata,
`adm.checkpoints.to_safetensors`), which loads without pickle and on its own.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import torch

from .. import storage
from ..checkpoints import SAFETENSORS_SUFFIX, to_safetensors

STATE_FILE, META_FILE, CLASSES = "state.pt", "meta.json", "classes.json"


def save_state(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a training state into a local directory that becomes a Ray checkpoint."""
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def load_state(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint directory (local), read with `weights_only=True`."""
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    with open(os.path.join(directory, META_FILE)) as f:
        return state, json.load(f)


def latest_checkpoint(run_uri: str) -> str | None:
    """URI of the run's checkpoint with the highest step, or None if it has none."""
    best, best_step = None, -1
    if not storage.exists(run_uri):
        return None
    for name in storage.listdir(run_uri):
        name = name.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_"):
            continue
        meta_uri = storage.join(run_uri, name, META_FILE)
        if not storage.exists(meta_uri):
            continue  # a checkpoint still being written, or not ours
        step = json.loads(storage.read_bytes(meta_uri))["step"]
        if step > best_step:
            best, best_step = storage.join(run_uri, name), step
    return best


def _save_tensor_file(obj: dict, uri: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue())  # atomic: readers never see half a file


def _save_state_dict(state_dict: dict[str, torch.Tensor], uri: str, flags: dict,
                     classes: list | None) -> list[str]:
    """Write one state dict as `uri` (a `.pt`) and as its `.safetensors` sibling, each
    atomically. :return: the two URIs."""
    sibling = uri.removesuffix(".pt") + SAFETENSORS_SUFFIX
    _save_tensor_file(state_dict, uri)
    storage.write_bytes(sibling, to_safetensors(state_dict, flags, classes))
    return [uri, sibling]


def export_files(state: dict[str, Any], meta: dict[str, Any], out_uri: str,
                 classes: list | None = None) -> list[str]:
    """Write `model%06d.pt`, `ema_<rate>_%06d.pt` (each with its `.safetensors` beside it,
    whose metadata records the flags and `classes`, the training data's class names when
    known) and `flags.json` for one training state.

    :return: the URIs written."""
    step = int(meta["step"])
    storage.makedirs(out_uri)
    written = _save_state_dict(state["model"], storage.join(out_uri, f"model{step:06d}.pt"),
                               meta["flags"], classes)
    for rate, ema in zip(meta["ema_rates"], state["ema"]):
        written += _save_state_dict(ema, storage.join(out_uri, f"ema_{rate}_{step:06d}.pt"),
                                    meta["flags"], classes)
    written.append(storage.join(out_uri, "flags.json"))
    storage.write_bytes(written[-1], json.dumps(meta["flags"], indent=1, sort_keys=True).encode())
    return written


def export_run(run_uri: str, out_uri: str) -> list[str]:
    """Export the latest checkpoint of a training run (`jobs/export_checkpoint.py`), with the
    training data's `classes.json` beside `flags.json` (and in the safetensors metadata) when
    the run recorded it."""
    ckpt = latest_checkpoint(run_uri)
    if ckpt is None:
        raise FileNotFoundError(f"{run_uri} holds no training checkpoint (checkpoint_*/"
                                f"{META_FILE})")
    meta = json.loads(storage.read_bytes(storage.join(ckpt, META_FILE)))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(ckpt, STATE_FILE))),
                       map_location="cpu", weights_only=True)
    classes_uri = storage.join(run_uri, CLASSES)
    classes = storage.read_bytes(classes_uri) if storage.exists(classes_uri) else None
    written = export_files(state, meta, out_uri, json.loads(classes) if classes else None)
    if classes is not None:
        written.append(storage.join(out_uri, CLASSES))
        storage.write_bytes(written[-1], classes)
    return written
