"""Preparing ImageNet-style datasets: scan the source, then write each split's shards.

The jobs (``jobs/prepare_imagenet.py``, ``jobs/prepare_digits.py``) are thin wrappers around
``prepare_imagenet`` and ``adm.data.digits.prepare_digits``.
"""
from __future__ import annotations

import os
from typing import Any

import ray

from adm import storage
from adm.data.manifest import CLASSES
from adm.data.shards import Log, ShardWriterConfig, stderr_log, write_split
from adm.data.sources import (
    parse_labels_file,
    restrict_to_classes,
    scan_class_tree,
    scan_labelled_files,
)
from adm.storage import S3Options


def init_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Resources are never passed: a job submitted to a cluster must not ask ``ray.init`` for
    them, and a local Ray detects the machine's."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", include_dashboard=False)  # never a stale `ray start` cluster


def prepare_imagenet(
    out: str,
    *,
    src: str | None = None,
    val: str | None = None,
    val_labels: str | None = None,
    config: ShardWriterConfig = ShardWriterConfig(),
    s3: S3Options | None = None,
    log: Log = stderr_log,
) -> dict[str, dict[str, Any]]:
    """Write ``out/train`` from ``src`` (a class-folder tree, or a tar of per-class tars or of a
    class-folder tree) and/or ``out/val`` from ``val``; return the manifests by split.

    The validation labels come from ``val_labels`` (see ``parse_labels_file``) or, without it,
    from ``val``'s class folders. They index the training classes: from ``src`` when given, else
    from an existing ``out/train/classes.json``."""
    if not src and not val:
        raise ValueError("nothing to prepare: give a training source, a validation source, or both")
    manifests: dict[str, dict[str, Any]] = {}
    classes: list[str] | None = None
    if src:
        log(f"[prepare] scanning {src}")
        scan = scan_class_tree(src, s3)
        classes = scan.classes()
        log(f"[prepare] train: {len(scan.items)} candidate images in {len(classes)} classes; "
            f"{len(scan.skipped)} other files passed over")
        manifests["train"] = write_split(scan, classes, storage.join(out, "train"),
                                         split="train", config=config, s3=s3, log=log)
    if val:
        if classes is None:
            classes_uri = storage.join(out, "train", CLASSES)
            if not storage.exists(classes_uri, s3):
                raise FileNotFoundError(
                    f"validation labels must index the training classes, but {classes_uri} does "
                    "not exist: pass the training source too, or prepare it first"
                )
            classes = storage.read_json(classes_uri, s3)
        log(f"[prepare] scanning {val}")
        if val_labels:
            text = storage.read_bytes(val_labels, s3).decode("utf-8-sig")
            scan = scan_labelled_files(val, parse_labels_file(text, where=val_labels), s3)
        else:
            scan = scan_class_tree(val, s3)
        scan = restrict_to_classes(scan, classes)
        log(f"[prepare] val: {len(scan.items)} candidate images; {len(scan.skipped)} files "
            "passed over")
        manifests["val"] = write_split(scan, classes, storage.join(out, "val"), split="val",
                                       config=config, s3=s3, log=log)
    return manifests
