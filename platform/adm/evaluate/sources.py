"""What `jobs/evaluate.py` compares: four kinds of image sets, checked before any feature is
computed, and read in chunks by the feature workers (each worker reads its own images, from a
local path or s3://, so the driver never holds the images).

* ``npz``: an ADM evaluator batch, ``arr_0`` uint8 [N, H, W, 3] (``arr_1`` labels optional; a
  reference batch may carry ``mu``, ``sigma``, ``mu_s``, ``sigma_s``: Inception statistics the
  evaluator uses instead of computing them). Rows are read straight out of the zip member,
  never the whole array.
* ``samples``: a folder written by ``jobs/sample.py``: its ``samples.npz``.
* ``shards``: a prepared dataset (``adm.data``): a split folder with ``manifest.json``, or a
  dataset root (its ``train`` split). Images are decoded and centre-cropped to ``image_size``
  with the reference's ``center_crop_arr``, as the evaluator's reference batches were made.
* ``images``: a folder of image files (searched recursively, sorted by path), no labels;
  decoded and centre-cropped like shards.

Features are cached beside the input (``cache_uri``), keyed by the feature network and, for
decoded kinds, the crop size; the cache records the input's ``fingerprint`` (file size and
modification time, the manifest's checksums, or the file list) and is recomputed when it
changes.
"""
from __future__ import annotations

import hashlib
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .. import storage
from ..config import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
SAMPLES_FILE = "samples.npz"


@dataclass(frozen=True)
class Chunk:
    """Rows ``start``..``stop``-1 of a source; for shards, all within shard ``part``."""

    start: int
    stop: int
    part: int = 0
    offset: int = 0  # first row of the chunk inside that shard


@dataclass(frozen=True)
class ImageSource:
    """One image set, checked: ``kind`` (see the module doc), ``uri`` as given, ``data_uri``
    (the .npz, split folder or image folder read), ``num_images``, ``image_shape`` (H, W, C:
    as stored for npz, the crop for decoded kinds), ``labels`` int64 [N] or None,
    ``stats`` (the npz's precomputed Inception statistics) and the cache's key parts."""

    uri: str
    kind: str
    data_uri: str
    num_images: int
    image_shape: tuple[int, int, int]
    labels: np.ndarray | None = field(repr=False, compare=False)
    stats: dict | None = field(default=None, repr=False, compare=False)
    fingerprint: str = ""
    parts: tuple = ()  # shard URIs with their row counts, or image file URIs

    @property
    def decoded(self) -> bool:
        """Images that are decoded and cropped (shards, image folders), not stored arrays."""
        return self.kind in ("shards", "images")

    def describe(self) -> dict:
        """What was compared (the JSON report)."""
        return {"uri": self.uri, "kind": self.kind, "read": self.data_uri,
                "num_images": self.num_images, "image_shape": list(self.image_shape),
                "labels": self.labels is not None,
                "precomputed_statistics": sorted(self.stats) if self.stats else []}

    def chunks(self, rows: int) -> list[Chunk]:
        """Chunks of at most ``rows`` rows covering the set in order (shards: never across
        a shard boundary, so a worker reads one shard file per chunk)."""
        if self.kind != "shards":
            return [Chunk(s, min(s + rows, self.num_images))
                    for s in range(0, self.num_images, rows)]
        out, start = [], 0
        for part, (_, count) in enumerate(self.parts):
            out += [Chunk(start + o, start + min(o + rows, count), part, o)
                    for o in range(0, count, rows)]
            start += count
        return out


# ----------------------------------------------------------------------------------- npz
def _npy_header(member) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise InputError(f"unsupported .npy format version {version}")
    return read(member)


def _npz_member(z: zipfile.ZipFile, uri: str, name: str):
    if f"{name}.npy" not in z.namelist():
        raise InputError(f"{uri}: no {name} in the .npz (it has {sorted(z.namelist())}); an "
                         f"ADM sample batch keeps its images in arr_0, uint8 [N, H, W, 3]")
    return z.open(f"{name}.npy")


