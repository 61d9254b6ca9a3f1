"""The HTTP API's request: its JSON checked field by field against the bounds of the Serve
config, and every way a request can be bad turned into a 4xx that names the field.

No Ray here: the ingress calls `parse_generate(raw_body, limits)` and gets a checked
`GenerateRequest` (defaults filled in) or a `RequestError` (status, field, message). Steps are
checked by `adm.stage.check_steps`, as the sampling job checks them: what a request may ask
for is what `adm.diffusion.sample` can space over the base model's own chain.

Fields that are keyword arguments of `adm.diffusion.sample` say so in their metadata
(`json_schema_extra={"sample_arg": NAME}`): `GenerateRequest.sample_args()` collects them, the
sampler deployment batches together the requests whose sample_args are equal, and passes them
to `sample(**sample_args)`. A new sampling knob is one such field.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, \
    field_validator, model_validator

from ..checkpoints import ModelSpec
from ..diffusion import LOGSNR_MIN
from ..diffusion.deepcache import MAX_CACHE_INTERVAL
from ..diffusion.interval import check_interval
from ..diffusion.quality import QualityName, with_quality
from ..diffusion.spacing import DEFAULT_SPACING
from ..stage import check_steps

SAMPLE_ARG = "sample_arg"  # field metadata key: the `adm.diffusion.sample` keyword it feeds
MAX_SEED = 2**53 - 1  # exact in a JavaScript number, so the page can show and resend it
# lambda_min's bounds: -20 is below the last step of any ADM chain (cosine: -9.9 at t = 999,
# linear: -5.1), so it means the whole chain; above 0 nothing of the image would be left to form.
LAMBDA_MIN_RANGE = (-20.0, 0.0)
LAMBDA_MAX_BOUND = 20.0  # above the first step of any ADM chain (cosine: 5.1, linear: 4.6)


@dataclass(frozen=True)
class Limits:
    """The request bounds and defaults of one application (from its config and models)."""

    max_images: int
    max_steps: int
    samplers: tuple
    max_guidance_scale: float
    max_cfg_scale: float
    max_body_bytes: int
    num_classes: int
    class_names: tuple | None
    base: ModelSpec  # the base model: a request's steps must respace its chain
    has_classifier: bool
    has_null_class: bool  # the base was trained with label dropout: cfg_scale != 1 works
    has_upsampler: bool
    default_sampler: str
    default_steps: int
    default_guidance_scale: float
    max_previews: int = 10  # previews per streamed request
    engine: bool = True  # the step engine schedules (else whole requests are batched)

    @classmethod
    def of(cls, loaded) -> "Limits":
        """From an `adm.serve.settings.Loaded`."""
        s = loaded.settings
        return cls(s.max_images, min(s.max_steps, loaded.diffusion_steps), tuple(s.samplers),
                   s.max_guidance_scale, s.max_cfg_scale, s.max_body_bytes, loaded.num_classes,
                   tuple(loaded.classes) if loaded.classes else None, loaded.base,
                   loaded.classifier is not None,
                   float(loaded.base.flags.get("class_dropout_prob", 0.0)) > 0,
                   loaded.upsampler is not None,
                   s.default_sampler, s.default_steps, loaded.guidance_scale, s.max_previews,
                   s.scheduling == "step")


class RequestError(Exception):
    """A bad request: HTTP `status`, the `field` at fault ("body" for the whole) and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def payload(self) -> dict:
        return {"detail": str(self), "errors": [{"field": self.field, "message": self.message}]}


def _limits(info: ValidationInfo) -> Limits:
    if not isinstance(info.context, Limits):
        raise TypeError("GenerateRequest is validated with context=Limits")
    return info.context


