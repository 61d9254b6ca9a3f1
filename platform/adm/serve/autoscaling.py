"""Serve autoscaling on queued work. Each model replica reports its load, the slots its step
engine's rows want (running and waiting, classifier-free rows twice) over the slots it has
(`record_autoscaling_stats` in `adm.serve.deployments`); `QueuedWorkPolicy` asks for as many
replicas as that total load fills at `target_load` each. Counting open requests instead (Serve's
default) sees a 250-step request of 4 images and a 10-step one as the same load.

A config turns it on for a model deployment:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      metrics_interval_s: 1
      look_back_period_s: 5
      upscale_delay_s: 5
      downscale_delay_s: 60
      policy: {policy_function: "adm.serve.autoscaling:QueuedWorkPolicy",
               policy_kwargs: {target_load: 1.0}}

Serve still applies min/max_replicas and the up/down delays after the policy. The deployment
should take more requests than it has slots (`max_ongoing_requests`), so that work waits in the
engine (where it is counted, and where interactive rows overtake batch rows) rather than in
Serve's queue; Serve's queued requests are added as one row each.
"""
from __future__ import annotations

import math

from ..engine import Stats

LOAD_METRIC = "adm_load"


def replica_load(stats: Stats) -> float:
    """One replica's load: (slots in use + slots its waiting rows need) / slots."""
    return (stats.slots_used + stats.queued_slots) / stats.slots


class QueuedWorkPolicy:
    """replicas = ceil((Σ replica loads + Serve's queued requests / slots) / target_load).

    Before any replica has reported it keeps the current number (Serve clamps it to
    min_replicas..max_replicas). "request" scheduling reports nothing, so it does not scale
    on this policy: use Serve's default (target_ongoing_requests) there."""

    def __init__(self, target_load: float = 1.0, slots: int = 8):
        if not target_load > 0 or slots < 1:
            raise ValueError(f"target_load={target_load} (> 0), slots={slots} (>= 1)")
        self.target_load, self.slots = float(target_load), int(slots)

    def __call__(self, ctx) -> tuple[int, dict]:
        loads = ctx.aggregated_metrics.get(LOAD_METRIC) or {}
        if not loads:
            return ctx.current_num_replicas, {}
        total = sum(loads.values()) + ctx.total_queued_requests / self.slots
        return math.ceil(total / self.target_load - 1e-9), {"load": round(total, 3)}