def _open_zip(uri: str):
    try:
        f = storage.open_input(uri)
    except FileNotFoundError:
        raise InputError(f"no file at {uri}") from None
    try:
        return f, zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        f.close()
        raise InputError(f"{uri} is not an .npz file (not a zip archive)") from None


def _file_fingerprint(uri: str) -> str:
    """Size and version of a file: its S3 ETag (S3 times have one-second resolution), else
    its modification time in nanoseconds."""
    if storage.is_s3(uri):
        bucket, key = uri[len(storage.S3_SCHEME):].split("/", 1)
        head = storage.s3_client().head_object(Bucket=bucket, Key=key)
        return f"{head['ContentLength']}:{head['ETag']}"
    info = os.stat(uri)
    return f"{info.st_size}:{info.st_mtime_ns}"


def _open_npz(uri: str, kind: str, given: str) -> ImageSource:
    f, z = _open_zip(uri)
    with f, z:
        with _npz_member(z, uri, "arr_0") as m:
            shape, fortran, dtype = _npy_header(m)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise InputError(
                f"{uri}: arr_0 is {dtype} {list(shape)}{' (Fortran order)' if fortran else ''}; "
                "expected uint8 [N, H, W, 3] (NHWC RGB, C order), as the ADM evaluator reads")
        if min(shape[1:3]) < 1:
            raise InputError(f"{uri}: arr_0 holds empty images {list(shape)}")
        names = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
        labels = stats = None
        if "arr_1" in names:
            with z.open("arr_1.npy") as m:
                labels = np.lib.format.read_array(m, allow_pickle=False).astype(np.int64)
            if labels.shape != (shape[0],):
                raise InputError(f"{uri}: arr_1 (labels) has shape {list(labels.shape)}, "
                                 f"expected [{shape[0]}]")
        present = [k for k in STATS_KEYS if k in names]
        if present:
            if len(present) != len(STATS_KEYS):
                raise InputError(f"{uri}: has {present} but not all of {list(STATS_KEYS)}")
            stats = {}
            for k in STATS_KEYS:
                with z.open(f"{k}.npy") as m:
                    stats[k] = np.lib.format.read_array(m, allow_pickle=False).astype(np.float64)
    return ImageSource(given, kind, uri, int(shape[0]), tuple(int(s) for s in shape[1:]),
                       labels, stats, _file_fingerprint(uri))


def read_npz_rows(uri: str, start: int, stop: int) -> np.ndarray:
    """arr_0[start:stop] (uint8 NHWC), read from the zip member without loading the rest."""
    f, z = _open_zip(uri)
    with f, z, _npz_member(z, uri, "arr_0") as m:
        shape, _, dtype = _npy_header(m)
        row = dtype.itemsize * math.prod(shape[1:])
        m.seek(m.tell() + start * row)
        data = m.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))


# -------------------------------------------------------------------------- decoded kinds
def _first_size(data: bytes, uri: str) -> int:
    from ..data.preprocess import BadImageError, read_info

    try:
        info = read_info(data)
    except BadImageError as e:
        raise InputError(f"{uri}: {e.reason}") from None
    return min(info.width, info.height)


def _open_shards(uri: str, image_size: int | None, given: str) -> ImageSource:
    import pyarrow.parquet as pq

    from ..data.manifest import load_split

    info = load_split(uri)
    counts = [int(s["rows"]) for s in info.manifest["shards"]]
    labels = []
    for shard in info.shard_uris:  # the label column alone: a few bytes per row
        with storage.open_input(shard) as f:
            labels.append(pq.read_table(f, columns=["label"]).column("label").to_numpy())
    labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    if image_size is None:
        with storage.open_input(info.shard_uris[0]) as f:
            first = pq.ParquetFile(f).read_row_group(0, columns=["image"]).column("image")[0]
        image_size = _first_size(first.as_py(), info.shard_uris[0])
    digest = hashlib.sha256(storage.read_bytes(storage.join(info.root, "manifest.json")))
    return ImageSource(given, "shards", info.root, int(sum(counts)),
                       (image_size, image_size, 3), labels, None,
                       digest.hexdigest()[:32], tuple(zip(info.shard_uris, counts)))


