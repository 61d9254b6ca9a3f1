"""From settings to a checked plan: every network resolved and fitted to its file, the README
defaults of presets filled in, and every bad setting refused (naming it) before any work.

`precision: auto` is not decided here, on the machine that plans (a laptop or a CPU-only head
may plan for GPU workers): a fresh run leaves it "auto" until `generate` asks the stage's own
device (`adm.generate.pipeline.ask_device`) and records the answer in settings.json; a resume
takes the recorded answer and never asks again, so its samples have the bytes of the first
run's wherever it is resumed from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .. import checkpoints, storage
from ..config import ConfigError
from ..diffusion.quality import with_quality
from ..precision import AUTOCAST
from ..stage import check_steps, preset_defaults, resolve_compile, stage_calls
from . import output
from .config import SampleConfig, decisive
from .labels import parse_classes


@dataclass(frozen=True)
class StagePlan:
    """One stage: `net` sampled with `sampler` over `steps` (an int count spaced as
    `timesteps` says, a respacing string, "" = the whole chain; see
    `adm.diffusion.sampling_diffusion`), guided by `classifier` at `classifier_scale` when
    given and classifier-free at `cfg_scale`; `batch_size` rows per model call, `workers`
    actors; noise from the sample's `stream` (see index_seeds)."""

    net: checkpoints.ModelSpec
    sampler: str
    steps: int | str
    stream: str
    batch_size: int
    workers: int
    classifier: checkpoints.ModelSpec | None = None
    classifier_scale: float = 0.0
    timesteps: str | None = None
    cfg_scale: float = 1.0
    lambda_min: float | None = None
    guidance_interval: tuple[float, float] | None = None
    precision: str = "fp32"  # a key of AUTOCAST; "auto" until the stage's device decides it
    compile: bool = False
    cache_interval: int = 1
    lambda_max: float | None = None

    def settings(self) -> dict:
        return {"net": self.net.settings(), "sampler": self.sampler, "steps": self.steps,
                "timesteps": self.timesteps, "lambda_min": self.lambda_min,
                "stream": self.stream, "precision": self.precision, "compile": self.compile,
                "classifier": self.classifier.settings() if self.classifier else None,
                "classifier_scale": self.classifier_scale, "cfg_scale": self.cfg_scale,
                # (runs recorded before these existed resume)
                **({} if self.guidance_interval is None
                   else {"guidance_interval": list(self.guidance_interval)}),
                **({} if self.cache_interval == 1 else {"cache_interval": self.cache_interval}),
                **({} if self.lambda_max is None else {"lambda_max": self.lambda_max})}


@dataclass(frozen=True)
class Plan:
    cfg: SampleConfig
    base: StagePlan
    upsampler: StagePlan | None
    classes: str | tuple
    num_classes: int
    decided_on: str | None = None  # the device that decided precision "auto", when one did

    @property
    def chained(self) -> bool:
        return self.upsampler is not None

    @property
    def undecided(self) -> bool:
        """True while a stage's precision is still "auto" (a fresh run before it starts)."""
        return any(s is not None and s.precision == "auto" for s in (self.base, self.upsampler))

    def decide(self, precision: str, device: str) -> "Plan":
        """This plan with every undecided stage at `precision`, the answer of `device` (a
        description, recorded with how the run was executed)."""
        if precision not in AUTOCAST:
            raise ValueError(f"precision {precision!r} is not one of {sorted(AUTOCAST)}")

        def decided(stage: StagePlan | None) -> StagePlan | None:
            if stage is None or stage.precision != "auto":
                return stage
            return replace(stage, precision=precision)

        return replace(self, base=decided(self.base), upsampler=decided(self.upsampler),
                       decided_on=device)

    def decisive(self) -> dict:
        """What decides the samples (settings.json's "decisive")."""
        return {"settings": decisive(self.cfg), "base": self.base.settings(),
                "upsampler": self.upsampler.settings() if self.upsampler else None,
                "classes": list(self.classes) if not isinstance(self.classes, str)
                else self.classes, "num_classes": self.num_classes}

    def execution(self) -> dict:
        """How this run was executed (recorded, not compared)."""
        out = {k: v for k, v in asdict(self.cfg).items() if k not in decisive(self.cfg)}
        if self.decided_on is not None:
            out["precision_decided_on"] = self.decided_on
        return out


