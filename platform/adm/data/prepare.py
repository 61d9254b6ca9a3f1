"""Preparing ImageNet-style datasets: scan the source, then write each split's shards.

The jobs (``jobs/prepare_imagenet.py``, ``jobs/prepare_digits.py``) are thin wrappers around
``check_prepare_inputs`` / ``check_output`` (cheap checks, before Ray starts), and
``prepare_imagenet`` / ``adm.data.digits.prepare_digits``. Problems the user must fix raise
``InputError``, which the jobs print as one ``error:`` line.
"""
from __future__ import annotations

from typing import Any

from adm import storage
from adm.data.manifest import CLASSES
from adm.data.shards import Log, ShardWriterConfig, stderr_log, write_split
from adm.data.sources import (
    InputError,
    MissingInputError,
    check_source,
    read_labels_file,
    restrict_to_classes,
    scan_class_tree,
    scan_labelled_files,
)
from adm.storage import S3Options


def check_output(out: str, what: str = "--out", s3: S3Options | None = None) -> None:
    """Raise ``InputError`` when ``out`` obviously cannot hold the dataset (a file, a folder
    this user may not write, a missing bucket)."""
    try:
        why = storage.why_not_writable(out, s3)
    except (OSError, ValueError) as e:  # an unsupported scheme, S3 unreachable
        raise InputError(f"{what} {out} cannot be used: {e}") from e
    if why:
        raise InputError(f"{what} {out} cannot be written: {why}")


def _train_classes_uri(out: str) -> str:
    return storage.join(out, "train", CLASSES)


def check_prepare_inputs(
    out: str,
    *,
    src: str | None = None,
    val: str | None = None,
    val_labels: str | None = None,
    s3: S3Options | None = None,
) -> None:
    """The cheap checks of ``prepare_imagenet``'s arguments (sources exist and are readable
    folders or uncompressed tars, the labels file parses, the output can be written), named
    by the job's flags; ``InputError`` for the first problem found."""
    if not src and not val:
        raise InputError("nothing to prepare: give --src, --val or both")
    if val_labels and not val:
        raise InputError("--val-labels needs --val")
    for what, uri in (("--src", src), ("--val", val)):
        if uri:
            check_source(uri, what, s3)
    if val_labels:
        read_labels_file(val_labels, s3)
    check_output(out, "--out", s3)
    if val and not src and not storage.exists(_train_classes_uri(out), s3):
        raise MissingInputError(
            f"validation labels must index the training classes, but "
            f"{_train_classes_uri(out)} does not exist: pass --src too, or prepare it first")


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
        raise InputError("nothing to prepare: give a training source, a validation source, or both")
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
            classes_uri = _train_classes_uri(out)
            if not storage.exists(classes_uri, s3):
                raise MissingInputError(
                    f"validation labels must index the training classes, but {classes_uri} does "
                    "not exist: pass the training source too, or prepare it first"
                )
            classes = storage.read_json(classes_uri, s3)
        log(f"[prepare] scanning {val}")
        if val_labels:
            scan = scan_labelled_files(val, read_labels_file(val_labels, s3), s3)
        else:
            scan = scan_class_tree(val, s3)
        scan = restrict_to_classes(scan, classes)
        log(f"[prepare] val: {len(scan.items)} candidate images; {len(scan.skipped)} files "
            "passed over")
        manifests["val"] = write_split(scan, classes, storage.join(out, "val"), split="val",
                                       config=config, s3=s3, log=log)
    return manifests
