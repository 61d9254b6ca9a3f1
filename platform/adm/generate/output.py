"""The files of a sampling run under `--out` (local or s3://), all written atomically:

    settings.json         everything that decided the samples, plus how the run was executed
    shards/shard-K.npz    samples K*S .. K*S+S-1 (S = shard_size): `index`, `label`, `image`
                          (uint8 NHWC) and, for a chained run, `base` (the stage-1 images)
    samples.npz           the ADM evaluator's file: arr_0 uint8 NHWC, arr_1 int64 labels,
                          exactly N in index order (written last: its presence = finished)
    base_samples.npz      a chained run's stage-1 images, same layout (an upsampler's input)
    grid.png              the first 64 samples, 8 per row

`.npz` files are byte-reproducible (see `npz_bytes`), so a resumed run's `samples.npz` equals an
uninterrupted run's byte for byte. The final merge streams: it holds one shard at a time, never
the N images (50,000 at 512 px are 39 GB), and writes S3 files as multipart uploads.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import zipfile

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
    """A PNG of up to 64 uint8 NHWC images, `columns` per row; images under 32 px are scaled
    up (nearest neighbour, by a whole factor) so that a grid of 8 px samples can be seen."""
    images = images[:64]
    n, h, w, c = images.shape
    factor = max(1, 32 // max(h, w))
    if factor > 1:
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
        h, w = h * factor, w * factor
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


class NpzWriter:
    """An ADM `.npz` written as its images arrive, in order, into the binary stream `f`:
    `arr_0` [N, H, W, C] uint8 (N known up front), then, at `finish`, `arr_1` [N] int64
    labels. The bytes are what `npz_bytes` (numpy.savez) gives for the same arrays when `f` is
    seekable; into a stream that is not (an S3 upload) the zip entries carry their sizes after
    the data instead, which numpy.load and zipfile read the same way."""

    def __init__(self, f, shape: tuple[int, ...]):
        self.shape, self.written = tuple(shape), 0
        self.zip = zipfile.ZipFile(f, "w", zipfile.ZIP_STORED)
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)  # as numpy.savez
        np.lib.format.write_array_header_1_0(self.entry, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False, "shape": self.shape})

    def add(self, images: np.ndarray) -> None:
        """Append [n, H, W, C] uint8 images."""
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"images {images.dtype} {images.shape[1:]}: expected uint8 "
                             f"{self.shape[1:]}")
        if self.written + len(images) > self.shape[0]:
            raise ValueError(f"{self.written + len(images)} images for an array of "
                             f"{self.shape[0]}")
        self.entry.write(np.ascontiguousarray(images).reshape(-1).data)  # flat: len() = bytes
        self.written += len(images)

    def finish(self, labels: np.ndarray) -> None:
        """Close `arr_0` (which must hold all N images) and write `arr_1`."""
        if self.written != self.shape[0]:
            raise ValueError(f"{self.written} images written of {self.shape[0]}")
        self.entry.close()
        with self.zip.open("arr_1.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array(entry, np.asarray(labels, dtype=np.int64))
        self.zip.close()

    def discard(self) -> None:
        """Drop the half-written zip quietly (its stream is being discarded too)."""
        try:
            self.entry.close()
            self.zip.close()
        except (OSError, ValueError):
            pass


def merge(out: str, num_samples: int, shard_size: int, chained: bool) -> None:
    """Stream every shard, in order, into samples.npz (and base_samples.npz for a chained run),
    checking that they hold each index 0..N-1 exactly once, and write grid.png. One shard is
    in memory at a time. Each file appears whole or not at all, and samples.npz (whose
    presence means "finished") last."""
    count = len(shard_ranges(num_samples, shard_size))
    first = read_npz(shard_uri(out, 0))
    names = [("image", SAMPLES)] + ([("base", BASE_SAMPLES)] if chained else [])
    with contextlib.ExitStack() as files:
        writers = {}
        for column, name in names:
            # Entered first, closed (made visible) last: samples.npz.
            f = files.enter_context(storage.open_output(storage.join(out, name)))
            writers[column] = NpzWriter(f, (num_samples, *first[column].shape[1:]))
        # Writers left open by an error would complain when collected: close them first.
        files.callback(lambda: [w.discard() for w in writers.values() if w.zip.fp])
        labels, grid = [], first["image"][:64]
        for k in range(count):
            part = first if k == 0 else read_npz(shard_uri(out, k))
            expected = shard_ranges(num_samples, shard_size)[k]
            if not np.array_equal(part["index"], np.arange(expected.start, expected.stop)):
                raise RuntimeError(f"{shard_uri(out, k)}: does not hold indices "
                                   f"{expected.start}..{expected.stop - 1} once each")
            labels.append(part["label"].astype(np.int64))
            for column, _ in names:
                writers[column].add(part[column])
            if len(grid) < 64 and k > 0:
                grid = np.concatenate([grid, part["image"][:64 - len(grid)]])
        for column, _ in names:
            writers[column].finish(np.concatenate(labels))
        storage.write_bytes(storage.join(out, GRID), grid_png(grid))


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
    key = _first_difference(want.get("settings"), have.get("settings"))
    where = None if key is None else f"settings.{key}"
    if key is None:
        key = where = _first_difference(want, have)
    if key is not None:
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
