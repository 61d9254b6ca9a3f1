"""What a Serve application is built from: the builder's arguments, typed and checked, and the
networks they name, resolved (file read, flags found, keys and shapes checked) before any
replica starts.

`serve run adm.serve:build_app base=URI ...` hands every argument over as a string; a config
file's `args:` hands YAML values. Both go through `ServeSettings.from_args` (`adm.config`'s
checked dataclasses), which converts them and names the argument on a bad value. A model file
that is not there fails here, at startup, with a message that names it and how to get it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping

from pydantic import BeforeValidator, Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from .. import checkpoints, factory, storage
from ..config import CompileSetting, ConfigError, SamplingPrecision, config_class, from_dict
from ..diffusion import SamplerName
from ..presets import preset
from ..stage import check_steps, preset_defaults

# Where guided-diffusion's README links its released checkpoints.
RELEASES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
DEFAULT_API_KEY_ENV = "ADM_SERVE_API_KEY"

# What a command line gives: "ddim,ddpm" for a list, "25" for a step count ("ddim25" stays text).
Samplers = Annotated[tuple[SamplerName, ...], Field(min_length=1), BeforeValidator(
    lambda v: tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str) else v)]
Scale = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Steps = Annotated[int | str, BeforeValidator(
    lambda v: int(v) if isinstance(v, str) and v.strip().isdigit() else v)]


@config_class(frozen=True)
class ServeSettings:
    """The builder's arguments. Model URIs are local paths or s3://; a released file needs
    its preset (flags), an exported one has flags.json (and classes.json) beside it."""

    base: str = ""  # the base diffusion model (required)
    base_preset: str | None = None
    classifier: str | None = None  # noisy-image classifier: guidance_scale > 0 needs it
    classifier_preset: str | None = None
    upsampler: str | None = None  # super-resolution stage: `upsample: true` needs it
    upsampler_preset: str | None = None
    how_to_get: str | None = None  # told when a model file is missing (e.g. "make quickstart")
    # Request bounds.
    max_images: PositiveInt = 4  # num_images per request
    max_steps: PositiveInt = 100  # base sampling steps per request
    samplers: Samplers = ("ddim", "ddpm")  # the samplers a request may ask for
    max_guidance_scale: Scale = 20.0
    max_cfg_scale: Scale = 10.0  # classifier-free guidance w (a base trained with label dropout)
    max_body_bytes: PositiveInt = 16384
    max_previews: NonNegativeInt = 10  # previews a streamed request may ask for (preview_every)
    # Defaults of a request that leaves a field out.
    default_sampler: SamplerName = "ddim"
    default_steps: PositiveInt = 25
    default_guidance_scale: float | None = None  # None: the preset's README scale, else 1.0
    # The upsampler stage is not a request setting: its sampler and steps are the server's.
    upsampler_sampler: SamplerName | None = None  # None: the preset's (README) sampler, else ddpm
    upsampler_steps: Steps | None = None  # None: the preset's respacing, else 25
    # Scheduling. "step": each model replica runs a step engine (adm.engine) with
    # `batch_rows` slots: every request's rows join the running model call at the next step and
    # leave when done, whatever their settings. "request": whole requests are batched (one
    # @serve.batch call takes up to `max_batch_requests` requests for up to `batch_wait_s`, and
    # runs each group of equal settings to the end; kept to compare, benchmarks/serve.py).
    # Either way every model call has exactly `batch_rows` rows (padded; a multiple of 4 keeps
    # CPU GEMMs from rounding a row by its position), so an image's arithmetic never depends on
    # what it was batched with.
    scheduling: Literal["step", "request"] = "step"
    max_wait_steps: NonNegativeInt = 500  # a waiting row ages after 4x its own chain's steps,
    #     or this many engine steps if sooner: it then goes first, and the oldest aged rows ...
    aged_share: Annotated[float, Field(gt=0, le=1)] = 0.5  # ... up to this share of the slots
    #     are never paused (adm.engine)
    max_batch_requests: PositiveInt = 8
    batch_wait_s: NonNegativeFloat = 0.05
    batch_rows: PositiveInt = 8
    upsampler_batch_rows: PositiveInt | None = None  # default: batch_rows
    precision: SamplingPrecision = "auto"  # autocast of the networks (auto: bf16 where the
    #     replica's device has it natively, a CPU with AVX-512 BF16 or AMX or a GPU of compute
    #     capability 8.0+, else fp16 on a GPU and fp32 on a CPU; each replica decides on its
    #     own device: adm.precision)
    compile: CompileSetting = "auto"  # torch.compile the networks at replica start (auto: off
    #     on every device until a GPU replica's cold and warm start are measured)
    gpus: bool = False  # one GPU per model replica (a config file sets ray_actor_options)
    api_key_env: str = DEFAULT_API_KEY_ENV  # the environment variable holding the API key
    batch_api_key_env: str | None = None  # one holding a key limited to batch-class requests
    require_api_key: bool = False  # refuse to start without a key (a public bind)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServeSettings":
        """Settings from builder arguments (strings from the CLI or YAML values); "", "none"
        and "null" mean None (the default) for an argument that may be None."""
        optional = {f.name for f in dataclasses.fields(cls) if f.default is None}
        values = {k: None if k in optional and isinstance(v, str)
                  and v.strip().lower() in ("", "none", "null") else v for k, v in args.items()}
        return from_dict(cls, values)

    def engine_options(self) -> dict:
        """The step engine's scheduling arguments (`adm.engine.Engine`)."""
        return {"max_wait_steps": self.max_wait_steps, "aged_share": self.aged_share}

    def __post_init__(self) -> None:
        """The checks across arguments that need no file (each argument's own bounds are in
        its annotation); a ConfigError names the argument."""
        if not self.base:
            raise ConfigError("base: the base model URI is required (base=URI)")
        if self.default_sampler not in self.samplers:
            raise ConfigError(f"default_sampler: {self.default_sampler!r} is not in samplers "
                              f"({', '.join(self.samplers)})")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps: {self.default_steps} exceeds max_steps "
                              f"{self.max_steps}")
        for name, uri in (("classifier_preset", self.classifier),
                          ("upsampler_preset", self.upsampler)):
            if getattr(self, name) and not uri:
                raise ConfigError(f"{name}: given without its model file "
                                  f"({name.replace('_preset', '')}=URI)")