def _open_images(uri: str, image_size: int | None, given: str) -> ImageSource:
    files = [e for e in storage.list_files(uri)
             if e.relpath.lower().endswith(IMAGE_EXTENSIONS)
             and not any(p.startswith(".") for p in e.relpath.split("/"))]
    if not files:
        raise InputError(f"{uri}: a folder without samples.npz, manifest.json or image files "
                         f"({', '.join(IMAGE_EXTENSIONS)}); nothing to evaluate")
    uris = tuple(storage.join(uri, e.relpath) for e in files)
    if image_size is None:
        image_size = _first_size(storage.read_bytes(uris[0]), uris[0])
    digest = hashlib.sha256("\n".join(f"{e.relpath}:{e.size}" for e in files).encode())
    return ImageSource(given, "images", uri, len(files), (image_size, image_size, 3), None,
                       None, digest.hexdigest()[:32], uris)


def _decode_crop(data: bytes, image_size: int, where: str) -> np.ndarray:
    from ..data.preprocess import BadImageError, center_crop_arr, decode_image

    try:
        return center_crop_arr(decode_image(data), image_size)
    except BadImageError as e:
        raise InputError(f"{where}: {e.reason}") from None


def read_rows(source: ImageSource, chunk: Chunk) -> np.ndarray:
    """The chunk's images, uint8 [n, H, W, 3] (on a worker)."""
    if not source.decoded:
        return read_npz_rows(source.data_uri, chunk.start, chunk.stop)
    size = source.image_shape[0]
    if source.kind == "images":
        return np.stack([_decode_crop(storage.read_bytes(u), size, u)
                         for u in source.parts[chunk.start:chunk.stop]])
    import pyarrow.parquet as pq

    shard = source.parts[chunk.part][0]
    with storage.open_input(shard) as f:
        column = pq.read_table(f, columns=["image"]).column("image")
    n = chunk.stop - chunk.start
    return np.stack([_decode_crop(column[chunk.offset + i].as_py(), size,
                                  f"{shard} row {chunk.offset + i}") for i in range(n)])


# ------------------------------------------------------------------------------- opening
def open_source(uri: str, image_size: int | None = None) -> ImageSource:
    """Find out what ``uri`` is and check it (a clear ``InputError`` otherwise).
    ``image_size``: the crop of decoded kinds (default: the first image's short side)."""
    from ..data.manifest import MANIFEST

    if image_size is not None and image_size < 1:
        raise InputError(f"image size must be a positive integer, got {image_size}")
    if storage.is_file(uri):
        return _open_npz(uri, "npz", uri)
    if not storage.is_dir(uri):
        raise InputError(f"no file or folder at {uri}")
    if storage.is_file(storage.join(uri, SAMPLES_FILE)):
        return _open_npz(storage.join(uri, SAMPLES_FILE), "samples", uri)
    if (storage.is_file(storage.join(uri, MANIFEST))
            or storage.is_file(storage.join(uri, "train", MANIFEST))):
        return _open_shards(uri, image_size, uri)
    return _open_images(uri, image_size, uri)


def cache_uri(source: ImageSource, network_key: str) -> str:
    """Where the features of ``source`` by the network ``network_key`` are kept: beside an
    .npz file (``NAME.npz`` -> ``NAME.features-KEY.npz``), inside a folder
    (``features-KEY.npz``). Decoded kinds add the crop size to the key."""
    key = network_key + (f"-{source.image_shape[0]}px" if source.decoded else "")
    if source.kind == "npz":
        base = storage.basename(source.data_uri)
        stem = base[:-4] if base.endswith(".npz") else base
        folder = (source.data_uri[: -len(base)].rstrip("/") if storage.is_s3(source.data_uri)
                  else os.path.dirname(os.path.abspath(source.data_uri)))
        return storage.join(folder, f"{stem}.features-{key}.npz")
    return storage.join(source.uri if source.kind == "samples" else source.data_uri,
                        f"features-{key}.npz")
