"""The files of a sampling run under `--out` (local or s3://), all written atomically:

    settings.json         everything that decided the samples, plus how the run was executed
    shards/shard-K.npz    samples K*S .. K*S+S-1 (S = shard_size): `index`, `label`, `image`
                          (uint8 NHWC) and, for a chained run, `base` (the stage-1 images)
    samples.npz           the ADM evaluator's file: arr_0 uint8 NHWC, arr_1 int64 labels,
                          exactly N in index order (written last: its presence = finished)
    base_samples.npz      a chained run's stage-1 images, same layout (an upsampler's input)
    grid.png              the first 64 samples, 8 per row

`.npz` files are byte-reproducible (see `npz_bytes`), so a resumed run's `samples.npz` equals an
uninterrupted run's byte for byte.
"""
from __future__ import annotations

import io
import json
import math
import re

import numpy as np
from PIL import Image

from .. import storage
from ..config import ConfigError

SETTINGS, SAMPLES, BASE_SAMPLES, GRID, SHARDS = (
    "settings.json", "samples.npz", "base_samples.npz", "grid.png", "shards")
_SHARD = re.compile(r"^shard-(\d{6})\.npz$")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An `.npz` of `arrays` (`numpy.savez`): the same bytes for the same arrays, since its
    zip entries carry the zip format's default timestamp, not the time of writing."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.ascontiguousarray(arr) for name, arr in arrays.items()})
    return buf.getvalue()


def read_npz(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def shard_uri(out: str, k: int) -> str:
    return storage.join(out, SHARDS, f"shard-{k:06d}.npz")


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """The index range of each shard: shard k holds k*S .. min((k+1)*S, N) - 1."""
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def finished_shards(out: str) -> set[int]:
    """Numbers of the shards already written under `out` (temporary files do not count)."""
    folder = storage.join(out, SHARDS)
    if not storage.is_dir(folder):
        return set()
    return {int(m.group(1)) for name in storage.listdir(folder) if (m := _SHARD.match(name))}


def write_shard(out: str, k: int, rows: dict[str, np.ndarray]) -> None:
    """Write shard k atomically: `rows` holds index [n], label [n], image [n, H, W, 3] (and
    base), in index order."""
    storage.write_bytes(shard_uri(out, k), npz_bytes(rows))


def grid_png(images: np.ndarray, columns: int = 8) -> bytes:
    """A PNG of up to 64 uint8 NHWC images, `columns` per row."""
    images = images[:64]
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def merge(out: str, num_samples: int, shard_size: int, chained: bool) -> dict[str, np.ndarray]:
    """Read every shard, check that they hold each index 0..N-1 exactly once, and write
    base_samples.npz (chained runs), grid.png and, last, samples.npz. Returns samples.npz's
    arrays."""
    parts = [read_npz(shard_uri(out, k))
             for k in range(len(shard_ranges(num_samples, shard_size)))]
    index = np.concatenate([p["index"] for p in parts])
    if not np.array_equal(index, np.arange(num_samples)):
        raise RuntimeError(f"{out}: the shards do not hold indices 0..{num_samples - 1} once each")
    labels = np.concatenate([p["label"] for p in parts]).astype(np.int64)
    images = np.concatenate([p["image"] for p in parts])
    if chained:
        base = np.concatenate([p["base"] for p in parts])
        storage.write_bytes(storage.join(out, BASE_SAMPLES),
                            npz_bytes({"arr_0": base, "arr_1": labels}))
    storage.write_bytes(storage.join(out, GRID), grid_png(images))
    arrays = {"arr_0": images, "arr_1": labels}
    storage.write_bytes(storage.join(out, SAMPLES), npz_bytes(arrays))
    return arrays


def _first_difference(want, have, where: str = "") -> str | None:
    """The dotted name of the first setting where `want` and `have` differ, or None."""
    if isinstance(want, dict) and isinstance(have, dict):
        for key in sorted(set(want) | set(have)):
            found = _first_difference(want.get(key), have.get(key), f"{where}.{key}" if where
                                      else key)
            if found:
                return found
        return None
    return None if want == have else where


def check_settings(out: str, decisive: dict) -> bool:
    """Compare this run's sample-deciding settings with those recorded under `out`.

    Returns False for a fresh `out`, True when they match (a resume); raises a ConfigError
    naming the first setting that differs otherwise."""
    uri = storage.join(out, SETTINGS)
    if not storage.is_file(uri):
        return False
    have = storage.read_json(uri).get("decisive", {})
    want = json.loads(json.dumps(decisive))  # tuples -> lists, as read back
    # The user's own settings first (named as they spell them), then what they resolved to
    # (a preset's defaults, a model file's flags or checksum).
    key = (_first_difference(want.get("settings"), have.get("settings"))
           or _first_difference(want, have))
    if key is not None:
        where = key if key in want or key in have else f"settings.{key}"
        theirs, ours = _lookup(have, where), _lookup(want, where)
        raise ConfigError(f"{key}: {out} holds a run with {key}={theirs!r}; this run has "
                          f"{ours!r}. Use another --out, or the same settings to resume it")
    return True


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def write_settings(out: str, decisive: dict, execution: dict) -> None:
    storage.write_json(storage.join(out, SETTINGS), {"decisive": decisive,
                                                     "execution": execution})


def is_finished(out: str) -> bool:
    """True when `out` holds a finished run (samples.npz is written last)."""
    return storage.is_file(storage.join(out, SAMPLES))
