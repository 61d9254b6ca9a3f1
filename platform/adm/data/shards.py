"""The shard writer: candidate images -> checked, shuffled, fixed-size Parquet shards.

A split is written in three steps, all deterministic for the same input and settings:

1. **check** (parallel Ray tasks): every candidate is read and fully decoded, as training will
   decode it; empty, truncated and undecodable files are set aside with a reason. Nothing fails
   the job for a bad image.
2. **plan** (driver): the good images, sorted by path, are permuted with ``shuffle_seed`` (so
   every shard is a uniform sample of all classes, which makes the cheap per-epoch shuffles of
   ``adm.data.datasets`` good enough for SGD) and cut into shards of ``images_per_shard``.
3. **write** (parallel Ray tasks): each shard is built in memory and written atomically
   (``adm.storage.write_bytes``); a shard already present from an interrupted run is verified
   (same images, in the same order) and kept, not written again. ``manifest.json`` is written
   last, so a split without it is unfinished and readers refuse it.

Shard columns (the first four are what every reader may rely on): ``image`` (binary: the
file's bytes exactly as read), ``label`` (int64 index into ``classes.json``), ``class_name``, ``source`` (relative
path), ``index`` (int64 position in the split), ``format`` and ``mode`` (what the content turned
out to be, e.g. ``PNG``/``CMYK``), ``width``, ``height``.
"""
from __future__ import annotations

import hashlib
import io
import random
import sys
from collections import Counter
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt
from tqdm import tqdm

from adm import storage
from adm.config import InputError, config_class
from adm.data.manifest import CLASSES, FORMAT, MANIFEST, shard_name
from adm.data.preprocess import BadImageError, check_image, read_info
from adm.data.sources import ScanResult, Skipped, SourceItem, read_items
from adm.progress import progress_bar
from adm.storage import S3Options

Log = Callable[[str], None]
MAX_LOGGED_BAD = 100  # bad files logged one by one; all of them go to the manifest


