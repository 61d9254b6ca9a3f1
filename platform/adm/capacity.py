"""Capacity past this machine: how many replicas a serving preset needs for a request rate at
a p95 latency bound, by discrete-event simulation of the step engine itself.

The simulation runs the engine's own scheduling code (`adm.engine.Engine`, unchanged) with a
`VirtualRunner` whose rows only count their steps and whose `step` advances a virtual clock by
the step time of a `StageCost` (a cost model: a fixed-shape model call, a fixed-shape
classifier-gradient call when any running row is guided, and a small per-row overhead). Stage
costs come from measured step times (`measure_step_times`, the real `RowStepper` on this
machine, fitted by `fit_stage_cost`) or from the networks' FLOPs per call (`stage_flops`,
`torch.utils.flop_counter` on the meta device) over an assumed peak FLOP/s and efficiency
(`flops_stage_cost`: an estimate, never a measurement).

`ChainSim` runs a chain of stages (the base sampler, then the upsampler), each with N replicas
that each run their own `Engine`; requests arrive by a seeded Poisson process, are routed to a
replica by power-of-two-choices (Serve's router: two random replicas, the one with fewer ongoing
requests), and enter the next stage when their rows of this stage finish. The event loop always
runs the earliest event: a request's arrival, an engine event's delivery, or the replica whose
next step starts earliest (a heap of replica clocks), so replicas run concurrently in virtual
time. `find_replicas` searches the fewest replicas per stage that meet a p95 bound; fleets too
large to simulate request by request are modelled as identical cells (`plan_cells`).

`run_real_engine` runs the real engine (a real runner, the wall clock) under the same arrivals,
in-process, so that the simulation can be checked against it (benchmarks/capacity.py,
tests/test_capacity.py).
"""
from __future__ import annotations

import heapq
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils.flop_counter

from .diffusion.rows import RowSpec
from .engine import PRIORITIES, Engine, Request

# ------------------------------------------------------------------------------ cost model


@dataclass(frozen=True)
class StageCost:
    """Seconds of one engine step of a stage: `call_s` (the model call, always `slots` rows:
    a fixed shape), plus `guided_s` when any running row is classifier-guided (the gradient
    call, also `slots` rows), plus `per_row_s` per running row (its share of the update and
    the engine's bookkeeping). `source` says where the figures come from; `estimate` marks
    figures not measured on the hardware they describe."""

    call_s: float
    guided_s: float = 0.0
    per_row_s: float = 0.0
    source: str = ""
    estimate: bool = False

    def step_s(self, rows: int, guided: bool) -> float:
        """One step of `rows` running rows (any of them guided: `guided`)."""
        return self.call_s + (self.guided_s if guided else 0.0) + self.per_row_s * rows


