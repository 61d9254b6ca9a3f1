"""Finding the images of a dataset before it is sharded.

Three layouts are understood, local or under ``s3://``:

* a class-folder tree: ``ROOT/<class>/**/<file>`` (ImageNet's ``train/n01440764/*.JPEG``); the
  class is the first folder under ROOT;
* an uncompressed tar of per-class tars (``ILSVRC2012_img_train.tar`` holds ``n01440764.tar``,
  ...), or a tar of a class-folder tree;
* for a validation set, any folder or tar of images plus a labels file mapping each file name to
  its class (``--val-labels``).

Items inside tars are addressed by byte offset, so Ray tasks read them in parallel with ranged
reads instead of one process streaming a 140 GB tar.
"""
from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from adm import storage
from adm.config import InputError
from adm.storage import S3Options

# File name extensions treated as images (case-insensitive). The content decides the actual
# format later: a PNG named .JPEG is fine. "gif" and the rest beyond the reference's
# jpg/jpeg/png/gif are harmless additions.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"})
_TAR_READ_BUFFER = 4 * 1024 * 1024
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


class MissingInputError(InputError, FileNotFoundError):
    """An input that does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One candidate image.

    ``source``: its path relative to the dataset root, ``/``-separated (unique; stored in the
    shards). ``class_name``: its class. The bytes are read from ``location`` (a file URI), or,
    when ``offset >= 0``, from ``size`` bytes at ``offset`` inside the tar at ``location``, or
    come inline in ``data``."""

    source: str
    class_name: str
    location: str = ""
    offset: int = -1
    size: int = -1
    data: bytes | None = None


@dataclass(frozen=True)
class Skipped:
    """A file that will not be in the shards, and why."""

    source: str
    reason: str


@dataclass
class ScanResult:
    """Candidate images (sorted by ``source``) and files passed over while scanning."""

    items: list[SourceItem]
    skipped: list[Skipped]

    def classes(self) -> list[str]:
        """The sorted class names that have at least one candidate image: labels are indices
        into this list, as in the reference (which sorts the class names it finds)."""
        return sorted({item.class_name for item in self.items})


