"""From settings to a checked plan: every network resolved and fitted to its file, the README
defaults of presets filled in, and every bad setting refused (naming it) before any work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .. import checkpoints, storage
from ..config import ConfigError
from ..stage import check_steps, preset_defaults, resolve_fast_path, stage_calls
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
    precision: str = "fp32"  # resolved: never "auto"
    compile: bool = False

    def settings(self) -> dict:
        return {"net": self.net.settings(), "sampler": self.sampler, "steps": self.steps,
                "timesteps": self.timesteps, "lambda_min": self.lambda_min,
                "stream": self.stream, "precision": self.precision, "compile": self.compile,
                "classifier": self.classifier.settings() if self.classifier else None,
                "classifier_scale": self.classifier_scale, "cfg_scale": self.cfg_scale}


@dataclass(frozen=True)
class Plan:
    cfg: SampleConfig
    base: StagePlan
    upsampler: StagePlan | None
    classes: str | tuple
    num_classes: int

    @property
    def chained(self) -> bool:
        return self.upsampler is not None

    def decisive(self) -> dict:
        """What decides the samples (settings.json's "decisive")."""
        return {"settings": decisive(self.cfg), "base": self.base.settings(),
                "upsampler": self.upsampler.settings() if self.upsampler else None,
                "classes": list(self.classes) if not isinstance(self.classes, str)
                else self.classes, "num_classes": self.num_classes}

    def execution(self) -> dict:
        """How this run was executed (recorded, not compared)."""
        return {k: v for k, v in asdict(self.cfg).items() if k not in decisive(self.cfg)}


def make_plan(cfg: SampleConfig) -> Plan:
    """Resolve the run and check what needs its files (`cfg` checked itself when built); a
    ConfigError names the first bad setting."""
    base = checkpoints.resolve("model", cfg.model, cfg.model_preset, "diffusion")
    sampler, steps, scale = preset_defaults(base, cfg.sampler, cfg.steps, cfg.classifier_scale,
                                            guided=bool(cfg.classifier))
    check_steps("steps", base, sampler, steps, cfg.timesteps, cfg.lambda_min)
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

    device = torch.device("cuda" if cfg.gpus else "cpu")
    calls = stage_calls(base, sampler, steps, cfg.timesteps, cfg.lambda_min, cfg.num_samples,
                        cfg.batch_size, cfg.num_workers)
    stage1 = StagePlan(base, sampler, steps, "base", cfg.batch_size, cfg.num_workers,
                       classifier, scale, cfg.timesteps, cfg.cfg_scale, cfg.lambda_min,
                       *resolve_fast_path(cfg.precision, cfg.compile, device, calls))
    stage2 = None
    if cfg.upsampler:
        up = checkpoints.resolve("upsampler", cfg.upsampler, cfg.upsampler_preset, "upsampler")
        checkpoints.check_chain(base, None, up)
        up_sampler, up_steps, _ = preset_defaults(up, cfg.upsampler_sampler, cfg.upsampler_steps)
        check_steps("upsampler_steps", up, up_sampler, up_steps, None)
        rows = cfg.upsampler_batch_size or cfg.batch_size
        workers = cfg.upsampler_workers or cfg.num_workers
        calls = stage_calls(up, up_sampler, up_steps, None, None, cfg.num_samples, rows, workers)
        precision, compile = resolve_fast_path(cfg.precision, cfg.compile, device, calls)
        stage2 = StagePlan(up, up_sampler, up_steps, "upsampler", rows, workers,
                           precision=precision, compile=compile)

    if cfg.eta and sampler != "ddim" and (stage2 is None or stage2.sampler != "ddim"):
        raise ConfigError(f"eta: {cfg.eta} is a DDIM parameter; no stage samples with DDIM")
    why = storage.why_not_writable(cfg.out)
    if why:
        raise ConfigError(f"out: {why}")
    plan = Plan(cfg, stage1, stage2, tuple(classes) if isinstance(classes, list) else classes,
                num_classes)
    output.check_settings(cfg.out, plan.decisive())
    return plan