def stderr_log(message: str) -> None:
    """The default log: one line to stderr, flushed (Ray job logs show it at once), written
    through tqdm so that it does not break a progress bar drawn on a terminal."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


@config_class(frozen=True)
class ShardWriterConfig:
    """Settings of the shard writer (the prepare jobs fill it from their flags; a bad value is
    a ConfigError naming the field).

    ``images_per_shard``: rows per shard (the last one holds the remainder); 1000 makes
    ImageNet shards of ~110 MB. ``shuffle_seed``: seeds the permutation of images over shards.
    ``check_chunk_size``: images per decode-check task. ``num_cpus_per_task``: CPU share each
    Ray task asks for. ``max_in_flight``: tasks submitted at once (default: twice the cluster's
    CPUs over ``num_cpus_per_task``) - bounds driver memory. ``row_group_size``: Parquet rows
    per row group, small so readers can stream a shard. ``progress_interval_s``: least seconds
    between two lines of a progress bar when stderr is not a terminal (a Ray job's log, CI),
    where every update would stay in the log."""

    images_per_shard: PositiveInt = 1000
    shuffle_seed: int = 0
    check_chunk_size: PositiveInt = 256
    num_cpus_per_task: PositiveFloat = 1.0
    max_in_flight: PositiveInt | None = None
    row_group_size: PositiveInt = 128
    progress_interval_s: NonNegativeFloat = 10.0


class ShardMismatchError(InputError):
    """An existing shard holds other images than this run would write there."""


# ----------------------------------------------------------------------------- Ray tasks


def _check_chunk(items: Sequence[SourceItem], s3: S3Options | None) -> list[tuple[int, str]]:
    """(position in ``items``, reason) for every item training could not use."""
    bad = []
    for i, data in enumerate(read_items(items, s3)):
        if isinstance(data, Exception):
            bad.append((i, f"unreadable: {type(data).__name__}: {data}"))
            continue
        try:
            check_image(data)
        except BadImageError as e:
            bad.append((i, e.reason))
    return bad


def _shard_table(
    items: Sequence[SourceItem], labels: Sequence[int], first_index: int, s3: S3Options | None
) -> pa.Table:
    datas = read_items(items, s3)
    infos = []
    for item, data in zip(items, datas):
        if isinstance(data, Exception):
            raise RuntimeError(f"{item.source} was readable during the check but not now: {data}")
        infos.append(read_info(data))
    return pa.table(
        {
            "image": pa.array(datas, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array([it.class_name for it in items], pa.string()),
            "source": pa.array([it.source for it in items], pa.string()),
            "index": pa.array(range(first_index, first_index + len(items)), pa.int64()),
            "format": pa.array([i.format for i in infos], pa.string()),
            "mode": pa.array([i.mode for i in infos], pa.string()),
            "width": pa.array([i.width for i in infos], pa.int32()),
            "height": pa.array([i.height for i in infos], pa.int32()),
        }
    )


def _parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        row_group_size=row_group_size,
        # Encoded images do not compress; the small columns do.
        compression={c: ("none" if c == "image" else "zstd") for c in table.column_names},
        use_dictionary=["class_name", "format", "mode"],
        # Min/max of the image bytes would only bloat the footer.
        write_statistics=["label", "index", "width", "height"],
    )
    return sink.getvalue()


def _shard_record(name: str, data: bytes, rows: int) -> dict[str, Any]:
    return {"file": name, "rows": rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _write_shard(
    uri: str,
    items: Sequence[SourceItem],
    labels: Sequence[int],
    first_index: int,
    row_group_size: int,
    s3: S3Options | None,
) -> dict[str, Any]:
    data = _parquet_bytes(_shard_table(items, labels, first_index, s3), row_group_size)
    storage.write_bytes(uri, data, s3)
    return _shard_record(storage.basename(uri), data, len(items)) | {"written": True}


def _verify_shard(uri: str, items: Sequence[SourceItem], s3: S3Options | None) -> dict[str, Any]:
    data = storage.read_bytes(uri, s3)
    try:
        sources = pq.read_table(pa.BufferReader(data), columns=["source"]).column(0).to_pylist()
    except Exception as e:  # noqa: BLE001
        raise ShardMismatchError(f"{uri} exists but is not a readable shard ({e}); remove it "
                                 "or use an empty --out") from e
    if sources != [it.source for it in items]:
        raise ShardMismatchError(
            f"{uri} exists but holds other images than this run would write there (was it "
            "written from another source, or with another --images-per-shard or seed?); "
            "use an empty --out"
        )
    return _shard_record(storage.basename(uri), data, len(items)) | {"written": False}


# ----------------------------------------------------------------------------- driver


def _progress_bar(what: str, total: int, unit: str, config: ShardWriterConfig):
    """A tqdm bar on stderr (count, rate, ETA) for one phase of the writer."""
    return progress_bar(total=total, desc=f"[prepare] {what}", unit=unit,
                        log_interval_s=config.progress_interval_s)


def _result(ref: ray.ObjectRef) -> Any:
    """``ray.get`` that hands on a task's ``InputError`` as itself (its message, not Ray's
    wrapper with the remote traceback), so the job reports it in one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, InputError):
            raise e.cause from None
        raise


def _run_bounded(
    jobs: Sequence[tuple[Callable[[], ray.ObjectRef], Callable[[Any], None]]], max_in_flight: int
) -> None:
    """Submit ``jobs`` (submit, on_result) keeping at most ``max_in_flight`` running; call each
    ``on_result`` in completion order."""
    pending: dict[ray.ObjectRef, Callable[[Any], None]] = {}
    queue = list(jobs)[::-1]
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            submit, on_result = queue.pop()
            pending[submit()] = on_result
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)(_result(ref))


def _default_in_flight(config: ShardWriterConfig) -> int:
    if config.max_in_flight is not None:
        return config.max_in_flight
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(2, int(2 * cpus / config.num_cpus_per_task))


def source_digest(scan: ScanResult) -> str:
    """A fingerprint of what was found (paths, classes, sizes, skipped files): a finished split
    with the same digest and settings is not prepared again."""
    h = hashlib.sha256()
    for it in scan.items:
        h.update(f"{it.source}\t{it.class_name}\t{it.size}\n".encode())
    for s in scan.skipped:
        h.update(f"skip\t{s.source}\t{s.reason}\n".encode())
    return "sha256:" + h.hexdigest()