class GenerateRequest(BaseModel):
    """POST /v1/generate. Strict JSON types (no "3" for 3, no true for 1), no unknown fields,
    finite numbers only; bounds from the config (`Limits`, the validation context)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    class_id: int | None = Field(None, ge=0, description="class index; or give class_name")
    class_name: str | None = Field(None, min_length=1, max_length=256,
                                   description="a name of GET /v1/models' class_names")
    num_images: int = Field(1, ge=1, description="images of this class, at most max_images")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False,
                                         description="classifier guidance scale s",
                                         json_schema_extra={SAMPLE_ARG: "classifier_scale"})
    guidance_interval: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="[lo, hi]: classifier guidance only at the steps whose noise level "
                    "sigma = sqrt((1 - alpha_bar) / alpha_bar) is in (lo, hi] (e.g. [0.28, "
                    "5.42]); default: every step",
        json_schema_extra={SAMPLE_ARG: "guidance_interval"})
    cfg_scale: float = Field(1.0, ge=0, allow_inf_nan=False,
                             description="classifier-free guidance w (1 = off)",
                             json_schema_extra={SAMPLE_ARG: "cfg_scale"})
    sampler: str | None = Field(None, description="one of the config's samplers",
                                json_schema_extra={SAMPLE_ARG: "sampler"})
    steps: int | None = Field(None, ge=1, description="base sampling steps",
                              json_schema_extra={SAMPLE_ARG: "steps"})
    lambda_min: float | None = Field(
        None, ge=LAMBDA_MIN_RANGE[0], le=LAMBDA_MIN_RANGE[1], allow_inf_nan=False,
        description="dpmpp_2m, dpmpp_3m, unipc: the log-SNR where the grid starts (default "
                    "-5.1)",
        json_schema_extra={SAMPLE_ARG: "lambda_min"})
    cache_interval: int | None = Field(
        None, ge=1, le=MAX_CACHE_INTERVAL,
        description="deep-feature reuse (DeepCache): the full U-Net at every k-th model call, "
                    "its full-resolution blocks only in between (1 = off, the default)",
        json_schema_extra={SAMPLE_ARG: "cache_interval"})
    quality: QualityName = Field(
        "default", description="fast: the sampler, steps, lambda_min, lambda_max, "
                               "guidance_interval and cache_interval left out come from the "
                               "fastest preset that matched DDIM-25's FID")
    lambda_max: float | None = Field(
        None, ge=LAMBDA_MIN_RANGE[0], le=LAMBDA_MAX_BOUND, allow_inf_nan=False,
        description="dpmpp_2m, dpmpp_3m, unipc: the log-SNR where the grid ends, above "
                    "lambda_min; the last call's x_0 prediction is the image (default: step 0)",
        json_schema_extra={SAMPLE_ARG: "lambda_max"})
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="same seed and settings give the same images")
    upsample: bool | None = Field(None, description="run the upsampler on the base images")
    response: Literal["png", "json"] = "png"
    stream: bool = Field(False, description="answer text/event-stream: queued, progress, "
                                            "preview, result (or error) events")
    preview_every: int | None = Field(None, ge=1, description="with stream: the current x_0 "
                                      "predictions every this many steps")
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="interactive rows take free slots first and pause batch "
                                   "rows; batch rows wait (never for ever)")

    @field_validator("class_id")
    @classmethod
    def _class_id(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = _limits(info).num_classes
        if v is not None and v >= n:
            raise ValueError(f"the model has {n} classes (0..{n - 1}); got {v}")
        return v

    @field_validator("class_name")
    @classmethod
    def _class_name(cls, v: str | None, info: ValidationInfo) -> str | None:
        names = _limits(info).class_names
        if v is not None and not names:
            raise ValueError("this model has no class names (no classes.json); give class_id")
        if v is not None and v not in names:
            raise ValueError(f"unknown class name {v[:64]!r} (GET /v1/models lists them)")
        return v

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, v: int, info: ValidationInfo) -> int:
        if v > _limits(info).max_images:
            raise ValueError(f"at most {_limits(info).max_images} per request (max_images); "
                             f"got {v}")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float | None, info: ValidationInfo) -> float | None:
        lim = _limits(info)
        if v is not None and v > lim.max_guidance_scale:
            raise ValueError(f"at most {lim.max_guidance_scale} (max_guidance_scale); got {v}")
        if v and not lim.has_classifier:
            raise ValueError("no classifier is loaded: only 0 (unguided) is possible")
        return v

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: list[float] | None) -> tuple[float, float] | None:
        try:  # a tuple: the request's sample arguments are its batching key
            return check_interval(v)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("guidance_interval ")) from None

    @field_validator("cfg_scale")
    @classmethod
    def _cfg(cls, v: float, info: ValidationInfo) -> float:
        lim = _limits(info)
        if v > lim.max_cfg_scale:
            raise ValueError(f"at most {lim.max_cfg_scale} (max_cfg_scale); got {v}")
        if v != 1.0 and not lim.has_null_class:
            raise ValueError("the base model was not trained with label dropout "
                             "(class_dropout_prob): only 1 (off) is possible")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v not in _limits(info).samplers:
            raise ValueError(f"{v[:32]!r} is not one of {', '.join(_limits(info).samplers)}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v > _limits(info).max_steps:
            raise ValueError(f"at most {_limits(info).max_steps} (max_steps); got {v}")
        return v

    @field_validator("upsample")
    @classmethod
    def _upsample(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        if v and not _limits(info).has_upsampler:
            raise ValueError("no upsampler is loaded")
        return v

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> "GenerateRequest":
        """One class, and the config's defaults for what the request leaves out."""
        lim = _limits(info)
        if (self.class_id is None) == (self.class_name is None):
            raise ValueError("class_id or class_name: give exactly one of them")
        if self.class_id is None:
            self.class_id = lim.class_names.index(self.class_name)
        if self.guidance_scale is None:
            self.guidance_scale = lim.default_guidance_scale
        preset = self.quality != "default"
        chosen = with_quality(self.quality, bool(self.guidance_scale), sampler=self.sampler,
                              steps=self.steps, lambda_min=self.lambda_min,
                              lambda_max=self.lambda_max,
                              guidance_interval=self.guidance_interval,
                              cache_interval=self.cache_interval)
        if preset and chosen["sampler"] not in lim.samplers:
            raise ValueError(f"quality: the {self.quality} preset samples with "
                             f"{chosen['sampler']}, which is not one of this server's samplers "
                             f"({', '.join(lim.samplers)})")
        if preset and chosen["steps"] > lim.max_steps:
            raise ValueError(f"quality: the {self.quality} preset's {chosen['steps']} steps "
                             f"exceed max_steps ({lim.max_steps})")
        self.sampler, self.steps, self.lambda_min, self.lambda_max = (
            chosen["sampler"], chosen["steps"], chosen["lambda_min"], chosen["lambda_max"])
        self.guidance_interval = chosen["guidance_interval"]
        self.cache_interval = chosen["cache_interval"]
        if self.sampler is None:
            self.sampler = lim.default_sampler
        if self.steps is None:
            self.steps = lim.default_steps
        if self.upsample is None:
            self.upsample = lim.has_upsampler
        if self.guidance_interval is not None and not self.guidance_scale:
            raise ValueError("guidance_interval: limits classifier guidance, which this request "
                             "does not use (guidance_scale 0)")
        if DEFAULT_SPACING[self.sampler] == "logsnr":
            self.lambda_min = LOGSNR_MIN if self.lambda_min is None else self.lambda_min
        elif self.lambda_min is not None:
            raise ValueError(f"lambda_min: sets where dpmpp_2m's log-SNR grid starts; the "
                             f"{self.sampler} sampler takes none")
        if self.lambda_max is not None:
            if DEFAULT_SPACING[self.sampler] != "logsnr":
                raise ValueError(f"lambda_max: sets where dpmpp_2m's log-SNR grid ends; the "
                                 f"{self.sampler} sampler takes none")
            if not self.lambda_max > self.lambda_min:
                raise ValueError(f"lambda_max: {self.lambda_max} is not above lambda_min "
                                 f"({self.lambda_min})")
        # A ConfigError is a ValueError: pydantic reports it, "steps: ..." names the field.
        check_steps("steps", lim.base, self.sampler, self.steps, None, self.lambda_min,
                    self.lambda_max)
        if self.stream and not lim.engine:
            raise ValueError("stream: needs the step engine (the server's scheduling is "
                             "'request')")
        if self.preview_every is not None:
            if not self.stream:
                raise ValueError("preview_every: previews come as events: set stream: true")
            if self.steps // self.preview_every > lim.max_previews:
                raise ValueError(f"preview_every: {self.steps} steps every "
                                 f"{self.preview_every} is {self.steps // self.preview_every} "
                                 f"previews; at most {lim.max_previews} (max_previews)")
        return self

    def sample_args(self) -> dict:
        """The `adm.diffusion.sample` keywords this request sets (its batching key too)."""
        return {f.json_schema_extra[SAMPLE_ARG]: getattr(self, name)
                for name, f in type(self).model_fields.items()
                if isinstance(f.json_schema_extra, dict) and SAMPLE_ARG in f.json_schema_extra}

    def settings(self) -> dict:
        """What decided the images (returned with them)."""
        return self.model_dump(exclude={"response", "stream", "preview_every", "priority"})


