"""The driver side of a training run: check the config against the data, build the Ray Data
datasets and the `TorchTrainer`, run it, export the result.

A run lives in `<run.storage>/<run.name>`: Ray Train's checkpoints and run state, `config.yaml`
(the resolved config), `tensorboard/`, and `export/` (the reference's file names). Running the
same config again resumes from the last checkpoint (Ray Train finds the run by its folder).
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import replace
from typing import Callable, Sequence

import pyarrow.parquet as pq
import ray
import ray.train
import torch
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .. import storage
from ..config import ConfigError, to_dict
from ..data.datasets import image_dataset, superres_dataset, train_data_config
from ..data.manifest import CLASSES, load_split
from ..nodetypes import check_fits, training_resources, worker_demand
from .checkpoint import export_run
from .config import TrainConfig
from .loop import train_loop_per_worker
from .progress import driver_bar


def run_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def _min_image_side(uri: str) -> int:
    """The smallest width or height among a split's images, from the shards' Parquet
    statistics (footers only: no image is read)."""
    info = load_split(uri)

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
            info = load_split(uri, "val" if key == "data.val_uri" else "train")
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
    flags = cfg.model_flags
    if cfg.kind == "upsampler":
        datasets = {"train": superres_dataset(d.uri, flags["large_size"], flags["small_size"],
                                              random_flip=d.random_flip, seed=cfg.run.seed,
                                              config=d)}
    else:
        datasets = {"train": image_dataset(d.uri, cfg.image_size, random_crop=d.random_crop,
                                           random_flip=d.random_flip, seed=cfg.run.seed,
                                           config=d)}
    if d.val_uri:
        datasets["val"] = image_dataset(d.val_uri, cfg.image_size, split="val", random_flip=False,
                                        seed=cfg.run.seed, config=replace(d, shuffle="none"))
    return datasets


def warn_local_paths_on_a_cluster(cfg: TrainConfig) -> None:
    """Every node must reach the data and the run folder: on a multi-node cluster a local path
    works only where it is a shared file system (or all nodes share one machine)."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes < 2:
        return
    local = [f"{key}={uri}" for key, uri in (("data.uri", cfg.data.uri),
                                             ("data.val_uri", cfg.data.val_uri),
                                             ("run.storage", cfg.run.storage))
             if uri and not storage.is_s3(uri)]
    if local:
        print(f"warning: {', '.join(local)}: local path(s) on a {nodes}-node cluster; every "
              "node must see the same files there (a shared file system), else use s3://",
              flush=True)


def fit(cfg: TrainConfig, callbacks: Sequence[ray.train.UserCallback] = (),
        log_level: str = "WARNING") -> ray.train.Result:
    """Train (or resume) the run of `cfg` to `optim.max_steps`, then export its last
    checkpoint to `<run>/export`. `callbacks` are Ray Train's, run on the Train controller;
    `log_level` is that of Ray Train's own messages in the terminal (all go to its log files)."""
    with driver_bar(cfg.kind, cfg.optim.max_steps) as progress:
        result = make_trainer(cfg, callbacks, log_level=log_level, progress=progress).fit()
    if result.error is not None:
        raise result.error
    run = run_uri(cfg)
    export_run(run, storage.join(run, "export"))
    return result


def make_trainer(cfg: TrainConfig, callbacks: Sequence[ray.train.UserCallback] = (),
                 train_loop: Callable[[dict], None] = train_loop_per_worker,
                 log_level: str = "WARNING", progress: str | None = None) -> TorchTrainer:
    """The `TorchTrainer` of a run: its data checked, its config and
    classes recorded in the run folder. `train_loop` wraps or replaces the per-worker loop;
    `progress` names the step counter of the driver's bar (`adm.train.progress`).

    GPU workers of a config that names no `run.resources` go to the cluster's training node
    type where its node types are kept apart by workload (`nodetypes.training_resources`);
    the config recorded in the run folder holds the resources the workers asked for."""
    check_data(cfg)
    resources = training_resources(cfg.run.use_gpu, cfg.run.resources)
    if resources != cfg.run.resources:
        named = ", ".join(f"{k}: {v:g}" for k, v in resources.items())
        print(f"[{cfg.kind}] GPU workers on the cluster's training nodes: run.resources="
              f"{{{named}}} (name run.resources to choose others)", flush=True)
        cfg = replace(cfg, run=replace(cfg.run, resources=resources))
    warn_local_paths_on_a_cluster(cfg)
    if cfg.kind == "classifier" and not cfg.data.val_uri:
        print("[classifier] no held-out data (data.val_uri unset): held-out evaluation is off; "
              "training accuracy is reported", flush=True)
    run = run_uri(cfg)
    storage.write_bytes(storage.join(run, "config.yaml"),
                        yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    storage.write_bytes(storage.join(run, CLASSES),  # export/ copies it beside flags.json
                        storage.read_bytes(storage.join(load_split(cfg.data.uri).root, CLASSES)))
    fs, path = storage.resolve_filesystem(cfg.run.storage)
    # Only the non-secret S3 settings travel to the workers (Ray records train_loop_config in
    # its run state); credentials come from each node's environment or instance role, or from
    # the job's runtime env, the standard AWS ways.
    s3 = storage.default_s3_options()
    per_worker = {"CPU": cfg.run.cpus_per_worker, **cfg.run.resources}
    check_fits(worker_demand(cfg.run.cpus_per_worker, int(cfg.run.use_gpu), cfg.run.resources),
               "training workers")
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg, "log_level": log_level, "progress": progress,
                           "s3": {"endpoint_url": s3.endpoint_url, "region": s3.region}},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=per_worker,
                                     placement_strategy=cfg.run.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=list(callbacks),
            logging_config=ray.LoggingConfig(log_level=log_level),
        ),
        datasets=build_datasets(cfg),
        # A CPU build of torch has no NCCL: workers that were given a GPU by Ray (a simulated
        # GPU node) then train on CPU over gloo, as the loop does (loop.worker_device).
        torch_config=TorchConfig(backend=None if torch.version.cuda else "gloo"),
        # Only the training set is split between workers; every worker evaluates the whole
        # (small) held-out set.
        dataset_config=train_data_config(datasets_to_split=["train"]),
    )