def _remove_stale_temp_files(out: str, s3: S3Options | None, log: Log) -> None:
    # Only local writes leave temporaries (an S3 PUT is all or nothing). They are hidden
    # (".shard-00003.parquet.tmp-<uuid>"), so readers never saw them; remove the clutter.
    if storage.is_s3(out) or not storage.is_dir(out, s3):
        return
    for name in storage.listdir(out, s3):
        if name.startswith(".") and ".tmp-" in name:
            storage.delete(storage.join(out, name), s3)
            log(f"[prepare] removed the unfinished write {name} of an interrupted run")


def _write_classes(out: str, classes: Sequence[str], s3: S3Options | None) -> None:
    uri = storage.join(out, CLASSES)
    if storage.exists(uri, s3):
        existing = storage.read_json(uri, s3)
        if existing != list(classes):
            raise InputError(
                f"{uri} already lists {len(existing)} other classes than this run's "
                f"{len(classes)}: this folder holds another dataset; use an empty --out"
            )
        return
    storage.write_json(uri, list(classes), s3)


def _task_options(config: ShardWriterConfig) -> dict[str, Any]:
    return {"num_cpus": config.num_cpus_per_task, "max_retries": 3}


def _check_all(
    items: Sequence[SourceItem], split: str, config: ShardWriterConfig, s3: S3Options | None,
    log: Log,
) -> dict[int, str]:
    """Decode-check ``items`` in parallel tasks; return {position in ``items``: reason} for the
    bad ones (each logged, up to ``MAX_LOGGED_BAD``)."""
    bad: dict[int, str] = {}
    check_remote = ray.remote(_check_chunk).options(**_task_options(config))
    with _progress_bar(f"{split}: decode-checked", len(items), "img", config) as bar:

        def on_result(result: list[tuple[int, str]], start: int, n: int) -> None:
            for i, reason in result:
                bad[start + i] = reason
                if len(bad) <= MAX_LOGGED_BAD:
                    log(f"[prepare] {split}: skipping {items[start + i].source}: {reason}")
                elif len(bad) == MAX_LOGGED_BAD + 1:
                    log(f"[prepare] {split}: more bad files; all are listed in manifest.json")
            bar.set_postfix(bad=len(bad), refresh=False)
            bar.update(n)

        jobs = []
        for start in range(0, len(items), config.check_chunk_size):
            chunk = items[start : start + config.check_chunk_size]
            jobs.append((lambda chunk=chunk: check_remote.remote(chunk, s3),
                         lambda r, start=start, n=len(chunk): on_result(r, start, n)))
        _run_bounded(jobs, _default_in_flight(config))
    return bad


def _write_all(
    shards: Sequence[Sequence[SourceItem]], labels: Sequence[Sequence[int]], out: str, split: str,
    config: ShardWriterConfig, s3: S3Options | None, log: Log,
) -> list[dict[str, Any]]:
    """Write shard k of ``shards`` (with its ``labels``) to ``out``, or verify it when an
    interrupted run already wrote it; return the shard records in shard order."""
    options = _task_options(config)
    write_remote = ray.remote(_write_shard).options(**options)
    verify_remote = ray.remote(_verify_shard).options(**options)
    records: list[dict[str, Any]] = [{} for _ in shards]
    n = config.images_per_shard
    with _progress_bar(f"{split}: shards written", len(shards), "shard", config) as bar:

        def on_result(record: dict[str, Any], k: int) -> None:
            records[k] = record
            bar.update(1)

        jobs, present = [], 0
        for k, (shard_items, shard_labels) in enumerate(zip(shards, labels)):
            uri = storage.join(out, shard_name(k))
            if storage.exists(uri, s3):
                present += 1
                submit = lambda uri=uri, it=shard_items: verify_remote.remote(uri, it, s3)
            else:
                submit = lambda uri=uri, it=shard_items, lb=shard_labels, first=k * n: (
                    write_remote.remote(uri, it, lb, first, config.row_group_size, s3))
            jobs.append((submit, lambda r, k=k: on_result(r, k)))
        if present:
            log(f"[prepare] {split}: {present} of {len(shards)} shards are already written; "
                "verifying them instead of writing them again")
        _run_bounded(jobs, _default_in_flight(config))
    return records