def _describe(errors: list[dict]) -> RequestError:
    """A pydantic error list as one 422 naming each field."""
    items = []
    for e in errors:
        field = ".".join(str(p) for p in e["loc"]) or "body"
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"] and ":" in msg:  # a model-level check names its field(s) itself
            field, msg = (part.strip() for part in msg.split(":", 1))
        items.append({"field": field, "message": msg})
    err = RequestError(422, items[0]["field"], items[0]["message"])
    err.args = ("; ".join(f"{i['field']}: {i['message']}" for i in items),)
    err.items = items
    return err


def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object, or a RequestError (400 malformed, 422 not an object)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge int literals
        reason = str(e).splitlines()[0][:200] if not isinstance(e, RecursionError) else \
            "nested too deeply"
        raise RequestError(400, "body", f"malformed JSON ({reason})") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"expected a JSON object, got {type(data).__name__}")
    return data


def parse_generate(raw: bytes, limits: Limits) -> GenerateRequest:
    """A checked request with defaults filled in, or a RequestError naming the field."""
    if len(raw) > limits.max_body_bytes:
        raise body_too_large(len(raw), limits)
    data = parse_json_object(raw)
    try:
        return GenerateRequest.model_validate(data, context=limits)
    except ValidationError as e:
        raise _describe(e.errors()) from None


