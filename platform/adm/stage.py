"""One sampling stage (a base model, optionally classifier-guided, or an upsampler) as both
the Ray Data job (`adm.generate`) and the HTTP server (`adm.serve`) run it: its networks
loaded once on a device, the README defaults of its preset, and its model calls.

The padding rule. Every model call has exactly `rows` rows. Input k of `Stage.sample` runs in
call slots[k] // rows, at row slots[k] % rows; calls run in ascending order, and a row that no
input fills repeats the call's first input (in input order), dropped after. Why: CPU GEMMs
(MKL's sgemm, measured on an AVX-512 EPYC) round a row differently by its position and by the
call's row count. With both fixed, and per-row seeds (`index_seeds`), a sample's bits depend on
its label, seed, settings and slot alone, never on what else was batched with it. Generation
gives index i slot i (stage 2 gets stage 1's batches in any order); serving gives a settings
group's rows slots 0..n-1 in request order (a request's images come out the same alone or in
a crowd).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from . import checkpoints, factory
from .config import ConfigError
from .diffusion import GaussianDiffusion, sample, sampling_diffusion
from .images import from_uint8, to_uint8
from .precision import AUTOCAST, auto_precision
from .presets import preset


# "auto" compiles a generation stage that makes at least this many model calls per actor: on
# the 2-core CPU box compiling a guided 32 px stage (about 80 s) costs about what this many
# eager bf16 calls lose to compiled ones (docs/benchmarks.md "Sampling speed";
# benchmarks/sampling.py).
COMPILE_PAYS_AFTER_CALLS = 3000


def resolve_compile(compile: bool | str, calls: int | None) -> bool:
    """`compile` with "auto" decided: compiled when a generation stage will make at least
    COMPILE_PAYS_AFTER_CALLS model calls per actor (`calls`). A server (`calls` None) does not
    compile on "auto", on any device: a replica compiles before it takes a request, so every
    scale-up would wait for it, and how long that is on a GPU, cold and with a warm inductor
    cache, is still to be measured (benchmarks/gpu_check.py's replica_start part)."""
    if compile == "auto":
        return calls is not None and calls >= COMPILE_PAYS_AFTER_CALLS
    return bool(compile)


def resolve_fast_path(precision: str, compile: bool | str, device: torch.device,
                      calls: int | None) -> tuple[str, bool]:
    """(precision, compile) with "auto" settings decided for `device`: call it in the process
    that runs the networks there (`adm.precision.auto_precision` asks this machine's
    hardware); compile as `resolve_compile`."""
    if precision == "auto":
        precision = auto_precision(device)
    return precision, resolve_compile(compile, calls)


class Defaults(NamedTuple):
    """A stage's sampler, steps (a respacing string, or an int count) and classifier scale."""

    sampler: str
    steps: int | str
    classifier_scale: float


def preset_defaults(spec: checkpoints.ModelSpec, sampler: str | None = None,
                    steps: int | str | None = None, classifier_scale: float | None = None, *,
                    guided: bool = False, unset_steps: int | str | None = None) -> Defaults:
    """The settings a stage samples `spec` with: each one given, else the README's for the
    released file's preset (its sampler: "ddim" when it uses DDIM, else "ddpm"; its
    respacing; its classifier scale), else "ddpm", `unset_steps` (None: the respacing of
    `spec`'s flags, "" = the whole chain) and scale 1.0. The scale is 0.0 unless `guided`
    (a classifier guides the stage) or given."""
    readme = preset(spec.preset).sampling if spec.preset else None
    if sampler is None:
        sampler = "ddim" if readme is not None and readme.use_ddim else "ddpm"
    if steps is None:
        steps = readme.timestep_respacing if readme is not None else unset_steps
    if steps is None:
        steps = str(spec.flags.get("timestep_respacing") or "")
    if classifier_scale is None:
        classifier_scale = 0.0 if not guided else (
            readme.classifier_scale if readme is not None and readme.classifier else 1.0)
    return Defaults(sampler, steps, classifier_scale)


def check_steps(name: str, net: checkpoints.ModelSpec, sampler: str, steps: int | str,
                timesteps: str | None = None, lambda_min: float | None = None,
                lambda_max: float | None = None) -> None:
    """Refuse steps the sampler cannot space over `net`'s chain (as `adm.diffusion.sample`
    would space them), naming the setting."""
    if steps == "" and lambda_min is None and lambda_max is None:  # the whole chain, as the
        #                                                           flags respace it
        return
    try:
        sampling_diffusion(factory.create_diffusion({**net.flags, "timestep_respacing": ""}),
                           sampler, steps, timesteps, lambda_min, lambda_max)
    except (ValueError, factory.FlagError) as e:
        raise ConfigError(f"{name}: {e}") from None


def stage_calls(net: checkpoints.ModelSpec, sampler: str, steps: int | str,
                timesteps: str | None, lambda_min: float | None, num_samples: int, rows: int,
                workers: int, lambda_max: float | None = None) -> int:
    """Model calls one actor of a generation stage makes (the busiest, when the batches do not
    split evenly): its batches of `rows` times the steps the sampler runs."""
    chain = factory.create_diffusion({**net.flags, "timestep_respacing": ""})
    per_batch = sampling_diffusion(chain, sampler, steps or None, timesteps,
                                   lambda_min, lambda_max).num_timesteps
    return math.ceil(math.ceil(num_samples / rows) / workers) * per_batch


def model_calls(slots: np.ndarray, rows: int) -> list[np.ndarray]:
    """Positions in `slots` [n] by the model call that computes them (slot // rows), calls in
    ascending order and positions in input order within each."""
    calls = slots // rows
    order = np.argsort(calls, kind="stable")
    return [g for g in np.split(order, np.flatnonzero(np.diff(calls[order])) + 1) if len(g)]


@dataclass
class Stage:
    """One stage's networks on `device`: `net` (in eval mode) with `diffusion`, its whole
    chain (sampling respaces it per call), making [N, 3, size, size] images in model calls of
    `rows` rows, guided by `classifier` when given and a call's classifier_scale is > 0; the
    networks run under autocast to `autocast` (None: float32)."""

    net: nn.Module
    diffusion: GaussianDiffusion
    size: int
    rows: int
    classifier: nn.Module | None = None
    autocast: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    compile: bool = False
    low_res_size: int | None = None  # an upsampler's input side

    @classmethod
    def load(cls, spec: checkpoints.ModelSpec, classifier: checkpoints.ModelSpec | None,
             precision: str, device: torch.device, rows: int, compile: bool = False) -> "Stage":
        """Load `spec` (and `classifier`) onto `device`; `precision` is a key of AUTOCAST;
        `compile`: every model call goes through `torch.compile`d networks (see `warm_up`)."""
        net = checkpoints.load(spec, device)
        return cls(net, factory.create_diffusion({**spec.flags, "timestep_respacing": ""}),
                   checkpoints.image_size(spec), rows,
                   checkpoints.load(classifier, device) if classifier else None,
                   AUTOCAST[precision], device, compile,
                   checkpoints.small_size(spec) if spec.kind == "upsampler" else None)

    def warm_up(self) -> float:
        """Make one model call of each kind this stage makes (the networks compile now, not in
        the first request); returns its seconds."""
        start = time.perf_counter()
        low = (None if self.low_res_size is None
               else np.zeros((1, self.low_res_size, self.low_res_size, 3), np.uint8))
        self.sample(np.zeros(1, np.int64), [0], low_res=low, steps="2",
                    classifier_scale=1.0 if self.classifier is not None else 0.0)
        return time.perf_counter() - start

    def sample(self, labels: np.ndarray, seeds, slots: np.ndarray | None = None,
               low_res: np.ndarray | None = None, **args) -> np.ndarray:
        """Images [n, size, size, 3] uint8: row k of class labels[k] ([n] int), drawn from
        seeds[k] (n per-row generator seeds), at slots[k] (n distinct ints >= 0, default
        0..n-1; see the module's padding rule), conditioned on the base image low_res[k]
        ([n, h, w, 3] uint8) for an upsampler. `args` are `adm.diffusion.sample` keywords
        (sampler, steps, classifier_scale, cfg_scale, eta, ...)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        slots = np.arange(len(labels)) if slots is None else np.asarray(slots, dtype=np.int64)
        if len(np.unique(slots)) != len(labels) or (slots < 0).any():
            raise ValueError(f"slots must be {len(labels)} distinct ints >= 0, got {slots}")
        low = from_uint8(low_res, self.device) if low_res is not None else None
        guided = self.classifier is not None and args.get("classifier_scale", 0.0) > 0
        if not guided:
            args.pop("classifier_scale", None)  # no classifier passes at all
            args.pop("guidance_interval", None)
        images = np.zeros((len(labels), self.size, self.size, 3), np.uint8)
        for mine in model_calls(slots, self.rows):
            row = slots[mine] % self.rows
            take = np.full(self.rows, mine[0])  # the call's row -> the input it computes
            take[row] = mine
            x = sample(self.net, self.diffusion, (self.rows, 3, self.size, self.size), **args,
                       classifier=self.classifier if guided else None,
                       y=torch.from_numpy(labels[take]).to(self.device),
                       model_kwargs={"low_res": low[take]} if low is not None else None,
                       seeds=[seeds[i] for i in take], autocast_dtype=self.autocast,
                       compile=self.compile, device=self.device)
            images[mine] = to_uint8(x)[row]
        return images


@dataclass(frozen=True)
class Job:
    """One request's rows for one stage.

    `args` are the `adm.diffusion.sample` keywords as sorted (name, value) pairs (the batching
    key); `labels` [n] int64 class ids; `seeds` n per-image generator seeds; `low_res`
    [n, h, w, 3] uint8 base images for the upsampler stage, else None."""

    args: tuple
    labels: np.ndarray
    seeds: tuple
    low_res: np.ndarray | None = None

    @classmethod
    def make(cls, args: dict, labels, seeds, low_res: np.ndarray | None = None) -> "Job":
        return cls(tuple(sorted(args.items())), np.asarray(labels, dtype=np.int64).reshape(-1),
                   tuple(int(s) for s in seeds), low_res)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Output:
    """A job's images [n, H, W, 3] uint8, and the batch that made them: how many requests and
    images it held, and in how many settings groups."""

    images: np.ndarray
    batch_requests: int
    batch_images: int
    groups: int


def run_batch(stage: Stage, jobs: list[Job]) -> list[Output]:
    """Every job's images, in job order. Jobs with equal `args` form one group, in order of
    first appearance; a group's rows (its jobs' rows in job order) share `stage.sample`'s model
    calls, and the groups run one after the other."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.args, []).append(i)
    images: list = [None] * len(jobs)
    for args, idx in groups.items():
        group = [jobs[i] for i in idx]
        low = None if group[0].low_res is None else np.concatenate([j.low_res for j in group])
        out = stage.sample(np.concatenate([j.labels for j in group]),
                           [s for j in group for s in j.seeds], low_res=low, **dict(args))
        for i, end in zip(idx, np.cumsum([len(j) for j in group])):
            images[i] = out[end - len(jobs[i]):end]
    total = sum(len(j) for j in jobs)
    return [Output(im, len(jobs), total, len(groups)) for im in images]
