"""The settings of a sampling run (`jobs/sample.py`), from YAML, `key=value` overrides and the
command line (which wins), checked when built (`adm.config`).

Settings fall in two groups. `DECISIVE` ones decide the samples: a rerun into the same `out`
must repeat them exactly (the run refuses otherwise, naming the first that differs). The rest
only decide how fast they come: batch sizes, workers, CPUs or GPUs — by design, since each
sample's randomness comes from (seed, index) alone (`adm.diffusion.seeds.index_seeds`).
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Sequence

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from ..config import (CompileSetting, ConfigError, Location, SamplingPrecision,
                      apply_overrides, config_class, from_dict, load_yaml)
from ..diffusion import SamplerName, SpacingName
from ..diffusion.deepcache import MAX_CACHE_INTERVAL
from ..diffusion.interval import check_interval
from ..diffusion.quality import QualityName
from ..nodetypes import check_resources


@config_class(frozen=True)
class SampleConfig:
    """One sampling run. `None` means "the preset's (README) default, else the model's own"."""

    model: str = ""  # state-dict URI of the base model (required)
    model_preset: str | None = None  # flags (and sampling defaults) of a released file
    classifier: str | None = None  # state-dict URI of a noisy-image classifier: guidance
    classifier_preset: str | None = None
    classifier_scale: float | None = None  # the paper's s; needs a classifier
    # Guide only at the steps whose noise level sigma = sqrt((1 - abar) / abar) is in (lo, hi]
    # (Kynkaanniemi et al. 2024; adm.diffusion.interval); None: every step.
    guidance_interval: tuple[float, float] | None = None
    # Stage 1's deep-feature reuse (DeepCache; adm.diffusion.deepcache): the full U-Net at every
    # k-th model call, its full-resolution blocks only in between; 1 = off.
    cache_interval: Annotated[int | None, Field(ge=1, le=MAX_CACHE_INTERVAL)] = None  # None: 1,
    #                                   or the quality preset's
    # "fast": the sampler, steps, grid ends, guidance interval and cache_interval left unset
    # come from the fastest preset that matched DDIM-25's FID (adm.diffusion.quality); the
    # default sets nothing.
    quality: QualityName = "default"
    upsampler: str | None = None  # state-dict URI of an upsampler: stage 2
    upsampler_preset: str | None = None
    upsampler_steps: int | str | None = None  # stage 2 respacing (int: 'ddimN' or 'N')
    upsampler_sampler: SamplerName | None = None
    sampler: SamplerName | None = None  # stage 1
    steps: int | str | None = None  # stage 1: 25 (spaced per `timesteps`), "250", "ddim25"
    timesteps: SpacingName | None = None  # how an int `steps` is spaced; None: the sampler's own
    #                                   (ddimN, N, log-SNR for dpmpp_*)
    # Where a log-SNR grid starts (None: -5.1; -inf: step T), a log-SNR of at most 20.
    lambda_min: Annotated[float | None, Field(le=20)] = None
    # Where it ends (None: step 0; the sample is the last call's x_0 prediction), above it.
    lambda_max: Annotated[float | None, Field(le=20)] = None
    # Classifier-free guidance w of stage 1 (1 = off).
    cfg_scale: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    eta: NonNegativeFloat = 0.0  # DDIM's eta, for the stages that sample with DDIM
    num_samples: PositiveInt = 10000
    classes: str = "uniform"  # "uniform", "balanced" or a list "3,7,9" (ids or class names)
    seed: int = 0
    precision: SamplingPrecision = "auto"  # autocast of the networks; auto: bf16 where the
    #     stage's device has it natively (a CPU with AVX-512 BF16 or AMX, a GPU of compute
    #     capability 8.0+), else fp16 on a GPU and fp32 on a CPU (adm.precision); decided on
    #     the stage's own device when the run starts, recorded in settings.json for resumes
    compile: CompileSetting = "auto"  # torch.compile the networks; auto: when a stage makes
    #                                 enough model calls per actor to pay for it
    clip_denoised: bool = True
    shard_size: PositiveInt = 1000  # samples per shard file (the unit of resumption)
    out: Location = "samples"  # output folder, local or s3://
    batch_size: PositiveInt = 16  # stage 1 rows per model call
    upsampler_batch_size: PositiveInt | None = None  # stage 2 rows per call (default batch_size)
    num_workers: PositiveInt = 1  # stage 1 actors
    upsampler_workers: PositiveInt | None = None  # stage 2 actors (default num_workers)
    gpus: bool = False  # one GPU per actor
    cpus_per_worker: PositiveFloat = 1.0  # logical CPUs each actor reserves
    # Custom Ray resources each actor asks for: {adm_batch: 1} keeps them on cluster.yaml's
    # batch nodes (nodetypes.BATCH_RESOURCE); none on a laptop.
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_numbers(self)


DECISIVE = ("model", "model_preset", "classifier", "classifier_preset", "classifier_scale",
            "upsampler", "upsampler_preset", "upsampler_steps", "upsampler_sampler", "sampler",
            "steps", "timesteps", "lambda_min", "cfg_scale", "eta", "num_samples", "classes",
            "seed",
            "precision", "compile", "clip_denoised", "shard_size")


def load_sample_config(config: str | None, overrides: Sequence[str] = (), **cli: Any
                       ) -> SampleConfig:
    """The run's settings: the YAML file (if any), then `key=value` overrides, then the
    command line's options that were given (`cli`, None = not given)."""
    data = load_yaml(config) if config else {}
    data = apply_overrides(data, overrides)
    data.update({k: v for k, v in cli.items() if v is not None})
    return from_dict(SampleConfig, data)


def check_numbers(cfg: SampleConfig) -> None:
    """The checks that need no file and are not one setting's bounds (those are in the
    annotations), run when a SampleConfig is built: a ConfigError naming the setting."""
    if not cfg.model:
        raise ConfigError("model: a base model URI is required (--model)")
    check_resources(cfg.resources, "resources")
    if cfg.classifier_scale is not None and not cfg.classifier and not cfg.classifier_preset:
        raise ConfigError("classifier_scale: given without a classifier (--classifier URI)")
    if cfg.guidance_interval is not None:
        if not cfg.classifier:
            raise ConfigError("guidance_interval: given without a classifier (--classifier URI)")
        try:
            check_interval(cfg.guidance_interval)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.classifier_preset and not cfg.classifier:
        raise ConfigError("classifier_preset: given without a classifier file (--classifier)")
    if cfg.upsampler_preset and not cfg.upsampler:
        raise ConfigError("upsampler_preset: given without an upsampler file (--upsampler)")
    for name in ("upsampler_steps", "upsampler_sampler", "upsampler_batch_size",
                 "upsampler_workers"):
        if getattr(cfg, name) is not None and not cfg.upsampler:
            raise ConfigError(f"{name}: given without an upsampler (--upsampler URI)")


def decisive(cfg: SampleConfig) -> dict:
    """The settings that decide the samples, as a JSON-ready dict. `guidance_interval`,
    `cache_interval`, `lambda_max` and `quality` only when set, so that runs recorded before
    they existed resume."""
    out = {name: getattr(cfg, name) for name in DECISIVE}
    if cfg.guidance_interval is not None:
        out["guidance_interval"] = list(cfg.guidance_interval)
    if cfg.cache_interval is not None:
        out["cache_interval"] = cfg.cache_interval
    if cfg.lambda_max is not None:
        out["lambda_max"] = cfg.lambda_max
    if cfg.quality != "default":
        out["quality"] = cfg.quality
    return out