def _extension(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _reason_not_image(relpath: str) -> str | None:
    """Why a path is not a candidate image, or None when it is one."""
    if any(part.startswith(".") for part in relpath.split("/")):
        return "hidden file or folder"
    ext = _extension(relpath)
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image file name (extension {('.' + ext) if ext else 'none'!r})"
    return None


class _SliceFile(io.RawIOBase):
    """A read-only, seekable window ``[offset, offset + size)`` of a random-access file, so
    ``tarfile`` can index a tar nested inside another without copying it."""

    def __init__(self, f, offset: int, size: int):
        self._f, self._offset, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        data = self._f.read_at(n, self._offset + self._pos)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _tar_members(fileobj, where: str) -> Iterable[tarfile.TarInfo]:
    head = fileobj.read(6)
    fileobj.seek(0)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise InputError(
                f"{where} is a {kind}-compressed tar; only uncompressed tars can be read in "
                "parallel by offset (ImageNet's tars are uncompressed): decompress it first"
            )
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                yield member
    except tarfile.ReadError as e:
        raise InputError(f"{where} is not a readable tar file: {e}") from e


def _strip_single_top_folder(paths: Sequence[str]) -> str:
    """The common top folder to drop when every path sits under one folder (``train/...``)."""
    tops = {p.split("/", 1)[0] for p in paths}
    if len(tops) == 1 and all("/" in p for p in paths):
        return next(iter(tops)) + "/"
    return ""


def _classify_tree_entries(entries: Iterable[tuple[str, SourceItem]]) -> ScanResult:
    """Turn (relpath, item-without-class) pairs of a class-folder tree into a ScanResult."""
    items, skipped = [], []
    for relpath, proto in entries:
        reason = _reason_not_image(relpath)
        if reason is None and "/" not in relpath:
            reason = "not inside a class folder"
        if reason is not None:
            skipped.append(Skipped(relpath, reason))
            continue
        items.append(
            SourceItem(
                source=relpath,
                class_name=relpath.split("/", 1)[0],
                location=proto.location,
                offset=proto.offset,
                size=proto.size,
            )
        )
    return _finish(items, skipped)


def _finish(items: list[SourceItem], skipped: list[Skipped]) -> ScanResult:
    items.sort(key=lambda it: it.source)
    for a, b in zip(items, items[1:]):
        if a.source == b.source:
            raise InputError(f"two files have the same path {a.source!r} in the source")
    skipped.sort(key=lambda s: s.source)
    return ScanResult(items, skipped)


def _member_name(name: str) -> str:
    """A tar member's path without a leading ``./`` or ``/`` (hidden names keep their dot)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _buffered(f, offset: int, size: int) -> io.BufferedReader:
    # tarfile reads 512-byte headers and seeks over the data; buffering turns that into a few
    # large (ranged, for S3) reads instead of one request per member.
    return io.BufferedReader(_SliceFile(f, offset, size), buffer_size=_TAR_READ_BUFFER)


def _tar_entries(uri: str, s3: S3Options | None) -> list[tuple[str, SourceItem]]:
    """(relpath, located item) for every regular file in the tar, descending into member
    ``.tar`` files (per-class tars: ``n01440764.tar`` -> ``n01440764/<member>``). Offsets are
    absolute in the outer file, so items are later read with one ranged read each."""
    out: list[tuple[str, SourceItem]] = []
    plain: list[tuple[str, SourceItem]] = []
    with storage.open_input(uri, s3) as f:
        for member in _tar_members(_buffered(f, 0, f.size()), uri):
            if not member.isfile():
                continue
            name = _member_name(member.name)
            if name.lower().endswith(".tar"):
                cls = posixpath.splitext(posixpath.basename(name))[0]
                inner = _buffered(f, member.offset_data, member.size)
                for sub in _tar_members(inner, f"{uri}:{name}"):
                    if sub.isfile():
                        rel = f"{cls}/{_member_name(sub.name)}"
                        out.append(
                            (rel, SourceItem(rel, "", uri, member.offset_data + sub.offset_data,
                                             sub.size))
                        )
            else:
                plain.append((name, SourceItem(name, "", uri, member.offset_data, member.size)))
    if plain:
        strip = _strip_single_top_folder([p for p, _ in plain])
        out.extend((p[len(strip):], item) for p, item in plain)
    return out


def check_source(uri: str, what: str, s3: S3Options | None = None) -> None:
    """Raise ``InputError`` unless ``uri`` is a readable folder or a readable, uncompressed tar.

    Cheap (one stat, for a tar the first header block), so a job runs it before starting Ray.
    ``what`` names the input in the message (e.g. ``"--src"``)."""
    where = f"{what} {uri}"
    try:
        if storage.is_dir(uri, s3):
            if not storage.is_s3(uri) and not os.access(uri, os.R_OK | os.X_OK):
                raise InputError(f"{where} is a folder this user cannot read")
            return
        if storage.is_file(uri, s3):
            with storage.open_input(uri, s3) as f:
                next(iter(_tar_members(_buffered(f, 0, f.size()), where)), None)
            return
    except InputError:
        raise
    except (OSError, ValueError) as e:  # permission denied, S3 unreachable, a bad URI
        raise InputError(f"{where} cannot be read: {e}") from e
    raise MissingInputError(f"{where} does not exist (expected a folder or an uncompressed tar)")


def scan_class_tree(src: str, s3: S3Options | None = None) -> ScanResult:
    """Scan a class-folder tree or a tar (of per-class tars, or of a class-folder tree).

    Files that are not candidate images (other extensions, hidden files, files outside a class
    folder) are listed in ``skipped`` with the reason."""
    if storage.is_file(src, s3):
        return _classify_tree_entries(_tar_entries(src, s3))
    if not storage.is_dir(src, s3):
        raise MissingInputError(f"source {src} is neither a folder nor a tar file")
    entries = [
        (e.relpath, SourceItem(e.relpath, "", storage.join(src, e.relpath), -1, e.size))
        for e in storage.list_files(src, s3)
    ]
    if not entries:
        raise InputError(f"source folder {src} holds no files")
    return _classify_tree_entries(entries)


def parse_labels_file(text: str, where: str = "labels file") -> dict[str, str]:
    """Map image name (file name without extension) -> class name.

    Accepted: one ``<image> <class>`` pair per line, separated by whitespace or a comma
    (``ILSVRC2012_val_00000001.JPEG n01751748``), and Kaggle's ``LOC_val_solution.csv``
    (``ImageId,PredictionString`` header; the class is the first word of the prediction
    string). Blank lines and ``#`` comments are ignored."""
    labels: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        if lineno == 1 and fields[0].lower() in ("imageid", "image", "filename", "file"):
            continue  # a CSV header
        if len(fields) < 2:
            raise InputError(
                f"{where} line {lineno}: expected '<image> <class>', got {raw!r}. (The "
                "devkit's ILSVRC2012_validation_ground_truth.txt holds bare ILSVRC ids, which "
                "are not synset names: give a file that names each image's synset, e.g. "
                "LOC_val_solution.csv.)"
            )
        name = posixpath.splitext(posixpath.basename(fields[0]))[0]
        previous = labels.get(name)
        if previous is not None and previous != fields[1]:
            raise InputError(f"{where} line {lineno}: {name!r} labelled both {previous!r} "
                             f"and {fields[1]!r}")
        labels[name] = fields[1]
    if not labels:
        raise InputError(f"{where} has no labels")
    return labels


def read_labels_file(uri: str, s3: S3Options | None = None) -> dict[str, str]:
    """``parse_labels_file`` of the file at ``uri``; ``InputError`` when it is missing, not
    UTF-8 text or not a labels file."""
    try:
        text = storage.read_bytes(uri, s3).decode("utf-8-sig")
    except FileNotFoundError as e:
        raise MissingInputError(f"labels file {uri} does not exist") from e
    except UnicodeDecodeError as e:
        raise InputError(f"labels file {uri} is not UTF-8 text ({e})") from e
    except (OSError, ValueError) as e:
        raise InputError(f"labels file {uri} cannot be read: {e}") from e
    return parse_labels_file(text, where=f"labels file {uri}")


def scan_labelled_files(
    src: str, labels: dict[str, str], s3: S3Options | None = None
) -> ScanResult:
    """Scan a folder or tar of images whose classes come from ``labels`` (see
    ``parse_labels_file``), e.g. ImageNet's flat validation folder. Images without a label are
    skipped with that reason."""
    if storage.is_file(src, s3):
        entries = _tar_entries(src, s3)
    elif storage.is_dir(src, s3):
        entries = [
            (e.relpath, SourceItem(e.relpath, "", storage.join(src, e.relpath), -1, e.size))
            for e in storage.list_files(src, s3)
        ]
    else:
        raise MissingInputError(f"source {src} is neither a folder nor a tar file")
    items, skipped = [], []
    for relpath, proto in entries:
        reason = _reason_not_image(relpath)
        stem = posixpath.splitext(posixpath.basename(relpath))[0]
        if reason is None and stem not in labels:
            reason = "no label in the labels file"
        if reason is not None:
            skipped.append(Skipped(relpath, reason))
            continue
        items.append(SourceItem(relpath, labels[stem], proto.location, proto.offset, proto.size))
    return _finish(items, skipped)


def restrict_to_classes(scan: ScanResult, classes: Sequence[str]) -> ScanResult:
    """Drop (and list as skipped) the items whose class is not in ``classes``: a validation
    set must use the training set's label indices."""
    known = set(classes)
    items, skipped = [], list(scan.skipped)
    for item in scan.items:
        if item.class_name in known:
            items.append(item)
        else:
            skipped.append(
                Skipped(item.source, f"class {item.class_name!r} is not one of the "
                                     f"{len(classes)} training classes")
            )
    return _finish(items, skipped)


def read_items(items: Sequence[SourceItem], s3: S3Options | None = None) -> list[bytes | Exception]:
    """The bytes of each item, in order; an item that cannot be read gives its exception
    instead (so one unreadable file is reported, not fatal). Each tar is opened once."""
    out: list[bytes | Exception] = [b""] * len(items)
    by_tar: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if item.data is not None:
            out[i] = item.data
        elif item.offset >= 0:
            by_tar[item.location].append(i)
        else:
            try:
                out[i] = storage.read_bytes(item.location, s3)
            except Exception as e:  # noqa: BLE001 - reported per file by the caller
                out[i] = e
    for location, indices in by_tar.items():
        with storage.open_input(location, s3) as f:
            for i in sorted(indices, key=lambda j: items[j].offset):
                try:
                    data = f.read_at(items[i].size, items[i].offset)
                    if len(data) != items[i].size:
                        raise EOFError(f"tar ended after {len(data)} of {items[i].size} bytes")
                    out[i] = data
                except Exception as e:  # noqa: BLE001
                    out[i] = e
    return out
