"""The driver side of a training run: check the config against the data, build the Ray Data
datasets and the `TorchTrainer`, run it, export the result.

A run lives in `<run.storage>/<run.name>`: Ray Train's checkpoints and run state, `config.yaml`
(the resolved config), `tensorboard/`, and `export/` (the reference's file names). Running the
same config again resumes from the last checkpoint (Ray Train finds the run by its folder).
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import replace

import pyarrow.parquet as pq
import ray
import ray.train
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .. import storage
from ..config import ConfigError, to_dict
from ..data.datasets import (DataConfig, image_dataset, split_info, superres_dataset,
                             train_data_config)
from .checkpoint import export_run
from .config import TrainConfig
from .loop import train_loop_per_worker


AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def run_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def _min_image_side(uri: str) -> int:
    """The smallest width or height among a split's images, from the shards' Parquet
    statistics (footers only: no image is read)."""
    info = split_info(uri)

    def shard_min(shard_uri: str) -> int:
        with storage.open_input(shard_uri) as f:
            meta = pq.read_metadata(f)
        names = meta.schema.names
        out = []
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for col in ("width", "height"):
                stats = group.column(names.index(col)).statistics
                if stats is not None and stats.has_min_max:
                    out.append(stats.min)
        return min(out) if out else 0

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        mins = [m for m in pool.map(shard_min, info.shard_uris) if m]
    return min(mins) if mins else 0


def check_data(cfg: TrainConfig) -> None:
    """What the config asks of the data, checked on the driver before any worker starts."""
    for key, uri in (("data.uri", cfg.data.uri), ("data.val_uri", cfg.data.val_uri)):
        if not uri:
            continue
        try:
            info = split_info(uri, "val" if key == "data.val_uri" else "train")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
        flags = cfg.model_flags
        needs_labels = cfg.kind == "classifier" or flags["class_cond"]
        if needs_labels and len(info.classes) > flags["num_classes"]:
            raise ConfigError(f"{key}: the data has {len(info.classes)} classes but the model "
                              f"has num_classes={flags['num_classes']}")
        if key == "data.uri":
            if info.num_images < cfg.optim.batch_size:
                raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is larger than the "
                                  f"{info.num_images} images of {uri}")
            side = _min_image_side(uri)
            if side and side < cfg.image_size:
                raise ConfigError(
                    f"model image size {cfg.image_size}: the data at {uri} has images of only "
                    f"{side} px on a side (prepare it at a larger size or train a smaller model)")


def build_datasets(cfg: TrainConfig) -> dict[str, ray.data.Dataset]:
    d = cfg.data
    dcfg = DataConfig(decode_workers=d.decode_workers, decode_num_cpus=d.decode_cpus)
    flags = cfg.model_flags
    if cfg.kind == "upsampler":
        datasets = {"train": superres_dataset(d.uri, flags["large_size"], flags["small_size"],
                                              random_flip=d.random_flip, seed=cfg.run.seed,
                                              config=dcfg)}
    else:
        datasets = {"train": image_dataset(d.uri, cfg.image_size, random_crop=d.random_crop,
                                           random_flip=d.random_flip, seed=cfg.run.seed,
                                           config=dcfg)}
    if d.val_uri:
        datasets["val"] = image_dataset(d.val_uri, cfg.image_size, split="val", random_flip=False,
                                        seed=cfg.run.seed,
                                        config=DataConfig(decode_workers=d.decode_workers,
                                                          decode_num_cpus=d.decode_cpus,
                                                          shuffle="none"))
    return datasets


def _absolute(uri: str) -> str:
    """Local paths made absolute on the driver: workers and Ray Data tasks run elsewhere."""
    return uri if not uri or storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def fit(cfg: TrainConfig) -> ray.train.Result:
    """Train (or resume) the run of `cfg` to `optim.max_steps`, then export its last
    checkpoint to `<run>/export`."""
    cfg = replace(cfg, data=replace(cfg.data, uri=_absolute(cfg.data.uri),
                                    val_uri=_absolute(cfg.data.val_uri)),
                  run=replace(cfg.run, storage=_absolute(cfg.run.storage),
                              init_from=_absolute(cfg.run.init_from),
                              trace_file=_absolute(cfg.run.trace_file)))
    check_data(cfg)
    run = run_uri(cfg)
    storage.write_bytes(storage.join(run, "config.yaml"),
                        yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    fs, path = storage.resolve_filesystem(cfg.run.storage)
    # The workers reach S3 with the driver's standard AWS settings (endpoint, region,
    # credentials), which a Ray job's runtime env does not hand to Train's worker processes. They
    # travel beside the config, never inside it: checkpoints record the config.
    aws_env = {k: v for k, v in os.environ.items() if k in AWS_ENV}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "env": aws_env},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
        datasets=build_datasets(cfg),
        # Only the training set is split between workers; every worker evaluates the whole
        # (small) held-out set.
        dataset_config=train_data_config(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    export_run(run, storage.join(run, "export"))
    return result