def recorded_precisions(out: str) -> dict[str, str]:
    """Stage name ("base", "upsampler") -> the precision a run under `out` recorded for it
    (settings.json); empty for a fresh `out`."""
    uri = storage.join(out, output.SETTINGS)
    if not storage.is_file(uri):
        return {}
    recorded = storage.read_json(uri).get("decisive", {})
    return {name: stage["precision"] for name in ("base", "upsampler")
            if isinstance(stage := recorded.get(name), dict)
            and stage.get("precision") in AUTOCAST}


def _precision(setting: str, recorded: str | None) -> str:
    """A stage's precision: as set; for "auto", what a run under the same `out` recorded
    (a resume), else "auto" (decided on the stage's device when the run starts)."""
    return recorded if setting == "auto" and recorded is not None else setting


def make_plan(cfg: SampleConfig) -> Plan:
    """Resolve the run and check what needs its files (`cfg` checked itself when built); a
    ConfigError names the first bad setting."""
    base = checkpoints.resolve("model", cfg.model, cfg.model_preset, "diffusion")
    chosen = with_quality(cfg.quality, bool(cfg.classifier), sampler=cfg.sampler,
                          steps=cfg.steps, lambda_min=cfg.lambda_min, lambda_max=cfg.lambda_max,
                          guidance_interval=cfg.guidance_interval,
                          cache_interval=cfg.cache_interval)
    sampler, steps, scale = preset_defaults(base, chosen["sampler"], chosen["steps"],
                                            cfg.classifier_scale, guided=bool(cfg.classifier))
    lambda_min, lambda_max = chosen["lambda_min"], chosen["lambda_max"]
    check_steps("steps", base, sampler, steps, cfg.timesteps, lambda_min, lambda_max)
    if cfg.cfg_scale != 1.0 and not float(base.flags.get("class_dropout_prob", 0.0)) > 0:
        raise ConfigError(f"cfg_scale: {cfg.cfg_scale} needs a model trained with label "
                          f"dropout (class_dropout_prob > 0); {cfg.model} was not")

    classifier = None
    if cfg.classifier:
        classifier = checkpoints.resolve("classifier", cfg.classifier, cfg.classifier_preset,
                                         "classifier")
        checkpoints.check_chain(base, classifier, None)

    guide = classifier if classifier is not None else base
    num_classes = checkpoints.num_classes(guide)
    classes = parse_classes(cfg.classes, num_classes, base.classes or
                            (classifier.classes if classifier else None))

    recorded = recorded_precisions(cfg.out)
    calls = stage_calls(base, sampler, steps, cfg.timesteps, lambda_min, cfg.num_samples,
                        cfg.batch_size, cfg.num_workers, lambda_max)
    stage1 = StagePlan(base, sampler, steps, "base", cfg.batch_size, cfg.num_workers,
                       classifier, scale, cfg.timesteps, cfg.cfg_scale, lambda_min,
                       chosen["guidance_interval"] if scale > 0 else None,
                       _precision(cfg.precision, recorded.get("base")),
                       resolve_compile(cfg.compile, calls), chosen["cache_interval"], lambda_max)
    stage2 = None
    if cfg.upsampler:
        up = checkpoints.resolve("upsampler", cfg.upsampler, cfg.upsampler_preset, "upsampler")
        checkpoints.check_chain(base, None, up)
        up_sampler, up_steps, _ = preset_defaults(up, cfg.upsampler_sampler, cfg.upsampler_steps)
        check_steps("upsampler_steps", up, up_sampler, up_steps, None)
        rows = cfg.upsampler_batch_size or cfg.batch_size
        workers = cfg.upsampler_workers or cfg.num_workers
        calls = stage_calls(up, up_sampler, up_steps, None, None, cfg.num_samples, rows, workers)
        stage2 = StagePlan(up, up_sampler, up_steps, "upsampler", rows, workers,
                           precision=_precision(cfg.precision, recorded.get("upsampler")),
                           compile=resolve_compile(cfg.compile, calls))

    if cfg.eta and sampler != "ddim" and (stage2 is None or stage2.sampler != "ddim"):
        raise ConfigError(f"eta: {cfg.eta} is a DDIM parameter; no stage samples with DDIM")
    why = storage.why_not_writable(cfg.out)
    if why:
        raise ConfigError(f"out: {why}")
    plan = Plan(cfg, stage1, stage2, tuple(classes) if isinstance(classes, list) else classes,
                num_classes)
    output.check_settings(cfg.out, plan.decisive())
    return plan
