"""Ray Data pipelines over prepared shards, for the three trainings.

``image_dataset`` (diffusion model, classifier) and ``superres_dataset`` (upsampler) read the
shards listed in a split's manifest, decode and crop the images in Ray Data's CPU tasks, in
batches, and hand out float32 CHW arrays in [-1, 1]. Pass the dataset to Ray Train
(``TorchTrainer(datasets={"train": ds}, dataset_config=train_data_config(cfg))``) and each worker
streams its own part with ``ray.train.get_dataset_shard("train")``.

Shuffling, repeatable from ``seed`` and different every epoch (every execution of the dataset):

* ``"shards"`` (default): the shards are read in a new seeded order each epoch and the rows of
  each shard in a new seeded order. Because the shard writer spread the images uniformly over
  the shards, every stretch of the stream is a uniform sample of all classes, which is what SGD
  needs, at no extra data movement. Add ``local_shuffle_buffer_size`` when iterating for more
  mixing across neighbouring shards.
* ``"global"``: a full ``random_shuffle`` of the encoded rows each epoch (moves all the bytes).
* ``"none"``: shard and row order as written (evaluation).

The same per-row key seeds each image's random crop and flip, so augmentation also changes per
epoch, is the same for the same seed, and does not depend on how rows are batched. Repeatability
needs ``DataConfig.deterministic`` (Ray Data's ``preserve_order``), on by default; Ray Data
counts an epoch when an iteration *finishes*, so an epoch abandoned halfway is replayed.

Where decoding runs is a setting (``DataConfig``): how many decode tasks at most, the CPU share
of each, and optional custom resources that only some nodes offer (e.g. start CPU-only nodes with
``ray start --resources '{"adm_decode": 1000}'`` and set ``decode_resources={"adm_decode": 1}``
to keep decoding off the GPU nodes).
"""
from __future__ import annotations

import random
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data.expressions import random as random_expr

from adm import storage
from adm.data.config import DataConfig
from adm.data.manifest import SplitInfo, load_split
from adm.data.preprocess import (
    BadImageError,
    center_crop_arr,
    decode_image,
    hwc_to_chw,
    random_crop_arr,
    superres_low_res,
    to_model_range,
)
from adm.storage import S3Options

_KEY = "_adm_key"  # per-row random key column (dropped before the data leaves the pipeline)


def train_data_config(config: DataConfig = DataConfig(),
                      datasets_to_split: str | list[str] = "all") -> "ray.train.DataConfig":
    """The ``dataset_config`` to give ``TorchTrainer`` so that Train's per-worker split keeps
    the pipeline's order repeatable (Train otherwise replaces the dataset's execution options
    with the driver's defaults). ``datasets_to_split``: the datasets Train splits between its
    workers; the others reach every worker whole (e.g. a small held-out set)."""
    import ray.train

    # Train's own defaults (resource limits etc. from the driver's DataContext), plus our order.
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = config.deterministic
    return ray.train.DataConfig(datasets_to_split=datasets_to_split, execution_options=options)


def _epoch_seed(seed: int):
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def _row_rng(key: float) -> random.Random:
    # The key is a float64 uniform in [0, 1) with 53 random bits; use them all as the seed.
    return random.Random(int(key * 2**53))


class Preprocess(NamedTuple):
    """How a decoded image becomes a training row: crop to `image_size` (the reference's
    random crop between the two fractions, else its center crop), random horizontal flip, and
    the upsampler's low-resolution input at `low_res_size` (None: none)."""

    image_size: int
    random_crop: bool = False
    random_flip: bool = True
    min_crop_frac: float = 0.8
    max_crop_frac: float = 1.0
    low_res_size: int | None = None


def _decode_batch(batch: dict[str, np.ndarray], prep: Preprocess) -> dict[str, np.ndarray]:
    """Encoded rows -> ``image`` float32 [B, 3, S, S] in [-1, 1], ``label`` int64 [B],
    ``index`` int64 [B] (row id in the split), and ``low_res`` float32 [B, 3, s, s] when
    ``prep.low_res_size`` is set. Crops and flips follow the reference, drawing from each
    row's key."""
    image_size, n = prep.image_size, len(batch["label"])
    images = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    keys = batch[_KEY]
    for i in range(n):
        try:
            pil = decode_image(bytes(batch["image"][i]))
        except BadImageError as e:
            raise BadImageError(
                f"row {int(batch['index'][i])} of the shards does not decode ({e.reason}); the "
                "shard writer checked it, so the shard was changed or damaged after writing"
            ) from e
        rng = _row_rng(float(keys[i]))
        if prep.random_crop:
            arr = random_crop_arr(pil, image_size, prep.min_crop_frac, prep.max_crop_frac,
                                  rng=rng)
        else:
            arr = center_crop_arr(pil, image_size)
        if prep.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        images[i] = hwc_to_chw(to_model_range(arr))
    out = {"image": images, "label": batch["label"].astype(np.int64),
           "index": batch["index"].astype(np.int64)}
    if prep.low_res_size is not None:
        out["low_res"] = superres_low_res(images, prep.low_res_size)
    return out


