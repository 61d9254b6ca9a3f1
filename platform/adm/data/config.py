"""The one data config: which shards a run reads and how the Ray Data pipeline runs.

The training config's ``data:`` section is this class, and ``image_dataset`` /
``superres_dataset`` take it as their ``config``. No Ray import here: configs are checked on
the driver before Ray starts.
"""
from __future__ import annotations

from dataclasses import field
from typing import Literal

from pydantic import PositiveFloat, PositiveInt

from adm.config import Location, OptionalLocation, config_class

ShuffleMode = Literal["shards", "global", "none"]


@config_class(frozen=True)
class DataConfig:
    """What to read, and where and how the pipeline runs.

    ``uri``: training shards (a dataset root or a split folder). ``val_uri``: held-out shards
    (``None``: no held-out evaluation). ``random_crop`` / ``random_flip``: the reference's
    augmentations.

    ``decode_workers``: most decode tasks at once (``None``: as many as free CPUs allow).
    ``decode_num_cpus``: CPU share each decode task reserves; keep the sum of these and the
    Train workers' CPUs within the node: when the Train workers hold every CPU, Ray Data's
    read and decode tasks never get one and the run hangs (e.g. 2 one-CPU workers on 2 CPUs).
    ``decode_resources``: extra custom resources each decode task needs, to pin decoding to the
    nodes that offer them (CPU nodes), e.g. ``{"adm_decode": 1}``.
    ``decode_batch_size``: images decoded per batch (a decode task takes one shard and streams
    it out in batches; the number of shards bounds the parallelism). ``read_num_cpus``: CPU
    share of the tasks that read shard files (mostly I/O). ``shuffle``: see
    ``adm.data.datasets``. ``deterministic``: same order for the same seed (``preserve_order``);
    turn off to let fast tasks overtake slow ones for a little more throughput."""

    uri: Location = ""
    val_uri: OptionalLocation = None
    random_crop: bool = False
    random_flip: bool = True
    decode_workers: PositiveInt | None = None
    decode_num_cpus: PositiveFloat = 1.0
    decode_resources: dict[str, float] = field(default_factory=dict)
    decode_batch_size: PositiveInt = 64
    read_num_cpus: PositiveFloat = 0.25
    shuffle: ShuffleMode = "shards"
    deterministic: bool = True
