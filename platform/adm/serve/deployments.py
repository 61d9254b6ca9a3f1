"""The two model deployments: `GuidedSampler` (base model + optional classifier) and
`Upsampler`. Each replica loads its stage once (`adm.stage.Stage`, as the sampling job's
actors do) and serves it one of two ways (the config's `scheduling`):

- "step" (the default): a step engine (`adm.engine.Engine`) with `batch_rows` slots runs in a
  thread of the replica. `generate(job)` is a streaming method: it submits the job's rows and
  yields the request's events (queued, progress, preview, result, error) as the engine sends
  them. When the caller goes away (the HTTP client disconnected, and Serve cancelled the call
  through the handles), the generator is closed and the rows leave the engine at its next step.
- "request": `run(job)`, `@serve.batch`ed: concurrent requests are collected for up to
  `batch_wait_s`, grouped by settings and run to the end as fixed-size model calls
  (`adm.stage.run_batch`), in a worker thread.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np
import torch
from ray import serve

from .. import checkpoints
from ..diffusion.rows import RowSpec, RowStepper
from ..engine import Engine, Request, StepperRunner
from ..precision import precision_name
from ..stage import Job, Output, Stage, resolve_fast_path, run_batch
from .autoscaling import LOAD_METRIC, replica_load
from .metrics import EngineMetrics

logger = logging.getLogger("ray.serve")
METRICS_EVERY_S = 0.5


@dataclass(frozen=True)
class StepJob:
    """One request's rows for a step engine: `spec` how each row samples; labels [n] and
    seeds [n]; low_res [n, h, w, 3] uint8 for the upsampler; its class and preview interval."""

    spec: RowSpec
    labels: tuple
    seeds: tuple
    low_res: np.ndarray | None = None
    priority: str = "interactive"
    preview_every: int = 0


class _Replica:
    """What both deployments share: their `Stage` and the `@serve.batch` entry point."""

    role, stage_name = "stage", "stage"

    def _setup(self, spec: checkpoints.ModelSpec, classifier: checkpoints.ModelSpec | None,
               precision: str, max_batch_requests: int, batch_wait_s: float,
               batch_rows: int, compile: bool | str, scheduling: str,
               engine_options: dict) -> None:
        # The replica's GPU when Ray gave it one (num_gpus in ray_actor_options), else the CPU;
        # "auto" is decided here, on the replica's own hardware, not where the app was built.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, compile = resolve_fast_path(precision, compile, device, None)
        self.stage = Stage.load(spec, classifier, precision, device, batch_rows, compile)
        # Compiled networks compile in the constructor, so the replica is ready (and counted
        # by the autoscaler) only once requests will not wait for it.
        warm_up_s = self.stage.warm_up() if compile and scheduling == "request" else 0.0
        self.run.set_max_batch_size(max_batch_requests)
        self.run.set_batch_wait_timeout_s(batch_wait_s)
        self.engine = None
        if scheduling == "step":
            stepper = RowStepper(self.stage.net, self.stage.diffusion, slots=batch_rows,
                                 image_size=self.stage.size, classifier=self.stage.classifier,
                                 autocast=self.stage.autocast, compile=compile, device=device)
            self.engine = Engine(StepperRunner(stepper), batch_rows, **engine_options)
            if compile:
                warm_up_s = self._warm_up()
            self.metrics = EngineMetrics(self.stage_name)
            threading.Thread(target=self._engine_loop, name="adm-engine", daemon=True).start()
        logger.info("%s: loaded %s (%s) on %s, %s%s; %s, model calls of %d rows", self.role,
                    spec.uri, spec.sha256[:12], device, precision,
                    f", compiled in {warm_up_s:.0f} s" if compile else "",
                    "step engine" if self.engine else
                    f"batches of up to {max_batch_requests} requests", batch_rows)

    def _warm_up(self) -> float:
        """One two-step row of each kind the engine steps (the networks compile now)."""
        start = time.perf_counter()
        low = None
        if self.stage.low_res_size is not None:
            low = np.zeros((1, self.stage.low_res_size, self.stage.low_res_size, 3), np.uint8)
        guided = 1.0 if self.stage.classifier is not None else 0.0
        self.engine.submit(Request("warm-up", RowSpec("ddim", "2", classifier_scale=guided),
                                   [0], [0], low))
        while self.engine.step():
            pass
        return time.perf_counter() - start

    def _engine_loop(self) -> None:
        """The engine's thread: a step whenever there is work; the metrics after each step
        (step time) and at most every METRICS_EVERY_S (the rest: a gauge must be set again
        within two of Ray's report intervals or it drops out of the scrape)."""
        last = 0.0
        while True:
            self.engine.wait_for_work(timeout=1.0)
            try:
                stepped = self.engine.step()
            except Exception:  # a bug outside a step's own failure: log it, keep serving
                logger.exception("%s: engine step failed", self.role)
                time.sleep(0.1)
                continue
            now = time.monotonic()
            if now - last >= METRICS_EVERY_S:
                self.metrics.update(self.engine.stats)
                last = now
            if stepped:
                self.metrics.step_seconds.observe(self.engine.stats.last_step_s,
                                                  tags=self.metrics.tags)

    async def generate(self, job: "StepJob") -> AsyncIterator[tuple[str, dict]]:
        """The job's events, (kind, data) as `adm.engine.Request` describes them, ending with
        "result" or "error" (called with `handle.options(stream=True)`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex
        try:
            self.engine.submit(Request(
                rid, job.spec, list(job.labels), list(job.seeds), job.low_res, job.priority,
                job.preview_every,
                on_event=lambda kind, data: loop.call_soon_threadsafe(events.put_nowait,
                                                                      (kind, data))))
        except ValueError as e:
            yield "error", {"status": 422, "detail": str(e)}
            return
        try:
            while True:
                kind, data = await events.get()
                yield kind, data
                if kind in ("result", "error"):
                    return
        finally:  # done, failed, or the caller went away (cancelled): free the rows
            self.engine.cancel(rid)

    def record_autoscaling_stats(self) -> dict:
        """The load `adm.serve.autoscaling.QueuedWorkPolicy` scales on (Serve polls this when
        the deployment autoscales); none in "request" scheduling."""
        return {} if self.engine is None else {LOAD_METRIC: replica_load(self.engine.stats)}

    def stats(self) -> dict:
        """This replica's engine counters and gauges (`adm.engine.Stats`; the same numbers go
        to Ray's Prometheus endpoint, adm.serve.metrics)."""
        return dataclasses.asdict(self.engine.stats) if self.engine is not None else {}

    def ready(self) -> dict:
        """Answers once this replica has loaded its networks (GET /healthz)."""
        return {"device": str(self.stage.device), "image_size": self.stage.size,
                "precision": precision_name(self.stage.autocast),
                "compile": self.stage.compile}

    # One batch queue per process, and each replica is its own actor process; _setup sets the
    # limits from the config before the first call.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def run(self, jobs: list[Job]) -> list[Output]:
        """One @serve.batch call: every job's images (limits set per replica in _setup)."""
        start = time.perf_counter()
        outputs = await asyncio.to_thread(run_batch, self.stage, jobs)
        logger.info("%s batch: %d requests, %d images, %d settings group(s), %.2f s", self.role,
                    len(jobs), outputs[0].batch_images, outputs[0].groups,
                    time.perf_counter() - start)
        return outputs


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class GuidedSampler(_Replica):
    """Base samples of one class, classifier-guided when the request's guidance_scale > 0."""

    role, stage_name = "GuidedSampler", "base"

    def __init__(self, base: checkpoints.ModelSpec, classifier: checkpoints.ModelSpec | None,
                 precision: str = "auto", max_batch_requests: int = 8, batch_wait_s: float = 0.05,
                 batch_rows: int = 8, compile: bool | str = "auto", scheduling: str = "step",
                 engine_options: dict | None = None):
        self._setup(base, classifier, precision, max_batch_requests, batch_wait_s, batch_rows,
                    compile, scheduling, engine_options or {})


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Upsampler(_Replica):
    """The super-resolution stage: base images in (a job's `low_res`), `large_size` images
    out."""

    role, stage_name = "Upsampler", "upsample"

    def __init__(self, upsampler: checkpoints.ModelSpec, precision: str = "auto",
                 max_batch_requests: int = 8, batch_wait_s: float = 0.05, batch_rows: int = 8,
                 compile: bool | str = "auto", scheduling: str = "step",
                 engine_options: dict | None = None):
        self._setup(upsampler, None, precision, max_batch_requests, batch_wait_s, batch_rows,
                    compile, scheduling, engine_options or {})
