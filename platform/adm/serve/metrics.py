"""The serving metrics, through `ray.serve.metrics` (`ray.util.metrics` with the replica's
application, deployment and replica as tags): Ray exports them on each node's Prometheus
endpoint (`ray start --metrics-export-port`), named `ray_<name>` (counters `..._total`) with the
tags below. deploy/grafana/adm-serve.json charts them.

Per stage ("base" or "upsample"), from each model replica's step engine (`adm.engine.Stats`):
- adm_rows_queued, adm_rows_in_flight (gauges; tag `class`: interactive or batch);
- adm_slots_used (gauge) against adm_slots (gauge): the replica's load;
- adm_engine_steps, adm_row_steps, adm_images, adm_requests_cancelled, adm_rows_cancelled,
  adm_preemptions (counters: steps/s and images/s are their rates);
- adm_step_seconds (histogram: one engine step, the model call and every row's update).
From the ingress: adm_first_progress_seconds (histogram: a request's arrival to its first
progress, streamed or not) and adm_requests (counter; tags `class` and `status`).
"""
from __future__ import annotations

from ..engine import PRIORITIES, Stats

STEP_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
COUNTERS = ("steps", "row_steps", "images", "requests_cancelled", "rows_cancelled",
            "preemptions")
COUNTER_NAMES = {"steps": "adm_engine_steps", "row_steps": "adm_row_steps",
                 "images": "adm_images", "requests_cancelled": "adm_requests_cancelled",
                 "rows_cancelled": "adm_rows_cancelled", "preemptions": "adm_preemptions"}


class EngineMetrics:
    """One model replica's metrics."""

    def __init__(self, stage: str):
        from ray.serve import metrics

        self.tags = {"stage": stage}
        self.queued = metrics.Gauge("adm_rows_queued", "rows waiting for a slot",
                                    tag_keys=("stage", "class"))
        self.in_flight = metrics.Gauge("adm_rows_in_flight", "rows in the running batch",
                                       tag_keys=("stage", "class"))
        self.slots_used = metrics.Gauge("adm_slots_used", "model-call rows in use",
                                        tag_keys=("stage",))
        self.slots = metrics.Gauge("adm_slots", "model-call rows per step", tag_keys=("stage",))
        self.counters = {name: metrics.Counter(COUNTER_NAMES[name], f"engine {name}",
                                               tag_keys=("stage",)) for name in COUNTERS}
        self.step_seconds = metrics.Histogram("adm_step_seconds", "one engine step",
                                              boundaries=STEP_BOUNDARIES, tag_keys=("stage",))
        self._seen = {name: 0 for name in COUNTERS}

    def update(self, stats: Stats) -> None:
        """Set the gauges and advance the counters to `stats` (the step time is observed per
        step, by the caller: `step_seconds`)."""
        for cls in PRIORITIES:
            tags = {**self.tags, "class": cls}
            self.queued.set(stats.queued[cls], tags=tags)
            self.in_flight.set(stats.in_flight[cls], tags=tags)
        self.slots_used.set(stats.slots_used, tags=self.tags)
        self.slots.set(stats.slots, tags=self.tags)
        for name in COUNTERS:
            value = getattr(stats, name)
            if value > self._seen[name]:
                self.counters[name].inc(value - self._seen[name], tags=self.tags)
                self._seen[name] = value


class IngressMetrics:
    """The ingress's metrics: time to first progress, and requests by class and status."""

    def __init__(self):
        from ray.serve import metrics

        self.first_progress = metrics.Histogram(
            "adm_first_progress_seconds", "a request's arrival to its first progress",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("class",))
        self.requests = metrics.Counter("adm_requests", "requests answered",
                                        tag_keys=("class", "status"))