def body_too_large(size: int, limits: Limits, at_least: bool = False) -> RequestError:
    size_text = f"{'at least ' if at_least else ''}{size} bytes"
    return RequestError(413, "body", f"{size_text} exceed max_body_bytes "
                                     f"({limits.max_body_bytes})")


def check_content_type(header: str | None) -> None:
    """A JSON body, or none declared: anything else is a 415 that names what came."""
    media_type = (header or "").split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError(415, "content-type", f"expected application/json, got "
                                                f"{media_type[:100]!r}")


def api_key_from(environ, name: str, required: bool) -> str | None:
    """The API key in the environment variable `name` (None when unset or empty). A server
    that must not run open (`required`: a public bind) refuses to start without one."""
    key = environ.get(name) or None
    if key is None and required:
        raise RuntimeError(f"require_api_key is set but ${name} is empty in the ingress "
                           f"replica's environment; set it on the Ray nodes")
    return key


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an Authorization header carries `Bearer <key>` (always True without a key)."""
    if not key:
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              key.encode())


def access(header: str | None, key: str | None, batch_key: str | None) -> str | None:
    """What an Authorization header may do: "all" (the API key, or no key is set), "batch"
    (the batch-only key: batch-class requests alone), or None (refused: 401)."""
    if not key and not batch_key:
        return "all"
    if key and authorized(header, key):
        return "all"
    if batch_key and authorized(header, batch_key):
        return "batch"
    return None


def check_priority(req: GenerateRequest, access_level: str) -> None:
    """A batch-only key's request runs as batch; asking for interactive with it is a 403."""
    if access_level == "batch":
        if "priority" in req.model_fields_set and req.priority != "batch":
            raise RequestError(403, "priority", "this API key may only make batch requests "
                                                "(priority: batch)")
        req.priority = "batch"
