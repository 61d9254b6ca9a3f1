"""The on-storage layout of a sharded dataset, and how readers find it.

A prepared dataset root (``--out URI``) holds one folder per split::

    URI/train/classes.json      sorted class names; label i is classes[i]
    URI/train/manifest.json     written last: its presence means the split is complete
    URI/train/shard-00000.parquet ...
    URI/val/...                 same layout, same classes.json (labels index the train classes)

Each split folder is a self-contained dataset (shards, classes.json, manifest.json). Readers go
through the manifest (never a directory listing), so temporary files and shards of an unfinished
run are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adm import storage
from adm.storage import S3Options

MANIFEST = "manifest.json"
CLASSES = "classes.json"
FORMAT = "adm-shards/1"


def shard_name(index: int) -> str:
    """File name of shard ``index`` (zero-padded so names sort in order)."""
    return f"shard-{index:05d}.parquet"


@dataclass(frozen=True)
class SplitInfo:
    """A complete split: its folder URI, the parsed manifest, the class names, and the shard
    URIs in manifest order."""

    root: str
    manifest: dict[str, Any]
    classes: list[str]
    shard_uris: list[str]

    @property
    def num_images(self) -> int:
        """Images in the split (the sum of the shards' rows)."""
        return int(self.manifest["images_written"])


def resolve_split_root(uri: str, split: str = "train", s3: S3Options | None = None) -> str:
    """The folder of ``split``: ``uri/<split>`` when it has a manifest, else ``uri`` itself
    when ``uri`` is a split folder. A clear error says what was looked for otherwise."""
    nested = storage.join(uri, split)
    if storage.exists(storage.join(nested, MANIFEST), s3):
        return nested
    if storage.exists(storage.join(uri, MANIFEST), s3):
        return uri
    raise FileNotFoundError(
        f"no prepared dataset at {uri}: neither {storage.join(nested, MANIFEST)} nor "
        f"{storage.join(uri, MANIFEST)} exists (run jobs/prepare_imagenet.py or "
        "jobs/prepare_digits.py first; a split without manifest.json is unfinished)"
    )


def load_split(uri: str, split: str = "train", s3: S3Options | None = None) -> SplitInfo:
    """Read the manifest and classes of a prepared split (see ``resolve_split_root``)."""
    root = resolve_split_root(uri, split, s3)
    manifest = storage.read_json(storage.join(root, MANIFEST), s3)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{storage.join(root, MANIFEST)} has format {manifest.get('format')!r}; "
            f"this version reads {FORMAT!r}"
        )
    classes = storage.read_json(storage.join(root, CLASSES), s3)
    if not isinstance(classes, list) or len(classes) != manifest["num_classes"]:
        raise ValueError(f"{storage.join(root, CLASSES)} does not match the manifest's "
                         f"{manifest['num_classes']} classes")
    shard_uris = [storage.join(root, s["file"]) for s in manifest["shards"]]
    return SplitInfo(root, manifest, classes, shard_uris)
