"""The two model deployments: `GuidedSampler` (base model + optional classifier) and
`Upsampler`. Each replica loads its stage once (`adm.stage.Stage`, as the sampling job's
actors do), then serves `@serve.batch`ed calls: concurrent requests are collected for up to
`batch_wait_s`, grouped by settings and run as fixed-size model calls (`adm.stage.run_batch`).
The model calls run in a worker thread so that the replica keeps accepting requests (the next
batch fills while this one computes).
"""
from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from .. import checkpoints
from ..precision import precision_name
from ..stage import Job, Output, Stage, resolve_fast_path, run_batch

logger = logging.getLogger("ray.serve")


class _Replica:
    """What both deployments share: their `Stage` and the `@serve.batch` entry point."""

    role = "stage"

    def _setup(self, spec: checkpoints.ModelSpec, classifier: checkpoints.ModelSpec | None,
               precision: str, max_batch_requests: int, batch_wait_s: float,
               batch_rows: int, compile: bool | str) -> None:
        # The replica's GPU when Ray gave it one (num_gpus in ray_actor_options), else the CPU;
        # "auto" is decided here, on the replica's own hardware, not where the app was built.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, compile = resolve_fast_path(precision, compile, device, None)
        self.stage = Stage.load(spec, classifier, precision, device, batch_rows, compile)
        # Compiled networks compile in the constructor, so the replica is ready (and counted
        # by the autoscaler) only once requests will not wait for it.
        warm_up_s = self.stage.warm_up() if compile else 0.0
        self.run.set_max_batch_size(max_batch_requests)
        self.run.set_batch_wait_timeout_s(batch_wait_s)
        logger.info("%s: loaded %s (%s) on %s, %s%s; batches of up to %d requests, model "
                    "calls of %d rows", self.role, spec.uri, spec.sha256[:12], device, precision,
                    f", compiled in {warm_up_s:.0f} s" if compile else "", max_batch_requests,
                    batch_rows)

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

    role = "GuidedSampler"

    def __init__(self, base: checkpoints.ModelSpec, classifier: checkpoints.ModelSpec | None,
                 precision: str = "auto", max_batch_requests: int = 8, batch_wait_s: float = 0.05,
                 batch_rows: int = 8, compile: bool | str = "auto"):
        self._setup(base, classifier, precision, max_batch_requests, batch_wait_s, batch_rows,
                    compile)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Upsampler(_Replica):
    """The super-resolution stage: base images in (a job's `low_res`), `large_size` images
    out."""

    role = "Upsampler"

    def __init__(self, upsampler: checkpoints.ModelSpec, precision: str = "auto",
                 max_batch_requests: int = 8, batch_wait_s: float = 0.05, batch_rows: int = 8,
                 compile: bool | str = "auto"):
        self._setup(upsampler, None, precision, max_batch_requests, batch_wait_s, batch_rows,
                    compile)
