"""The two model deployments: `GuidedSampler` (base model + optional classifier) and
`Upsampler`. Each replica loads its networks once (`adm.checkpoints.load`: the same
weights_only loading and the same `adm.diffusion.sample` call as the sampling job's
`StageSampler`), then serves `@serve.batch`ed calls: concurrent requests are collected for up
to `batch_wait_s`, grouped by settings and run as fixed-size model calls
(`adm.serve.batching`). The model call runs in a worker thread so that the replica keeps
accepting requests (the next batch fills while this one computes).
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch
from ray import serve

from .. import factory
from ..diffusion import sample
from .. import checkpoints
from ..checkpoints import AUTOCAST, from_uint8, to_uint8
from .batching import Job, Output, run_batch

logger = logging.getLogger("ray.serve")


def pick_device() -> torch.device:
    """The replica's GPU when Ray gave it one (num_gpus in ray_actor_options), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Stage:
    """What both deployments share: the network on its device, its diffusion and batching."""

    role = "stage"

    def _setup(self, spec: checkpoints.ModelSpec, precision: str, max_batch_requests: int,
               batch_wait_s: float, batch_rows: int) -> None:
        self.device = pick_device()
        self.autocast = AUTOCAST[precision]
        self.net = checkpoints.load(spec, self.device)
        self.diffusion = factory.create_diffusion({**spec.flags, "timestep_respacing": ""})
        self.size = checkpoints.image_size(spec)
        self.rows = batch_rows
        self.run.set_max_batch_size(max_batch_requests)
        self.run.set_batch_wait_timeout_s(batch_wait_s)
        logger.info("%s: loaded %s (%s) on %s; batches of up to %d requests, model calls of "
                    "%d rows", self.role, spec.uri, spec.sha256[:12], self.device,
                    max_batch_requests, batch_rows)

    def ready(self) -> dict:
        """Answers once this replica has loaded its networks (GET /healthz)."""
        return {"device": str(self.device), "image_size": self.size}

    # One batch queue per process, and each replica is its own actor process; _setup sets the
    # limits from the config before the first call.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def run(self, jobs: list[Job]) -> list[Output]:
        """One @serve.batch call: every job's images (limits set per replica in _setup)."""
        start = time.perf_counter()
        outputs = await asyncio.to_thread(run_batch, jobs, self._call, self.rows)
        logger.info("%s batch: %d requests, %d images, %d settings group(s), %.2f s", self.role,
                    len(jobs), outputs[0].batch_images, outputs[0].groups,
                    time.perf_counter() - start)
        return outputs

    def _call(self, args: dict, labels: np.ndarray, seeds: list, low_res) -> np.ndarray:
        raise NotImplementedError


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class GuidedSampler(_Stage):
    """Base samples of one class, classifier-guided when the request's guidance_scale > 0."""

    role = "GuidedSampler"

    def __init__(self, base: checkpoints.ModelSpec, classifier: checkpoints.ModelSpec | None,
                 precision: str = "fp32", max_batch_requests: int = 8, batch_wait_s: float = 0.05,
                 batch_rows: int = 8):
        self._setup(base, precision, max_batch_requests, batch_wait_s, batch_rows)
        self.classifier = checkpoints.load(classifier, self.device) if classifier else None

    def _call(self, args: dict, labels: np.ndarray, seeds: list, low_res) -> np.ndarray:
        """[rows, H, W, 3] uint8 base samples of `labels` [rows], row i from seeds[i]."""
        guided = self.classifier is not None and args.get("classifier_scale", 0.0) > 0
        kwargs = dict(args)
        if not guided:
            kwargs.pop("classifier_scale", None)  # scale 0: no classifier passes at all
        x = sample(self.net, self.diffusion, (len(labels), 3, self.size, self.size), **kwargs,
                   classifier=self.classifier if guided else None,
                   y=torch.from_numpy(labels).to(self.device), seeds=seeds,
                   autocast_dtype=self.autocast, device=self.device)
        return to_uint8(x)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Upsampler(_Stage):
    """The super-resolution stage: base images in, `large_size` images out."""

    role = "Upsampler"

    def __init__(self, upsampler: checkpoints.ModelSpec, precision: str = "fp32",
                 max_batch_requests: int = 8, batch_wait_s: float = 0.05, batch_rows: int = 8):
        self._setup(upsampler, precision, max_batch_requests, batch_wait_s, batch_rows)

    def _call(self, args: dict, labels: np.ndarray, seeds: list, low_res) -> np.ndarray:
        """[rows, L, L, 3] uint8 from the base images `low_res` [rows, l, l, 3] uint8."""
        low = from_uint8(low_res, self.device)
        x = sample(self.net, self.diffusion, (len(labels), 3, self.size, self.size), **args,
                   y=torch.from_numpy(labels).to(self.device), model_kwargs={"low_res": low},
                   seeds=seeds, autocast_dtype=self.autocast, device=self.device)
        return to_uint8(x)