@dataclass(frozen=True)
class Loaded:
    """The resolved networks and the stage settings the server fills in."""

    settings: ServeSettings
    base: checkpoints.ModelSpec
    classifier: checkpoints.ModelSpec | None
    upsampler: checkpoints.ModelSpec | None
    guidance_scale: float  # the default of a request that gives none
    upsampler_sampler: str | None
    upsampler_steps: str  # respacing spec of the upsampler stage ("" = its whole chain)
    classes: list | None = field(default=None, compare=False)  # class names, index = class id

    @property
    def num_classes(self) -> int:
        return checkpoints.num_classes(self.classifier or self.base)

    @property
    def diffusion_steps(self) -> int:
        """T of the base model's chain (the bound of any respacing)."""
        return int(self.base.flags.get("diffusion_steps",
                                       factory.DIFFUSION_DEFAULTS["diffusion_steps"]))

    def info(self) -> dict:
        """What GET /v1/models reports (JSON-ready)."""
        s = self.settings
        out = {
            "base": {"image_size": checkpoints.image_size(self.base), "preset": self.base.preset,
                     "sha256": self.base.sha256, "class_cond": checkpoints.is_class_cond(self.base),
                     "diffusion_steps": self.diffusion_steps},
            "classifier": None if self.classifier is None else {
                "image_size": checkpoints.image_size(self.classifier),
                "preset": self.classifier.preset, "sha256": self.classifier.sha256},
            "upsampler": None if self.upsampler is None else {
                "image_size": checkpoints.image_size(self.upsampler),
                "small_size": checkpoints.small_size(self.upsampler),
                "preset": self.upsampler.preset, "sha256": self.upsampler.sha256,
                "sampler": self.upsampler_sampler, "steps": self.upsampler_steps},
            "num_classes": self.num_classes,
            "class_names": self.classes,
            "limits": {"max_images": s.max_images, "max_steps": min(s.max_steps,
                                                                     self.diffusion_steps),
                       "samplers": list(s.samplers), "max_guidance_scale": s.max_guidance_scale,
                       "max_body_bytes": s.max_body_bytes, "max_previews": s.max_previews},
            "defaults": {"num_images": 1, "sampler": s.default_sampler,
                         "steps": s.default_steps, "guidance_scale": self.guidance_scale,
                         "upsample": self.upsampler is not None, "response": "png",
                         "priority": "interactive", "stream": False},
            "scheduling": s.scheduling,
        }
        return out


