"""The training config: one YAML file per run, four sections, checked before any worker starts.

    kind: diffusion            # diffusion | classifier | upsampler
    model: {preset: 128x128_diffusion, flags: {use_checkpoint: true}}
    data: {uri: s3://bucket/imagenet/train, val_uri: s3://bucket/imagenet/val}
    optim: {batch_size: 256, lr: 1.0e-4, ema_rate: [0.9999], precision: bf16}
    run: {name: adm128, storage: s3://bucket/runs, num_workers: 8, use_gpu: true}

Model flags are guided-diffusion's (`adm.factory`); a preset supplies the released
model's flags and `flags` overrides them, so the ImageNet configs never type a model twice.
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import BeforeValidator, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from .. import factory
from ..config import (ConfigError, Location, OptionalLocation, Precision, apply_overrides,
                      config_class, from_dict, load_yaml)
from ..data.config import DataConfig
from ..nodetypes import check_resources

Kind = Literal["diffusion", "classifier", "upsampler"]
# The flags each kind's model and diffusion are built from (the reference's
# `*_and_diffusion_defaults`, plus adm's extensions); `model.flags` takes these only.
FLAG_NAMES = {
    "diffusion": frozenset(factory.MODEL_DEFAULTS) | frozenset(factory.DIFFUSION_DEFAULTS),
    "upsampler": (frozenset(factory.MODEL_DEFAULTS) - {"image_size"})
    | frozenset(factory.SUPERRES_DEFAULTS) | frozenset(factory.DIFFUSION_DEFAULTS),
    "classifier": frozenset(factory.CLASSIFIER_DEFAULTS) | frozenset(factory.DIFFUSION_DEFAULTS),
}
# Where a training flag of the reference's scripts lives in this config.
TRAINING_FLAG_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay",
                      "lr_anneal_steps": "optim.lr_anneal_steps", "batch_size": "optim.batch_size",
                      "microbatch": "optim.microbatch", "ema_rate": "optim.ema_rate",
                      "schedule_sampler": "optim.schedule_sampler", "noised": "optim.noised",
                      "iterations": "optim.max_steps", "log_interval": "run.log_interval",
                      "save_interval": "run.save_interval", "eval_interval": "run.eval_interval",
                      "resume_checkpoint": "run.init_from", "data_dir": "data.uri",
                      "val_data_dir": "data.val_uri"}
# `ema_rate: 0.9999` in YAML is a list of one rate (the reference's flag is a comma list).
Rate = Annotated[float, Field(gt=0, lt=1)]
Rates = Annotated[list[Rate], Field(min_length=1),
                  BeforeValidator(lambda v: v if isinstance(v, (list, tuple)) else [v])]


@config_class
class ModelSection:
    preset: str | None = None  # a released checkpoint's preset (adm.presets) to take flags from
    flags: dict = field(default_factory=dict)  # guided-diffusion flags, over the preset's


@config_class
class OptimSection:
    batch_size: PositiveInt = 256  # global batch, split evenly across workers
    microbatch: int = -1  # per-worker microbatch for gradient accumulation (-1: none)
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    lr_anneal_steps: int = 0  # anneal lr linearly to 0 over this many steps (0: constant)
    ema_rate: Rates = field(default_factory=lambda: [0.9999])
    # Warm the EMAs up (decay min(rate, (1+n)/(10+n)) at update n, adm.train.ema) instead of
    # the reference's fixed rate from step 1: for runs too short for the rate (the quickstart).
    ema_warmup: bool = False
    schedule_sampler: Literal["uniform", "loss-second-moment"] = "uniform"
    precision: Precision = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler)
    grad_clip: NonNegativeFloat = 0.0  # clip the global grad norm to this (0: off)
    max_steps: PositiveInt = 1000
    noised: bool = True  # classifier: train on x_t at uniformly drawn t (else on x_0, t=0)
    max_nonfinite_in_row: int = 20  # stop after this many skipped non-finite steps in a row


@config_class
class RunSection:
    name: str = "run"
    storage: Location = "runs"  # local folder or s3:// URI; the run lives in <storage>/<name>
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Custom Ray resources each worker asks for besides CPU/GPU: {adm_train: 1} keeps the
    # workers on cluster.yaml's training nodes (nodetypes.TRAIN_RESOURCE); none on a laptop.
    resources: dict[str, float] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # the worker group's
    log_interval: PositiveInt = 10
    save_interval: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    eval_interval: int = 100  # classifier: held-out accuracy every N steps (0: off)
    eval_batches: int = 4
    seed: int = 0
    init_from: OptionalLocation = None  # a released-format state dict to start from (fine-tuning)


@config_class
class TrainConfig:
    """A training run; constructing one checks it (`check`), so a TrainConfig is valid."""

    kind: Kind
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def model_flags(self) -> dict:
        """The flags that build this run's model and its diffusion, and nothing else (what
        `flags.json` records): the preset's, overridden by `model.flags`, with the reference
        defaults filled in."""
        names = FLAG_NAMES[self.kind]
        base = {}
        if self.model.preset:
            from ..presets import preset

            base = {k: v for k, v in preset(self.model.preset).model_flags.items() if k in names}
        return {k: v for k, v in factory.parse_flags({**base, **self.model.flags}).items()
                if k in names}

    @property
    def image_size(self) -> int:
        flags = self.model_flags
        return flags["large_size"] if self.kind == "upsampler" else flags["image_size"]

    @property
    def per_worker_batch(self) -> int:
        return self.optim.batch_size // self.run.num_workers

    def __post_init__(self) -> None:
        check(self)


def check(cfg: TrainConfig) -> None:
    """Check what spans keys and what needs the model, without data or workers (each key's
    own bounds are in its annotation); errors name the key. Runs once per TrainConfig, when it
    is built (it builds the model on the meta device)."""
    o, r = cfg.optim, cfg.run
    if o.batch_size % r.num_workers:
        raise ConfigError(f"optim.batch_size: {o.batch_size} is not divisible by "
                          f"run.num_workers={r.num_workers}")
    if o.microbatch != -1 and (o.microbatch < 1 or cfg.per_worker_batch % o.microbatch):
        raise ConfigError(f"optim.microbatch: {o.microbatch} must divide the per-worker batch "
                          f"{cfg.per_worker_batch}")
    if not cfg.data.uri:
        raise ConfigError("data.uri: no training shards given (set it or pass --data)")
    check_resources(r.resources, "run.resources")
    _check_flags(cfg)
    try:  # the model must build from its flags (on the meta device: no memory, no time)
        with torch.device("meta"):
            build_model(cfg)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def _check_flags(cfg: TrainConfig) -> None:
    """`model.flags` holds model and diffusion flags of this kind only, and its fp16 flag
    agrees with `optim.precision` (one setting decides how the step runs)."""
    names = FLAG_NAMES[cfg.kind]
    for key in sorted(set(cfg.model.flags) - names):
        where = TRAINING_FLAG_KEYS.get(key)
        hint = f"; set {where} instead" if where else ""
        raise ConfigError(f"model.flags.{key}: not a model or diffusion flag of a {cfg.kind} "
                          f"model{hint}")
    try:
        flags = cfg.model_flags
    except ValueError as e:  # factory.FlagError
        raise ConfigError(f"model.flags: {e}") from None
    fp16_flag = "classifier_use_fp16" if cfg.kind == "classifier" else "use_fp16"
    if flags[fp16_flag] and cfg.optim.precision != "fp16":
        source = f"the preset {cfg.model.preset}" if fp16_flag not in cfg.model.flags and \
            cfg.model.preset else "model.flags"
        raise ConfigError(
            f"model.flags.{fp16_flag}: True (from {source}) runs the model in float16, but "
            f"optim.precision is {cfg.optim.precision!r}; float16 training needs loss scaling: "
            f"set optim.precision: fp16, or model.flags.{fp16_flag}: false")


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The run's model, random weights, built from its flags."""
    return factory.BUILDERS[cfg.kind](cfg.model_flags)


def load_config(path: str, overrides: Sequence[str] = (), **replacements: Any) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, then the command line's own options
    (`run__num_workers=4`, ...: `section__key`, None = not given; see `jobs/train_*.py`), and
    build (= check) the TrainConfig once."""
    raw = apply_overrides(load_yaml(path), overrides)
    for dotted, value in replacements.items():
        if value is not None:
            section, key = dotted.split("__")
            raw[section] = {**(raw.get(section) or {}), key: value}
    return from_dict(TrainConfig, raw)