def _no_images_message(split: str, skipped: Sequence[Skipped]) -> str:
    if not skipped:
        return f"no images for {split}"
    return (f"no usable images for {split}: all {len(skipped)} files were skipped (first: "
            f"{skipped[0].source}: {skipped[0].reason})")


def _finished(out: str, digest: str, config: ShardWriterConfig, s3: S3Options | None
              ) -> dict | None:
    """The manifest of a split already finished in `out` from the same files and settings, or
    None when there is none; an InputError when `out` holds one made from others."""
    manifest_uri = storage.join(out, MANIFEST)
    if not storage.exists(manifest_uri, s3):
        return None
    manifest = storage.read_json(manifest_uri, s3)
    if (manifest.get("source_digest"), manifest.get("images_per_shard"),
            manifest.get("shuffle_seed")) != (digest, config.images_per_shard, config.shuffle_seed):
        raise InputError(f"{out} already holds a finished split "
                         "prepared from other files or with other settings; use an empty --out")
    return manifest


def write_split(
    scan: ScanResult,
    classes: Sequence[str],
    out: str,
    *,
    split: str,
    config: ShardWriterConfig = ShardWriterConfig(),
    s3: S3Options | None = None,
    log: Log = stderr_log,
) -> dict[str, Any]:
    """Check, shard and write the candidates of ``scan`` into the split folder ``out``; return
    the manifest (also written to ``out/manifest.json``). Labels index ``classes``; every
    candidate's class must be in it. Needs Ray (initialises a local one if none is running).
    Resumable: rerun with the same arguments after an interruption."""
    label_of = {c: i for i, c in enumerate(classes)}
    missing = sorted({it.class_name for it in scan.items} - set(label_of))
    if missing:
        raise ValueError(f"classes {missing[:5]} of the images are not in the class list")
    digest = source_digest(scan)
    finished = _finished(out, digest, config, s3)
    if finished is not None:
        log(f"[prepare] {split}: already complete at {out} ({finished['images_written']} images)")
        return finished

    if not scan.items:
        raise InputError(_no_images_message(split, scan.skipped))

    if not ray.is_initialized():
        ray.init()
    storage.makedirs(out, s3)
    _write_classes(out, classes, s3)
    _remove_stale_temp_files(out, s3, log)

    # 1. check (in path order: neighbouring files are read together).
    bad = _check_all(scan.items, split, config, s3, log)

    # 2. plan
    good = [it for i, it in enumerate(scan.items) if i not in bad]
    random.Random(config.shuffle_seed).shuffle(good)
    skipped = sorted(
        list(scan.skipped) + [Skipped(scan.items[i].source, r) for i, r in bad.items()],
        key=lambda s: s.source)
    n = config.images_per_shard
    shards = [good[i : i + n] for i in range(0, len(good), n)]
    if not shards:
        raise InputError(_no_images_message(split, skipped))

    # 3. write (or verify what an interrupted run already wrote)
    labels = [[label_of[it.class_name] for it in shard] for shard in shards]
    records = _write_all(shards, labels, out, split, config, s3, log)

    class_counts = Counter(it.class_name for it in good)
    manifest = {
        "format": FORMAT,
        "split": split,
        "num_classes": len(classes),
        "images_per_shard": n,
        "shuffle_seed": config.shuffle_seed,
        "source_digest": digest,
        "columns": ["image", "label", "class_name", "source", "index", "format", "mode",
                    "width", "height"],
        "images_written": len(good),
        "images_skipped": len(skipped),
        "class_counts": {c: class_counts.get(c, 0) for c in classes},
        "shards": [{k: v for k, v in r.items() if k != "written"} for r in records],
        "skipped": [{"source": s.source, "reason": s.reason} for s in skipped],
    }
    storage.write_json(storage.join(out, MANIFEST), manifest, s3)
    log(f"[prepare] {split}: wrote {len(good)} images in {len(shards)} shards to {out}; "
        f"skipped {len(skipped)} files" + (f" (e.g. {skipped[0].source}: {skipped[0].reason})"
                                            if skipped else ""))
    return manifest