def _how_to_get(role: str, uri: str, preset_name: str | None, hint: str | None) -> str:
    if preset_name:
        return (f"download the released file {preset(preset_name).file} from guided-diffusion's "
                f"README ({RELEASES}{preset(preset_name).file}) to {uri}")
    if hint:
        return hint
    return ("train and export one (jobs/train_*.py, then jobs/export_checkpoint.py) and give "
            "its model.pt or model.safetensors, with flags.json beside it")


def _resolve(role: str, uri: str, preset_name: str | None, kind: str,
             hint: str | None) -> checkpoints.ModelSpec:
    """checkpoints.resolve, with a missing file named with how to get it."""
    if not storage.is_s3(uri) and not os.path.isfile(uri):
        raise ConfigError(f"{role}: model file {os.path.abspath(uri)} does not exist; "
                          f"{_how_to_get(role, uri, preset_name, hint)}")
    if storage.is_s3(uri) and not storage.is_file(uri):
        raise ConfigError(f"{role}: model file {uri} does not exist; "
                          f"{_how_to_get(role, uri, preset_name, hint)}")
    return checkpoints.resolve(role, uri, preset_name, kind)


def load_settings(settings: ServeSettings) -> Loaded:
    """Resolve and check every network of `settings` (reads the files; no Ray needed)."""
    hint = settings.how_to_get
    base = _resolve("base", settings.base, settings.base_preset, "diffusion", hint)
    classifier = upsampler = None
    if settings.classifier:
        classifier = _resolve("classifier", settings.classifier, settings.classifier_preset,
                              "classifier", hint)
        checkpoints.check_chain(base, classifier, None)
    up_sampler, up_steps = None, ""
    if settings.upsampler:
        upsampler = _resolve("upsampler", settings.upsampler, settings.upsampler_preset,
                             "upsampler", hint)
        checkpoints.check_chain(base, None, upsampler)
        up_sampler, steps, _ = preset_defaults(upsampler, settings.upsampler_sampler,
                                               settings.upsampler_steps, unset_steps=25)
        up_steps = steps if isinstance(steps, str) else (
            f"ddim{steps}" if up_sampler == "ddim" else str(steps))
        check_steps("upsampler_steps", upsampler, up_sampler, up_steps)
    scale = preset_defaults(base, classifier_scale=settings.default_guidance_scale,
                            guided=classifier is not None).classifier_scale
    if scale and classifier is None:
        raise ConfigError(f"default_guidance_scale: {scale} needs a classifier (classifier=URI)")
    if not 0 <= scale <= settings.max_guidance_scale:
        raise ConfigError(f"default_guidance_scale: {scale} is outside 0..max_guidance_scale "
                          f"({settings.max_guidance_scale})")
    check_steps("default_steps", base, settings.default_sampler, settings.default_steps)
    names = base.classes or (classifier.classes if classifier else None)
    return Loaded(settings, base, classifier, upsampler, float(scale), up_sampler, up_steps,
                  list(names) if names else None)