def _read_shard(row: dict[str, Any], filesystem, columns: list[str], permute: bool) -> Iterator[dict]:
    """One shard path (with its random key) -> the shard's rows.

    The shard's key seeds a generator that gives every row its own key (column ``_KEY``: its
    crop and flip) and, when ``permute``, the order of the shard's rows. A ``flat_map`` on
    purpose: Ray Data will not fuse it into the batched decode step, which would otherwise
    bundle ``decode_batch_size`` *shards* into each task and starve the decode parallelism."""
    with filesystem.open_input_file(row["path"]) as f:
        table = pq.read_table(f, columns=columns)
    rng = np.random.default_rng(int(row[_KEY] * 2**53))
    keys = rng.random(table.num_rows)
    order = rng.permutation(table.num_rows) if permute else np.arange(table.num_rows)
    cols = {name: table.column(name).to_pylist() for name in columns}
    for i in order:
        yield {**{name: cols[name][i] for name in columns}, _KEY: float(keys[i])}


def _build(info: SplitInfo, prep: Preprocess, *, seed: int, config: DataConfig,
           s3: S3Options | None) -> ray.data.Dataset:
    if prep.image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {prep.image_size}")
    fs, _ = storage.resolve_filesystem(info.root, s3)
    paths = [storage.resolve_filesystem(u, s3)[1] for u in info.shard_uris]
    remote_args: dict[str, Any] = {"num_cpus": config.decode_num_cpus}
    if config.decode_resources:
        remote_args["resources"] = dict(config.decode_resources)
    # The shard list from the manifest (not a directory listing: unfinished runs' files are
    # never read), one block per shard so that shards are read in parallel.
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    if config.shuffle != "none":
        ds = ds.randomize_block_order(seed=_epoch_seed(seed))
    # One uniform key per shard from (seed, epoch, task, block): reseed_after_execution gives
    # every epoch new keys, a fixed seed the same keys for the same epoch in any run. The
    # reader derives each row's key (its crop and flip) and the shard's row order from it.
    ds = ds.with_column(_KEY, random_expr(seed=seed, reseed_after_execution=True))
    ds = ds.flat_map(
        _read_shard,
        fn_kwargs=dict(filesystem=fs, columns=["image", "label", "index"],
                       permute=config.shuffle == "shards"),
        **{**remote_args, "num_cpus": config.read_num_cpus},
    )
    if config.shuffle == "global":
        ds = ds.random_shuffle(seed=_epoch_seed(seed))
    ds = ds.map_batches(
        _decode_batch,
        fn_kwargs=dict(prep=prep),
        batch_size=config.decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=config.decode_workers),
        **remote_args,
    )
    ds.context.execution_options.preserve_order = config.deterministic
    return ds


def image_dataset(
    uri: str,
    image_size: int,
    *,
    split: str = "train",
    random_crop: bool = False,
    random_flip: bool = True,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    seed: int = 0,
    config: DataConfig = DataConfig(),
    s3: S3Options | None = None,
) -> ray.data.Dataset:
    """Images for the diffusion model or the classifier, preprocessed as the reference does.

    ``uri``: a prepared dataset root (its ``split`` folder is used) or a split folder.
    Rows: ``image`` float32 [3, S, S] in [-1, 1] (S = ``image_size``; center crop, or the
    reference's random crop when ``random_crop``; random horizontal flip when
    ``random_flip``), ``label`` int64 (index into the split's ``classes.json``), ``index``
    int64 (the row's position in the split, for bookkeeping)."""
    info = load_split(uri, split, s3)
    prep = Preprocess(image_size, random_crop, random_flip, min_crop_frac, max_crop_frac)
    return _build(info, prep, seed=seed, config=config, s3=s3)


def superres_dataset(
    uri: str,
    large_size: int,
    small_size: int,
    *,
    split: str = "train",
    random_flip: bool = True,
    seed: int = 0,
    config: DataConfig = DataConfig(),
    s3: S3Options | None = None,
) -> ray.data.Dataset:
    """High-/low-resolution pairs for the upsampler, as ``super_res_train.py`` makes them.

    Rows: ``image`` float32 [3, L, L] in [-1, 1] (center crop to ``large_size`` and random flip,
    the reference's ``load_data`` defaults), ``low_res`` float32 [3, s, s] =
    ``superres_low_res(image, small_size)`` (area averaging of that same crop), ``label``,
    ``index`` as in ``image_dataset``."""
    if not 0 < small_size <= large_size:
        raise ValueError(f"need 0 < small_size <= large_size, got {small_size}, {large_size}")
    info = load_split(uri, split, s3)
    prep = Preprocess(large_size, random_flip=random_flip, low_res_size=small_size)
    return _build(info, prep, seed=seed, config=config, s3=s3)