def fit_stage_cost(samples: Sequence[tuple[int, bool, float]], source: str = "") -> StageCost:
    """Least-squares fit of `StageCost` to measured steps: (rows, any guided, seconds) each.
    Negative coefficients (noise on a flat curve) are clipped to 0."""
    a = np.array([[1.0, float(g), float(r)] for r, g, _ in samples])
    y = np.array([s for _, _, s in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    call, guided, per_row = (max(0.0, float(c)) for c in coef)
    return StageCost(call, guided, per_row, source=source)


def measure_step_times(stepper, guided: RowSpec | None, plain: RowSpec,
                       rows: Sequence[int] = (1, 2, 4, 8), repeats: int = 15,
                       low_res: torch.Tensor | None = None) -> list[tuple[int, bool, float]]:
    """Wall seconds of `stepper.step` (a real `RowStepper`; the 25th percentile of
    `repeats`) for each row count, with
    unguided rows of `plain` and (when `guided` is given) guided rows of `guided`: samples
    for `fit_stage_cost`. The cases are timed round-robin, one step each per round, so that a
    burst of other load on the machine spreads over all of them instead of skewing one; rows
    restart before their chain ends, so every timed step is a mid-chain step. `low_res`:
    [C, h, w] for an upsampler's rows."""
    cases = []
    for spec, is_guided in ((plain, False), (guided, True)):
        if spec is not None:
            cases += [(min(n, stepper.slots // spec.width), is_guided, spec) for n in rows]
    batches = {}

    def fresh(n: int, spec: RowSpec) -> list:
        return [stepper.start(spec, k % 10, k, low_res) for k in range(n)]

    times: dict[int, list] = {i: [] for i in range(len(cases))}
    for round_ in range(repeats + 1):
        for i, (n, _, spec) in enumerate(cases):
            if i not in batches or any(r.index < 2 for r in batches[i]):
                batches[i] = fresh(n, spec)
            start = time.perf_counter()
            stepper.step(batches[i])
            if round_:  # round 0 warms the allocator and caches
                times[i].append(time.perf_counter() - start)
    # The 25th percentile, not the median: other work on a shared machine only ever adds
    # time, and a step it did not touch is the replica's own speed.
    return [(n, g, float(np.percentile(times[i], 25))) for i, (n, g, _) in enumerate(cases)]


def stage_flops(net: torch.nn.Module, image_size: int, rows: int, *,
                classifier: torch.nn.Module | None = None, low_res_size: int | None = None,
                class_cond: bool = True) -> tuple[float, float]:
    """FLOPs of one engine step's two calls on `rows` rows: the network's forward, and (with a
    `classifier`) the classifier gradient's forward and backward with respect to x (what
    `adm.guidance.classifier_cond_fn` computes). Counted by `FlopCounterMode` with one row on
    the meta device (nothing is allocated) and scaled by `rows`: every layer's work is linear
    in the batch. Build the networks under `torch.device("meta")`."""
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    kwargs: dict[str, Any] = {"y": torch.zeros(1, dtype=torch.long, device="meta")} \
        if class_cond else {}
    if low_res_size is not None:
        kwargs["low_res"] = torch.zeros(1, 3, low_res_size, low_res_size, device="meta")
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, **kwargs)
    model = counter.get_total_flops() * rows
    guided = 0.0
    if classifier is not None:
        # `backward()` on a leaf, parameters frozen: only the gradient with respect to x is
        # counted, as autograd.grad computes it (FlopCounterMode refuses autograd.grad here).
        classifier.requires_grad_(False)
        xg = x.clone().requires_grad_(True)
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            logits = classifier(xg, t)
            torch.log_softmax(logits.float(), dim=-1)[:, 0].sum().backward()
        guided = counter.get_total_flops() * rows
    return float(model), float(guided)


def flops_stage_cost(model_flops: float, guided_flops: float, *, peak_flops: float,
                     efficiency: float, call_overhead_s: float = 0.002,
                     per_row_s: float = 1e-4, device: str = "GPU") -> StageCost:
    """A stage's cost from its calls' FLOPs (`stage_flops`) at `efficiency` × `peak_flops`
    FLOP/s, plus a fixed launch/dispatch overhead per call and a per-row overhead: an
    ESTIMATE (marked so) until measured on that device."""
    rate = peak_flops * efficiency
    guided_s = guided_flops / rate + (call_overhead_s if guided_flops else 0.0)
    return StageCost(model_flops / rate + call_overhead_s, guided_s, per_row_s,
                     source=f"{device} estimate: FLOPs / ({peak_flops / 1e12:.0f} TFLOP/s × "
                            f"{efficiency:g})", estimate=True)


# --------------------------------------------------------------------------- presets, mix


@dataclass(frozen=True)
class StageSpec:
    """One stage of a serving preset: its name, model-call rows per step (`slots`), and its
    cost. `sampler`/`steps` are the stage's own when requests do not choose them (the
    upsampler); None: the request's."""

    name: str
    slots: int
    cost: StageCost
    sampler: str | None = None
    steps: int | None = None
    max_wait_steps: int = 200
    aged_share: float = 0.5


@dataclass(frozen=True)
class ServePreset:
    """What `serve_configs/<name>.yaml` says that capacity depends on."""

    name: str
    path: str
    base_preset: str | None  # the released checkpoint's preset (None: the quickstart's models)
    classifier_preset: str | None
    upsampler_preset: str | None
    has_classifier: bool
    has_upsampler: bool
    batch_rows: int
    upsampler_batch_rows: int
    default_sampler: str
    default_steps: int
    max_steps: int
    max_images: int
    default_guidance_scale: float
    upsampler_sampler: str | None
    upsampler_steps: int | None
    precision: str
    max_wait_steps: int
    aged_share: float
    gpus_per_replica: float

    @property
    def schedule(self) -> dict:
        """The engine's scheduling arguments (those of `StageSpec` and `Engine`)."""
        return {"max_wait_steps": self.max_wait_steps, "aged_share": self.aged_share}


def load_serve_preset(path: str | Path) -> ServePreset:
    """Read a serve config's first application (its `args` and its GuidedSampler's
    ray_actor_options)."""
    import yaml

    path = Path(path)
    app = yaml.safe_load(path.read_text())["applications"][0]
    args = app["args"]
    sampler_dep = next((d for d in app.get("deployments", []) if d["name"] == "GuidedSampler"),
                       {})
    gpus = float(sampler_dep.get("ray_actor_options", {}).get("num_gpus", 0) or 0)
    up_steps = args.get("upsampler_steps")
    return ServePreset(
        name=path.stem, path=str(path), base_preset=args.get("base_preset"),
        classifier_preset=args.get("classifier_preset"),
        upsampler_preset=args.get("upsampler_preset"),
        has_classifier=bool(args.get("classifier")), has_upsampler=bool(args.get("upsampler")),
        batch_rows=int(args.get("batch_rows", 8)),
        upsampler_batch_rows=int(args.get("upsampler_batch_rows") or args.get("batch_rows", 8)),
        default_sampler=args.get("default_sampler", "ddim"),
        default_steps=int(args.get("default_steps", 25)),
        max_steps=int(args.get("max_steps", 250)), max_images=int(args.get("max_images", 4)),
        default_guidance_scale=float(args.get("default_guidance_scale", 0.0)),
        upsampler_sampler=args.get("upsampler_sampler"),
        upsampler_steps=None if up_steps is None else int(up_steps),
        precision=str(args.get("precision", "auto")),
        max_wait_steps=int(args.get("max_wait_steps", 200)),
        aged_share=float(args.get("aged_share", 0.5)), gpus_per_replica=gpus)


@dataclass(frozen=True)
class RequestMix:
    """The requests' settings, drawn independently per request: `interactive` the share of
    interactive-class requests (the rest are batch-class); `images` {num_images: share};
    `steps` {multiple of the preset's default steps: share} (capped at its max_steps);
    `guided` the share with classifier guidance (the preset's default scale); `upsample`
    the share that also runs the upsampler stage (when the preset has one)."""

    interactive: float = 0.8
    images: tuple = ((1, 0.5), (2, 0.25), (4, 0.25))
    steps: tuple = ((1, 0.7), (2, 0.2), (4, 0.1))
    guided: float = 0.75
    upsample: float = 1.0

    def describe(self) -> str:
        pct = lambda p: f"{100 * p:g}%"  # noqa: E731
        return (f"{pct(self.interactive)} interactive / {pct(1 - self.interactive)} batch; "
                f"images {', '.join(f'{n}: {pct(p)}' for n, p in self.images)}; steps "
                f"{', '.join(f'{m}x default: {pct(p)}' for m, p in self.steps)}; "
                f"{pct(self.guided)} classifier-guided; {pct(self.upsample)} upsampled")


@dataclass(frozen=True)
class SimRequest:
    """One request of a load: its arrival (seconds), class, images, base steps, whether it is
    classifier-guided and upsampled."""

    id: int
    arrival: float
    priority: str
    images: int
    steps: int
    guided: bool
    upsample: bool


def _pick(rng: random.Random, table: tuple) -> Any:
    values, weights = zip(*table)
    return rng.choices(values, weights)[0]


def draw_requests(mix: RequestMix, n: int, rate: float, *, default_steps: int, max_steps: int,
                  seed: int = 0, has_upsampler: bool = True) -> list[SimRequest]:
    """`n` requests arriving by a Poisson process of `rate` per second. The settings and the
    unit-rate gaps come from `seed` alone, so loads of different rates (and replica counts)
    see the same requests, only compressed in time (common random numbers)."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1.0)
        steps = min(max_steps, default_steps * _pick(rng, mix.steps))
        out.append(SimRequest(
            i, t / rate, "interactive" if rng.random() < mix.interactive else "batch",
            _pick(rng, mix.images), steps, rng.random() < mix.guided,
            has_upsampler and rng.random() < mix.upsample))
    return out


def at_rate(requests: Sequence[SimRequest], rate: float, old_rate: float) -> list[SimRequest]:
    """The same requests with their arrivals rescaled from `old_rate` to `rate`."""
    k = old_rate / rate
    return [SimRequest(r.id, r.arrival * k, r.priority, r.images, r.steps, r.guided,
                       r.upsample) for r in requests]


def base_spec(req: SimRequest, sampler: str, guidance_scale: float) -> RowSpec:
    """The base stage's `RowSpec` of a request (as the ingress's `row_spec` builds it)."""
    return RowSpec(sampler, req.steps, classifier_scale=guidance_scale if req.guided else 0.0)


def _quantiles(values: Sequence[float]) -> dict:
    """p50/p95/p99 of seconds; inf when there are none (nothing finished)."""
    if not len(values):
        return {f"p{q}": math.inf for q in (50, 95, 99)}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


# ------------------------------------------------------------------------ virtual runner


class VirtualRow:
    """A row that only counts its steps (what `Engine` reads of a row: index, done,
    steps_done, pred_xstart)."""

    __slots__ = ("steps", "index", "guided", "pred_xstart", "result")

    def __init__(self, steps: int, guided: bool):
        self.steps, self.index, self.guided = steps, steps - 1, guided
        self.pred_xstart = self.result = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def steps_done(self) -> int:
        return self.steps if self.result is not None else self.steps - 1 - self.index


class VirtualRunner:
    """The `Runner` protocol on a virtual clock: settings are `RowSpec`s with integer
    `steps`, rows count steps, and `step(rows)` advances `now` by `cost.step_s`."""

    _IMAGE = np.zeros((1, 1, 1, 3), np.uint8)

    def __init__(self, cost: StageCost, now: float = 0.0):
        self.cost, self.now = cost, now

    def clock(self) -> float:
        return self.now

    def width(self, settings: RowSpec) -> int:
        return settings.width

    def steps(self, settings: RowSpec) -> int:
        return int(settings.steps)

    def start(self, request: Request, k: int) -> VirtualRow:
        s = request.settings
        return VirtualRow(int(s.steps), s.classifier_scale > 0)

    def step(self, rows: list) -> None:
        self.now += self.cost.step_s(len(rows), any(r.guided for r in rows))
        for r in rows:
            r.pred_xstart = True
            if r.index == 0:
                r.result = True
            else:
                r.index -= 1

    def images(self, rows: list) -> np.ndarray:
        return np.broadcast_to(self._IMAGE, (len(rows), 1, 1, 3))

    previews = images


# ---------------------------------------------------------------------------- simulation


@dataclass
class _Replica:
    engine: Engine
    runner: VirtualRunner
    ongoing: int = 0  # requests routed here and not finished (what the router compares)
    scheduled: bool = False  # a step of it is in the event heap


@dataclass
class RunResult:
    """One simulated (or real) run. Per request id: `latency` (arrival to the last stage's
    result, seconds), `first_progress` (arrival to the first progress event), `stage_latency`
    {stage: {id: seconds}}; `measured` the ids counted in the statistics (after warm-up);
    `completed` False when the run was stopped as unstable (queues past the limit)."""

    requests: list
    latency: dict = field(default_factory=dict)
    first_progress: dict = field(default_factory=dict)
    stage_latency: dict = field(default_factory=dict)
    measured: list = field(default_factory=list)
    completed: bool = True
    busy_s: dict = field(default_factory=dict)  # stage -> summed step seconds of replicas
    span_s: float = 0.0  # first arrival to the last result

    def summary(self) -> dict:
        """Throughput and latency quantiles per class (and all): the run's table row."""
        by_id = {r.id: r for r in self.requests}
        out: dict[str, Any] = {"completed": self.completed, "n": len(self.measured)}
        ids = [i for i in self.measured if i in self.latency]
        arr = [by_id[i].arrival for i in self.measured]
        window = (max(arr) - min(arr)) if len(arr) > 1 else float("nan")
        ok_window = window > 0 if window == window else False
        out["throughput_rps"] = len(ids) / window if ok_window else float("nan")
        out["images_per_s"] = sum(by_id[i].images for i in ids) / window \
            if ok_window else float("nan")
        for cls in (*PRIORITIES, "all"):
            sel = [i for i in ids if cls == "all" or by_id[i].priority == cls]
            lat = [self.latency[i] for i in sel]
            ttfp = [self.first_progress[i] for i in sel if i in self.first_progress]
            if not self.completed:  # stopped as unstable: latencies grow without bound
                lat = ttfp = []
            out[cls] = {"n": len(sel), **_quantiles(lat),
                        **{f"ttfp_{k}": v for k, v in _quantiles(ttfp).items() if k != "p99"}}
        return out


class ChainSim:
    """A chain of stages, `counts[s]` replicas each, every replica its own `Engine` on a
    `VirtualRunner`. `guidance_scale` and `sampler` make the base stage's `RowSpec`s.

    `max_waiting_slots`: a run stops, marked not completed, when a replica holds more waiting
    rows than this many times its slots (the fleet cannot keep up: every waiting row has a
    whole chain of steps to go, so such a queue is many chains long; going on would only
    grow it, and the engine's step costs grow with it)."""

    def __init__(self, stages: Sequence[StageSpec], counts: Sequence[int], *,
                 sampler: str = "ddim", guidance_scale: float = 1.0, seed: int = 0,
                 max_waiting_slots: int = 16):
        if len(stages) != len(counts) or min(counts) < 1:
            raise ValueError(f"counts {list(counts)} for {len(stages)} stage(s)")
        self.stages, self.counts = list(stages), [int(c) for c in counts]
        self.sampler, self.guidance_scale = sampler, guidance_scale
        self.rng = random.Random(seed)
        self.max_waiting_slots = max_waiting_slots
        self.fleet = []
        for spec, n in zip(self.stages, self.counts):
            replicas = []
            for _ in range(n):
                runner = VirtualRunner(spec.cost)
                replicas.append(_Replica(Engine(runner, spec.slots,
                                                max_wait_steps=spec.max_wait_steps,
                                                aged_share=spec.aged_share,
                                                clock=runner.clock), runner))
            self.fleet.append(replicas)
        self._heap: list = []
        self._seq = 0

    # Events at equal times: deliveries and arrivals (0) before steps (1), so that a request
    # arriving exactly when a step starts joins it, as a submit just before `step()` would.
    def _push(self, t: float, order: int, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, order, self._seq, action))

    def _route(self, s: int) -> _Replica:
        """Power of two choices: two distinct random replicas, the one with fewer ongoing
        requests (ties: the first drawn)."""
        replicas = self.fleet[s]
        if len(replicas) == 1:
            return replicas[0]
        a, b = self.rng.sample(replicas, 2)
        return b if b.ongoing < a.ongoing else a

    def _spec(self, s: int, req: SimRequest) -> RowSpec:
        stage = self.stages[s]
        if s == 0:
            return base_spec(req, stage.sampler or self.sampler, self.guidance_scale)
        return RowSpec(stage.sampler or "ddpm", stage.steps)

    def _enter(self, s: int, req: SimRequest, t: float, result: RunResult) -> None:
        """The request reaches stage `s` at time t: routed, submitted, its replica woken."""
        replica = self._route(s)
        replica.ongoing += 1
        stage_name = self.stages[s].name
        last = s == len(self.stages) - 1 or not req.upsample

        def on_event(kind: str, data: dict) -> None:
            # Called inside `Engine.step` at the replica's clock: deliver at that virtual time
            # (a step's results exist only when the step ends).
            when = replica.runner.now
            if kind == "progress" and req.id not in result.first_progress:
                result.first_progress[req.id] = when - req.arrival
            elif kind == "result":
                self._push(when, 0, lambda: self._finish(s, req, replica, when, t, last,
                                                         result))

        replica.engine.submit(Request(f"{req.id}", self._spec(s, req), [0] * req.images,
                                      list(range(req.images)), priority=req.priority,
                                      on_event=on_event))
        result.stage_latency.setdefault(stage_name, {})
        if not replica.scheduled:
            replica.runner.now = max(replica.runner.now, t)  # an idle replica wakes now
            replica.scheduled = True
            self._push(replica.runner.now, 1, lambda: self._step(replica))

    def _finish(self, s: int, req: SimRequest, replica: _Replica, when: float, entered: float,
                last: bool, result: RunResult) -> None:
        replica.ongoing -= 1
        result.stage_latency[self.stages[s].name][req.id] = when - entered
        if last:
            result.latency[req.id] = when - req.arrival
            result.span_s = max(result.span_s, when)
        else:
            self._enter(s + 1, req, when, result)

    def _step(self, replica: _Replica) -> None:
        if sum(replica.engine.stats.queued.values()) > self.max_waiting_slots * \
                replica.engine.slots:
            raise _Unstable()
        if replica.engine.step():
            self._push(replica.runner.now, 1, lambda: self._step(replica))
        else:
            replica.scheduled = False

    def run(self, requests: Sequence[SimRequest], warmup: float = 0.1) -> RunResult:
        """Simulate `requests` to the end; the first `warmup` share (by arrival) is not
        measured (the fleet starts empty)."""
        result = RunResult(list(requests))
        skip = int(len(requests) * warmup)
        result.measured = [r.id for r in requests[skip:]]
        for req in requests:
            self._push(req.arrival, 0,
                       lambda req=req: self._enter(0, req, req.arrival, result))
        try:
            while self._heap:
                _, _, _, action = heapq.heappop(self._heap)
                action()
        except _Unstable:
            result.completed = False
        for spec, replicas in zip(self.stages, self.fleet):
            result.busy_s[spec.name] = sum(r.engine.stats.step_seconds for r in replicas)
        return result


class _Unstable(Exception):
    """A replica's queue passed the limit: the fleet cannot keep up with the load."""


# ------------------------------------------------------------------- cells, replica search


def unloaded_latency(stages: Sequence[StageSpec], requests: Sequence[SimRequest],
                     guidance_scale: float = 1.0) -> list[float]:
    """Per stage, the mean latency of a request alone on a replica (its steps × the step time
    of its own rows): the time scale a simulated window must exceed many times."""
    out = []
    for s, stage in enumerate(stages):
        total = 0.0
        for r in requests:
            if s > 0 and not r.upsample:
                continue
            steps = r.steps if s == 0 else (stage.steps or 0)
            guided = s == 0 and r.guided and guidance_scale > 0
            total += steps * stage.cost.step_s(min(r.images, stage.slots), guided)
        out.append(total / max(1, len(requests)))
    return out


def slot_seconds(stage: StageSpec, s: int, requests: Sequence[SimRequest]) -> float:
    """Mean replica-seconds one request needs at stage `s` when every step is full (its
    row-steps × the full step's time / slots): a lower bound of the work it brings."""
    full = stage.cost.step_s(stage.slots, s == 0 and any(r.guided for r in requests))
    rows = 0.0
    for r in requests:
        if s > 0 and not r.upsample:
            continue
        rows += r.images * (r.steps if s == 0 else (stage.steps or 0))
    return rows / max(1, len(requests)) * full / stage.slots


@dataclass(frozen=True)
class Plan:
    """How a fleet is simulated: stage s has `cells[s]` identical cells of `per_cell[s]`
    replicas, each cell getting 1/cells[s] of the requests (a random split of a Poisson
    stream is Poisson). One cell per stage: the whole fleet, simulated as it is."""

    cells: tuple
    per_cell: tuple

    @property
    def replicas(self) -> tuple:
        return tuple(c * n for c, n in zip(self.cells, self.per_cell))


def plan_cells(stages: Sequence[StageSpec], rate: float, requests: Sequence[SimRequest],
               *, guidance_scale: float = 1.0, window_latencies: float = 10.0) -> tuple:
    """Cells per stage for a rate: a simulated run of len(requests) requests must cover at
    least `window_latencies` unloaded latencies of the whole chain (so its quantiles are of a
    steady state, not of the start). Within that, one cell (the exact fleet); past it, stage
    s is split into ceil(rate / max cell rate) cells."""
    lat = unloaded_latency(stages, requests, guidance_scale)
    n = len(requests)
    if n / rate >= window_latencies * sum(lat):
        return (1,) * len(stages)
    return tuple(max(1, math.ceil(rate * window_latencies * t / n)) for t in lat)


@dataclass
class Evaluation:
    """A fleet at a rate: replicas per stage (`plan`), the run's summary, and whether it met
    the bounds."""

    plan: Plan
    summary: dict
    ok: bool
    stage_summary: dict = field(default_factory=dict)


def simulate_plan(stages: Sequence[StageSpec], plan: Plan, rate: float,
                  requests: Sequence[SimRequest], *, sampler: str = "ddim",
                  guidance_scale: float = 1.0, seed: int = 0,
                  cache: dict | None = None) -> RunResult:
    """Run a plan at `rate` (`requests` drawn at rate 1: `draw_requests(..., rate=1)`).

    One cell everywhere: the exact chain (`ChainSim`). Otherwise each stage's cell runs alone
    on its own arrivals at rate / cells[s] (the same requests: arrivals compressed), and a
    request's latency is the sum of its stage latencies. That treats a large fleet's stages as
    independent given the request, and the upsampler's arrivals (base results from many
    replicas merged) as Poisson. Stage runs are cached in `cache` by (stage, cell size, cells).
    """
    if all(c == 1 for c in plan.cells):
        sim = ChainSim(stages, plan.per_cell, sampler=sampler, guidance_scale=guidance_scale,
                       seed=seed)
        return sim.run(at_rate(requests, rate, 1.0))
    cache = {} if cache is None else cache
    per_stage = []
    for s, stage in enumerate(stages):
        key = (s, plan.per_cell[s], plan.cells[s], rate)
        if key not in cache:
            reqs = at_rate(requests if s == 0 else [r for r in requests if r.upsample],
                           rate / plan.cells[s], 1.0)
            # A later stage runs alone, as the first of a one-stage chain.
            sub = ChainSim([stage], [plan.per_cell[s]],
                           sampler=stage.sampler or sampler, guidance_scale=guidance_scale,
                           seed=seed + s)
            cache[key] = sub.run(reqs if s == 0 else [_stage_request(r, stage) for r in reqs])
        per_stage.append(cache[key])
    out = RunResult(list(at_rate(requests, rate, 1.0)))
    out.completed = all(r.completed for r in per_stage)
    out.first_progress = dict(per_stage[0].first_progress)
    later = [set(run.measured) for run in per_stage[1:]]
    for r in requests:
        parts = [per_stage[0].latency.get(r.id)]
        if r.upsample:
            parts += [run.latency.get(r.id) for run in per_stage[1:]]
        if all(p is not None for p in parts):
            out.latency[r.id] = sum(parts)
    # Measured: past the warm-up of every stage run the request went through.
    upsampled = {r.id for r in requests if r.upsample}
    out.measured = [i for i in per_stage[0].measured
                    if i not in upsampled or all(i in m for m in later)]
    for stage, run in zip(stages, per_stage):
        out.stage_latency[stage.name] = run.latency
        out.busy_s[stage.name] = sum(run.busy_s.values())
    return out


def _stage_request(r: SimRequest, stage: StageSpec) -> SimRequest:
    """A request as a later stage run on its own sees it: that stage's steps, never
    guided (its rows' settings are the stage's own)."""
    return SimRequest(r.id, r.arrival, r.priority, r.images, stage.steps or r.steps, False,
                      False)


def meets(summary: dict, p95_bound_s: float, batch_factor: float) -> bool:
    """The bounds: the run completed, interactive p95 ≤ the bound, and batch-class p95 ≤
    batch_factor × the bound (the fleet also keeps up with the batch work)."""
    inter, batch = summary["interactive"], summary["batch"]
    return bool(summary["completed"] and inter["p95"] <= p95_bound_s
                and (batch["n"] == 0 or batch["p95"] <= batch_factor * p95_bound_s))


@dataclass
class Sizing:
    """`find_replicas`' answer: the plan (replicas per stage) that meets the bounds, its
    evaluation, and every evaluation made ({replicas per cell: ok}), which shows that one
    replica fewer in any stage (per cell) fails."""

    rate: float
    p95_bound_s: float
    plan: Plan
    evaluation: Evaluation
    tried: dict


def find_replicas(stages: Sequence[StageSpec], rate: float, p95_bound_s: float,
                  requests: Sequence[SimRequest], *, sampler: str = "ddim",
                  guidance_scale: float = 1.0, batch_factor: float = 4.0, seed: int = 0,
                  window_latencies: float = 10.0, max_replicas: int = 10 ** 6) -> Sizing:
    """The fewest replicas per stage (per cell, in cells of `plan_cells`) whose simulated run
    of `requests` (drawn at rate 1) at `rate` meets `meets(...)`.

    Start from the utilization bound (each replica's slots full at every step), grow every
    stage by 25% until the bounds are met, then bisect each stage down in turn with the others
    fixed: the answer meets the bounds and, per stage, one replica fewer does not (both
    simulated; with the same requests in every run, latency falls with replicas). A
    RuntimeError when no fleet of up to `max_replicas` replicas meets them (a bound below
    the requests' own unloaded latency)."""
    cells = plan_cells(stages, rate, requests, guidance_scale=guidance_scale,
                       window_latencies=window_latencies)
    cache: dict = {}
    tried: dict = {}

    def evaluate(per_cell: tuple) -> Evaluation:
        if per_cell not in tried:
            plan = Plan(cells, per_cell)
            run = simulate_plan(stages, plan, rate, requests, sampler=sampler,
                                guidance_scale=guidance_scale, seed=seed, cache=cache)
            summary = run.summary()
            tried[per_cell] = Evaluation(plan, summary, meets(summary, p95_bound_s,
                                                              batch_factor))
        return tried[per_cell]

    lower = [max(1, math.ceil(rate / c * slot_seconds(st, s, requests)))
             for s, (st, c) in enumerate(zip(stages, cells))]
    counts = tuple(lower)
    while not evaluate(counts).ok:
        counts = tuple(max(n + 1, math.ceil(n * 1.25)) for n in counts)
        if max(c * n for c, n in zip(cells, counts)) > max_replicas:
            raise RuntimeError(f"no fleet of up to {max_replicas} replicas meets "
                               f"p95 <= {p95_bound_s} s at {rate} requests/s")
    for s in range(len(stages)):
        lo, hi = lower[s] - 1, counts[s]  # lo: assumed failing (below the utilization bound)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if evaluate(counts[:s] + (mid,) + counts[s + 1:]).ok:
                hi = mid
            else:
                lo = mid
        # The answer's neighbour below must be simulated to fail (the bound is a start, not a
        # proof): walk down while it still meets.
        while hi > 1 and evaluate(counts[:s] + (hi - 1,) + counts[s + 1:]).ok:
            hi -= 1
        counts = counts[:s] + (hi,) + counts[s + 1:]
    for s in range(len(stages)):  # the final neighbours, for the record
        if counts[s] > 1:
            evaluate(counts[:s] + (counts[s] - 1,) + counts[s + 1:])
    return Sizing(rate, p95_bound_s, Plan(cells, counts), evaluate(counts),
                  {k: v.ok for k, v in tried.items()})


# ------------------------------------------------------------------- the real engine, timed


class TimedRunner:
    """A runner wrapper that records every step it makes: (rows, any guided, wall seconds),
    samples for `fit_stage_cost` taken under the very load they will model."""

    def __init__(self, runner):
        self.runner, self.samples = runner, []

    def __getattr__(self, name: str) -> Any:  # width, steps, start, images, previews
        return getattr(self.runner, name)

    def step(self, rows: list) -> None:
        guided = any(r.settings.classifier_scale > 0 for r in rows)
        start = time.perf_counter()
        self.runner.step(rows)
        self.samples.append((len(rows), guided, time.perf_counter() - start))


def run_real_engine(runner, slots: int, requests: Sequence[SimRequest],
                    spec: Callable[[SimRequest], RowSpec], *, max_wait_steps: int = 200,
                    aged_share: float = 0.5, warmup: float = 0.1) -> tuple[RunResult, list]:
    """Run a real engine (`Engine(runner, slots)`: a real runner, the wall clock) under
    `requests`' arrivals: a thread loops `wait_for_work(); step()` as a Serve replica does,
    and this thread submits each request at its arrival time. Latency: submit to the `result`
    event. Returns the run and its steps' (rows, guided, seconds) (`TimedRunner`)."""
    timed = TimedRunner(runner)
    engine = Engine(timed, slots, max_wait_steps=max_wait_steps, aged_share=aged_share)
    result = RunResult(list(requests))
    result.measured = [r.id for r in requests[int(len(requests) * warmup):]]
    done = threading.Event()
    remaining = [len(requests)]
    lock = threading.Lock()
    submitted: dict[int, float] = {}

    def loop() -> None:
        while not done.is_set():
            if engine.wait_for_work(timeout=0.05):
                engine.step()

    def on_event(req: SimRequest) -> Callable[[str, dict], None]:
        def handle(kind: str, data: dict) -> None:
            now = time.monotonic()
            if kind == "progress" and req.id not in result.first_progress:
                result.first_progress[req.id] = now - submitted[req.id]
            elif kind in ("result", "error"):
                result.latency[req.id] = now - submitted[req.id]
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
        return handle

    worker = threading.Thread(target=loop, name="capacity-real-engine", daemon=True)
    worker.start()
    t0 = time.monotonic()
    try:
        for req in requests:
            delay = t0 + req.arrival - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            submitted[req.id] = time.monotonic()
            engine.submit(Request(str(req.id), spec(req), [req.id % 10] * req.images,
                                  [req.id * 8 + k for k in range(req.images)],
                                  priority=req.priority, on_event=on_event(req)))
        done.wait()
    finally:  # a refused request (or an interrupt) must not leave the engine thread behind
        done.set()
        worker.join()
    result.span_s = time.monotonic() - t0
    result.busy_s["base"] = engine.stats.step_seconds
    return result, timed.samples
