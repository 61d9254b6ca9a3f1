"""Autoscaled serving on a simulated cluster built from cluster.yaml, under a burst of
batch-class work: the model replicas scale on the work queued in their step engines
(`adm.serve.autoscaling:QueuedWorkPolicy`), serving nodes follow, and the latency of
interactive requests sent meanwhile recovers once the new replicas run.

    python benchmarks/autoscale.py                    # writes timeline.json, docs/autoscaling.png
    python benchmarks/autoscale.py --out runs/autoscale --plot docs/autoscaling.png

`adm.simcluster` starts a head with Ray's own autoscaler (fake multi-node provider) and
cluster.yaml's node types, scaled down to this machine (idle timeout 15 s instead of 5 min).
A Serve config like serve_configs/local.yaml is deployed with a tiny random-weight base model
whose replicas ask for `adm_serve` (min 1, max 3), so each replica needs a serving node; they
take 32 requests each (the work waits in their engines, where it is counted) and scale on
QueuedWorkPolicy (slots = batch_rows), with the control loop scaled down (metrics every 0.5 s,
2 s look-back and upscale delay), `max_wait_steps` 100 and `aged_share` 1.0.

The load: closed-loop clients send batch-class requests (4 images, 50 DDIM steps each) back to
back, 1 -> 8 -> 1 clients, then stop; meanwhile an interactive probe sends a 1-image 10-step
request every 0.5 s (open loop: each on its own thread, so a slow one never delays the next)
and its latency is recorded apart. Every second the timeline records the batch clients, the
replicas per deployment and their states (Serve's REST API), the nodes per type (Ray's state
API), the probe's and the batch requests' p50/p95 over the last 5 s, and errors.

Why the probe suffers and recovers: interactive rows take a batch row's slot at the next step,
so on an engine that is not overloaded a probe runs at once. Under a burst larger than the
replica's slots the batch rows wait, and a batch row that has waited `max_wait_steps` steps
ages (never starved, adm.engine): it goes first, and the oldest aged rows, up to `aged_share`
of the slots, are never paused. The scenario sets that share to 1.0, the setting under which
aged batch work holds every slot: on one replica 8 clients x 4 rows leave 24 rows waiting
about 150 steps, so the aged batch rows hold the slots when a probe arrives and the probe
waits behind them. (With the default 0.5, the probe pauses an aged batch row outside the share
and keeps its latency on one replica.) Spread over three replicas, about
3 rows wait per engine, never long enough to age, and the probe overtakes them again. (On two
cores more replicas add no compute: every step takes longer, so the probe's latency after the
scale-up is above its value before the burst.)

Printed: from the load step to the first new serving node ALIVE, to the first replica RUNNING
on it (Serve's REST API), to the first request that replica answered (the access-log line the
replica writes when it returns a call, read from its log file: Serve's REST API names the file,
and the simulated nodes share one machine), and from the end of the load back to the minimum
(one serving node); the probe's latency before the burst, during it before a new replica ran,
and after the burst's replicas all ran; batch images/s in each. The test suite
(tests/test_autoscale.py) drives the same functions.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import requests
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import export  # noqa: E402  (benchmarks/serve.py: random weights saved as exported)

from adm import factory  # noqa: E402
from adm.nodetypes import BATCH_RESOURCE, SERVE_RESOURCE, TRAIN_RESOURCE  # noqa: E402
from adm.runtime import free_port  # noqa: E402
from adm.simcluster import SimSettings, SimulatedCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP, BASE = "adm", "GuidedSampler"
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
# Node kinds by the workload resource a node offers (what Ray's state API reports of it).
KINDS = {SERVE_RESOURCE: "gpu_serve", TRAIN_RESOURCE: "gpu_train", BATCH_RESOURCE: "gpu_batch"}
RAMP = ((1, 10.0), (8, 40.0), (1, 10.0))  # (batch clients, seconds)
MAX_REPLICAS = 3  # of the base deployment (one serving node each)
BATCH_ROWS = 8  # the engine's slots (QueuedWorkPolicy's `slots`)
BATCH_IMAGES, BATCH_STEPS = 4, 50  # a batch request: 4 rows x 50 DDIM steps (~10 ms a step)
PROBE_STEPS, PROBE_EVERY_S = 10, 0.5  # the interactive probe: 1 row x 10 steps, every 0.5 s
AGE_STEPS = 100  # max_wait_steps: a batch row waiting longer ages and goes first ...
AGED_SHARE = 1.0  # ... in any slot (aged_share): the case that only more replicas help
SETTLE_S = 2.0  # the "after" window opens at least this long after the burst's last replica
# RUNNING, and once the batch requests sent before it have all been answered (`windows`)
LATENCY_WINDOW_S = 5.0  # the timeline's p50/p95: the requests that ended in the last 5 s
# A random-weight base model of 8 px: ~10 ms a step of 8 rows on one CPU thread.
TINY = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "4", "num_head_channels": 32, "class_cond": True,
        "num_classes": 10, "learn_sigma": True, "resblock_updown": True,
        "diffusion_steps": 100, "noise_schedule": "cosine"}


def node_kind(node) -> str:
    """'head', a cluster.yaml worker type (by its workload resource) or 'cpu_worker'."""
    if node.is_head_node:
        return "head"
    return next((kind for res, kind in KINDS.items() if node.resources_total.get(res)),
                "cpu_worker")


def serve_config(models: Path, port: int, max_replicas: int = MAX_REPLICAS,
                 aged_share: float = AGED_SHARE) -> dict:
    """A config like serve_configs/local.yaml: the tiny base model, its replicas on serving
    nodes (adm_serve, one per node: the scaled node has 1 GPU) scaling on the work queued in
    their engines, the ingress on the head."""
    base = export(models / "diffusion", factory.create_model(TINY), TINY, 0)
    gpu = {"num_cpus": 1, "num_gpus": 1, "resources": {SERVE_RESOURCE: 1}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "adm.serve:build_app",
            "args": {"base": base, "max_images": BATCH_IMAGES, "max_steps": 100,
                     "samplers": ["ddim"], "default_sampler": "ddim",
                     "default_steps": BATCH_STEPS, "precision": "fp32", "scheduling": "step",
                     "batch_rows": BATCH_ROWS, "max_wait_steps": AGE_STEPS,
                     "aged_share": aged_share,
                     "require_api_key": False},
            # JSON lines: each replica's access log ("CALL generate OK 12.3ms") with its time,
            # read by `first_answers`.
            "logging_config": {"encoding": "JSON"},
            "deployments": [
                # More requests than slots: the work waits in the engines, where it is counted
                # (and interactive rows go first), not in Serve's queue.
                {"name": BASE, "max_ongoing_requests": 32, "max_queued_requests": 64,
                 "ray_actor_options": gpu,
                 "autoscaling_config": {
                     "min_replicas": 1, "max_replicas": max_replicas,
                     "metrics_interval_s": 0.5, "look_back_period_s": 2,
                     "upscale_delay_s": 2, "downscale_delay_s": 5,
                     "policy": {"policy_function": "adm.serve.autoscaling:QueuedWorkPolicy",
                                "policy_kwargs": {"target_load": 1.0, "slots": BATCH_ROWS}}}},
                # Ray's own head-node resource: the ingress never holds a worker node up (a
                # serving node it sat on could not be removed when idle).
                {"name": "Ingress", "max_ongoing_requests": 64, "max_queued_requests": 64,
                 "num_replicas": 1, "ray_actor_options": {
                     "num_cpus": 0.1, "resources": {"node:__internal_head__": 0.01}}},
            ]}]}


def deploy(sim: SimulatedCluster, config: dict, folder: Path, timeout: float = 180) -> str:
    """`serve deploy` the config to the cluster; returns the app's URL once it answers."""
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([SERVE, "deploy", str(path), "--address", sim.address],
                          env=sim.env_for_clients(), capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"serve deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    port = config["http_options"]["port"]
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app did not answer at {url} in {timeout} s")


@dataclass
class Request:
    start: float
    end: float
    status: int  # HTTP status; 0: no answer (connection error or timeout)
    error: str = ""
    kind: str = "batch"  # "batch": a client's; "interactive": the probe's
    images: int = 0  # images answered (0 unless a 200)


# The body of each kind of request (plus class_id and seed).
BODIES = {"batch": {"num_images": BATCH_IMAGES, "steps": BATCH_STEPS, "priority": "batch"},
          "interactive": {"num_images": 1, "steps": PROBE_STEPS, "priority": "interactive"}}


class Load:
    """Loopback clients sending batch-class requests back to back (`set_clients` changes their
    number while it runs: client i runs while i < clients), and, once `start_probe` is called,
    an interactive probe: one small request every `every` s, each on a thread of its own."""

    def __init__(self, url: str, timeout: float = 60):
        self.url, self.timeout = url, timeout
        self.requests: list[Request] = []
        self.clients = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._probe_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._probes: list[threading.Thread] = []
        self.in_flight: dict[int, tuple[float, str]] = {}  # sent, unanswered: (start, kind)
        self._sent = 0

    def set_clients(self, n: int) -> None:
        self.clients = n
        for i in range(n):
            if i >= len(self._threads):
                self._threads.append(None)
            if self._threads[i] is None or not self._threads[i].is_alive():
                self._threads[i] = threading.Thread(target=self._client, args=(i,), daemon=True)
                self._threads[i].start()

    def _client(self, index: int) -> None:
        session, i = requests.Session(), 0
        while not self._stop.is_set() and index < self.clients:
            self._one(session, index * 100000 + i, "batch")
            i += 1

    def start_probe(self, every: float = PROBE_EVERY_S) -> None:
        def run():
            i, next_at = 0, time.time()
            while not self._probe_stop.wait(max(0.0, next_at - time.time())):
                t = threading.Thread(target=self._one, args=(None, 10_000_000 + i,
                                                             "interactive"), daemon=True)
                t.start()
                self._probes.append(t)
                i, next_at = i + 1, next_at + every
        self._probes.append(threading.Thread(target=run, daemon=True))
        self._probes[-1].start()

    def stop_probe(self) -> None:
        """No new probe; wait for those in flight (at most `timeout` s)."""
        self._probe_stop.set()
        for t in list(self._probes):
            t.join(self.timeout + 5)

    def _one(self, session: requests.Session | None, seed: int, kind: str) -> None:
        body = {"class_id": seed % 10, "seed": seed, **BODIES[kind], "response": "json"}
        t, images = time.time(), 0
        with self._lock:
            key = self._sent = self._sent + 1
            self.in_flight[key] = (t, kind)
        try:
            r = (session or requests).post(f"{self.url}/v1/generate", json=body,
                                           timeout=self.timeout)
            status, error = r.status_code, "" if r.status_code == 200 else r.text[:300]
            if status == 200:
                images = len(r.json()["images"])
        except (requests.RequestException, ValueError, KeyError) as e:
            status, error = 0, f"{type(e).__name__}: {e}"[:300]
        with self._lock:
            self.requests.append(Request(t, time.time(), status, error, kind, images))
            del self.in_flight[key]

    def stop(self) -> None:
        """Stop every client and the probe once its request in flight has ended (at most
        `timeout` s)."""
        self._stop.set()
        for t in self._threads:
            if t is not None:
                t.join(self.timeout + 5)
        self.stop_probe()


def ramp(load: Load, phases=RAMP, on_phase: Callable[[int, int], None] | None = None) -> list:
    """Run the load phases, (batch clients, seconds), where seconds may be a callable instead:
    the phase lasts until it returns True (asked every 0.5 s). The probe runs from the first
    phase's start to the last one's end. Returns (start time, clients) of each phase, and the
    end (0 clients)."""
    marks = []
    load.start_probe()
    for i, (clients, seconds) in enumerate(phases):
        load.set_clients(clients)
        marks.append((time.time(), clients))
        if on_phase:
            on_phase(i, clients)
        if callable(seconds):
            while not seconds():
                time.sleep(0.5)
        else:
            time.sleep(seconds)
    load.set_clients(0)
    marks.append((time.time(), 0))
    load.stop_probe()
    return marks


@dataclass
class Sample:
    """One second of the timeline."""

    t: float
    clients: int  # batch clients
    nodes: dict[str, int]  # kind -> ALIVE nodes
    replicas: dict[str, dict[str, int]]  # deployment -> state -> count
    replica_nodes: dict[str, list[str]]  # deployment -> node ids of its RUNNING replicas
    # latency of the 200s that ended in the last LATENCY_WINDOW_S, s: the probe's, the batch's
    probe_p50: float | None = None
    probe_p95: float | None = None
    batch_p50: float | None = None
    batch_p95: float | None = None
    answered: int = 0  # 200s that ended in this interval
    batch_images: int = 0  # images of the batch 200s that ended in this interval
    errors: int = 0
    rejected: int = 0  # 503 from the bounded queue


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)
    node_kinds: dict[str, str] = field(default_factory=dict)  # node id -> kind, every node seen
    alive_since: dict[str, float] = field(default_factory=dict)  # node id -> first seen ALIVE
    # replica id -> (node id, its log file relative to Ray's logs dir), every BASE replica seen
    replica_logs: dict[str, tuple[str, str]] = field(default_factory=dict)


class Recorder:
    """Every `interval` s: nodes from Ray's state API, replicas from Serve's REST API, and the
    load's requests that ended in that interval."""

    def __init__(self, sim: SimulatedCluster, load: Load | None = None, interval: float = 1.0):
        self.sim, self.load, self.interval = sim, load, interval
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.failures: list[str] = []

    def start(self) -> "Recorder":
        self._thread.start()
        return self

    def stop(self) -> Timeline:
        self._stop.set()
        self._thread.join(30)
        return self.timeline

    def _run(self) -> None:
        last = time.time()
        while not self._stop.is_set():
            try:
                self.timeline.samples.append(self.sample(last))
            except Exception as e:  # a state API call that timed out: the next one may work
                self.failures.append(f"{type(e).__name__}: {e}")
            last = time.time()
            self._stop.wait(self.interval)

    def sample(self, since: float) -> Sample:
        now = time.time()
        nodes: dict[str, int] = {}
        for n in self.sim.nodes():
            kind = node_kind(n)
            self.timeline.node_kinds[n.node_id] = kind
            if n.state == "ALIVE":
                nodes[kind] = nodes.get(kind, 0) + 1
                self.timeline.alive_since.setdefault(n.node_id, now)
        app = serve_app(self.sim)
        replicas, where = replica_states(app)
        for rep in app.get("deployments", {}).get(BASE, {}).get("replicas", []):
            if rep.get("node_id") and rep.get("log_file_path"):
                self.timeline.replica_logs[rep["replica_id"]] = (rep["node_id"],
                                                                 rep["log_file_path"])
        s = Sample(now, self.load.clients if self.load else 0, nodes, replicas, where)
        if self.load:
            ended = list(self.load.requests)
            done = [r for r in ended if since <= r.end < now]
            # latency over a trailing window: a second holds too few requests on 2 cores
            for kind, prefix in (("interactive", "probe"), ("batch", "batch")):
                ok = [r.end - r.start for r in ended if r.kind == kind and r.status == 200
                      and now - LATENCY_WINDOW_S <= r.end < now]
                if ok:
                    setattr(s, f"{prefix}_p50", float(np.percentile(ok, 50)))
                    setattr(s, f"{prefix}_p95", float(np.percentile(ok, 95)))
            s.answered = sum(r.status == 200 for r in done)
            s.batch_images = sum(r.images for r in done if r.kind == "batch")
            s.rejected = sum(r.status == 503 for r in done)
            s.errors = sum(r.status not in (200, 503) for r in done)
        return s


def serve_app(sim: SimulatedCluster) -> dict:
    """The app's details from Serve's REST API on the dashboard (what `serve status` and
    `serve.status()` report); {} before it is deployed."""
    r = requests.get(f"{sim.address}/api/serve/applications/", timeout=10)
    r.raise_for_status()
    return r.json().get("applications", {}).get(APP) or {}


def serve_replicas(sim: SimulatedCluster) -> tuple[dict, dict]:
    """Per deployment of the app: replica states and the nodes of the RUNNING ones."""
    return replica_states(serve_app(sim))


def replica_states(app: dict) -> tuple[dict, dict]:
    states: dict[str, dict[str, int]] = {}
    where: dict[str, list[str]] = {}
    for name, dep in app.get("deployments", {}).items():
        states[name] = {}
        for rep in dep.get("replicas", []):
            states[name][rep["state"]] = states[name].get(rep["state"], 0) + 1
            if rep["state"] == "RUNNING":
                where.setdefault(name, []).append(rep["node_id"])
    return states, where


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s")


def serving_nodes(sim: SimulatedCluster) -> list:
    return [n for n in sim.nodes() if n.state == "ALIVE" and node_kind(n) == "gpu_serve"]


# What a model replica's access log writes when it returns a request's call: "CALL generate OK
# 12.3ms" (step scheduling's streaming method), "CALL run OK ..." (request scheduling); not
# the /healthz probe's "CALL ready OK".
ANSWER_LINES = ("CALL generate OK", "CALL run OK")


def first_answer(log_file: Path) -> float | None:
    """When a replica first returned a request's call (epoch seconds), from its JSON log: the
    first access-log line of `ANSWER_LINES`; None if it answered none."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if str(record.get("message", "")).startswith(ANSWER_LINES):
            if "timestamp_ns" in record:
                return int(record["timestamp_ns"]) / 1e9
            return time.mktime(time.strptime(record["asctime"].split(",")[0],
                                             "%Y-%m-%d %H:%M:%S")) \
                + int(record["asctime"].split(",")[1]) / 1000
    return None


def first_answers(timeline: Timeline, logs_dir: Path) -> dict[str, float]:
    """Node id -> when a BASE replica on it first answered a request (epoch seconds)."""
    out: dict[str, float] = {}
    for node, rel in timeline.replica_logs.values():
        t = first_answer(logs_dir / rel.lstrip("/"))
        if t is not None:
            out[node] = min(t, out.get(node, t))
    return out


def running(s: Sample) -> int:
    return s.replicas.get(BASE, {}).get("RUNNING", 0)


def drained(load: Load, t: float) -> float | None:
    """When the last batch request sent before `t` was answered (epoch seconds; `t` if none
    was sent before it); None while one of them is still in flight."""
    with load._lock:
        if any(kind == "batch" and start < t for start, kind in load.in_flight.values()):
            return None
        return max((r.end for r in load.requests if r.kind == "batch" and r.start < t),
                   default=t)


def after_opens(load: Load, full: float) -> float | None:
    """The "after" window's start, given when the burst's replicas were all RUNNING: SETTLE_S
    later, and not before the work routed while fewer replicas ran (the one replica's backlog,
    whose rows had aged) has left the engines; None while it has not."""
    done = drained(load, full)
    return None if done is None else max(full + SETTLE_S, done)


def windows(timeline: Timeline, marks: list, load: Load
            ) -> dict[str, tuple[float, float] | None]:
    """The probe's windows (start, end), epoch seconds, by when a probe was sent:
    - "before": the phase before the burst (marks[0] .. marks[1]);
    - "during": from the burst's start until a replica more than at its start is RUNNING (or
      the burst's end, if none came);
    - "after": from `after_opens` (the burst's replicas all RUNNING, the first sample at the
      burst's most, and the batch requests sent before that answered) to the burst's end;
      None if no replica was added.
    The burst is the phase of marks[1]."""
    step, end = marks[1][0], marks[2][0]
    burst = [s for s in timeline.samples if step <= s.t < end]
    at_step = max((running(s) for s in timeline.samples if s.t < step), default=1)
    more = next((s.t for s in burst if running(s) > at_step), None)
    peak = max((running(s) for s in burst), default=0)
    after = None
    if more is not None:
        opens = after_opens(load, next(s.t for s in burst if running(s) == peak))
        after = (opens, end) if opens is not None and opens < end else None
    return {"before": (marks[0][0], step), "during": (step, more or end), "after": after}


def window_figures(load: Load, span: tuple[float, float] | None) -> dict:
    """The probe's p50/p95 (s) and count in a window (probes sent in it), and the batch
    images/s answered in it."""
    if span is None:
        return {"probes": 0, "p50_s": None, "p95_s": None, "batch_images_per_s": None}
    a, b = span
    lat = [r.end - r.start for r in load.requests
           if r.kind == "interactive" and r.status == 200 and a <= r.start < b]
    images = sum(r.images for r in load.requests if r.kind == "batch" and a <= r.end < b)
    return {"from_s": a, "to_s": b, "probes": len(lat),
            "p50_s": float(np.percentile(lat, 50)) if lat else None,
            "p95_s": float(np.percentile(lat, 95)) if lat else None,
            "batch_images_per_s": images / (b - a) if b > a else None}


def figures(timeline: Timeline, marks: list, load: Load, logs_dir: Path) -> dict:
    """The measured times of a ramp (seconds; None when it did not happen) and the probe's
    latency in its windows (`windows`; their from_s/to_s relative to the load step).
    `logs_dir`: Ray's logs dir of the cluster (the replicas' log files)."""
    step, end = marks[1][0], marks[-1][0]
    serve_nodes = {n: t for n, t in timeline.alive_since.items()
                   if timeline.node_kinds.get(n) == "gpu_serve"}
    before = {n for n, t in serve_nodes.items() if t < step}
    new = sorted((t, n) for n, t in serve_nodes.items() if n not in before)
    first_new = new[0] if new else None
    on_new = answered = None
    if first_new:
        for s in timeline.samples:
            if s.t >= first_new[0] and first_new[1] in s.replica_nodes.get(BASE, []):
                on_new = s.t
                break
        answered = first_answers(timeline, logs_dir).get(first_new[1])
    back = next((s.t for s in timeline.samples if s.t > end
                 and s.nodes.get("gpu_serve", 0) == 1
                 and running(s) == 1 and sum(s.replicas.get(BASE, {}).values()) == 1), None)
    codes = [r.status for r in load.requests]
    probe = {}
    for name, span in windows(timeline, marks, load).items():
        probe[name] = window_figures(load, span)
        for k in ("from_s", "to_s"):
            if k in probe[name]:
                probe[name][k] = round(probe[name][k] - step, 1)
    burst = [s for s in timeline.samples if step <= s.t < marks[2][0]]
    return {
        "load_step_to_new_node_s": first_new[0] - step if first_new else None,
        "load_step_to_new_replica_running_s": on_new - step if on_new else None,
        "load_step_to_new_replica_answer_s": answered - step if answered else None,
        "load_end_to_minimum_s": back - end if back else None,
        "max_serving_nodes": max((s.nodes.get("gpu_serve", 0) for s in timeline.samples),
                                 default=0),
        "max_replicas_running": max((running(s) for s in burst), default=0),
        # (t from the load step, RUNNING base replicas, ALIVE serving nodes) at each change
        "replicas_timeline": changes(timeline, step),
        "probe": probe,
        "requests": len(codes), "ok": codes.count(200), "rejected_503": codes.count(503),
        "errors": sum(c not in (200, 503) for c in codes),
        "batch_requests_ok": sum(r.status == 200 for r in load.requests if r.kind == "batch"),
        "probe_requests_ok": sum(r.status == 200 for r in load.requests
                                 if r.kind == "interactive"),
    }


def changes(timeline: Timeline, t0: float) -> list[tuple[float, int, int]]:
    """(seconds from t0, RUNNING base replicas, ALIVE serving nodes) whenever either changed."""
    out, last = [], None
    for s in timeline.samples:
        now = (running(s), s.nodes.get("gpu_serve", 0))
        if now != last:
            out.append((round(s.t - t0, 1), *now))
            last = now
    return out


def plot(timeline: Timeline, marks: list, out: Path, load: Load | None = None) -> None:
    """The timeline; with the load, its probes (each a dot at the time it was sent, the
    windows' unit) and windows."""
    requests_ = load.requests if load else []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = timeline.samples[0].t
    t = [s.t - t0 for s in timeline.samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    axes[0].step(t, [s.clients for s in timeline.samples], where="post",
                 label=f"batch clients ({BATCH_IMAGES} images x {BATCH_STEPS} steps)")
    axes[0].set_ylabel("offered load\n(batch clients)")
    ax0b = axes[0].twinx()  # batch images/s over the trailing LATENCY_WINDOW_S
    rate = []
    for s in timeline.samples:
        recent = [x for x in timeline.samples if s.t - LATENCY_WINDOW_S < x.t <= s.t]
        span = s.t - max(t0, s.t - LATENCY_WINDOW_S)
        rate.append(sum(x.batch_images for x in recent) / span if span > 0 else np.nan)
    ax0b.plot(t, rate, color="tab:green", linewidth=1,
              label=f"batch images/s (last {LATENCY_WINDOW_S:g} s)")
    ax0b.set_ylabel("batch images/s", color="tab:green")
    ax0b.set_ylim(0, None)
    ax0b.legend(loc="upper right")
    axes[0].legend(loc="upper left")
    axes[1].step(t, [s.nodes.get("gpu_serve", 0) for s in timeline.samples], where="post",
                 label="gpu_serve nodes (ALIVE)")
    axes[1].step(t, [running(s) for s in timeline.samples],
                 where="post", linestyle="--", label=f"{BASE} replicas RUNNING")
    axes[1].set_ylabel("count")
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylim(0, max(s.nodes.get("gpu_serve", 0) for s in timeline.samples) + 1.5)
    axes[1].legend(loc="upper left", ncol=2)
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    probes = [r for r in requests_ if r.kind == "interactive" and r.status == 200]
    axes[2].scatter([r.start - t0 for r in probes], [r.end - r.start for r in probes], s=6,
                    label=f"interactive probe (1 image x {PROBE_STEPS} steps), at its send time")
    axes[2].plot(t, [nan(s.batch_p95) for s in timeline.samples], color="grey",
                 linestyle=":", label=f"batch p95 of the last {LATENCY_WINDOW_S:g} s")
    errs = [x for x, s in zip(t, timeline.samples) if s.errors]
    if errs:
        axes[2].scatter(errs, [0] * len(errs), color="red", marker="x", label="errors")
    axes[2].set_ylabel("latency (s)")
    axes[2].set_yscale("log")
    ticks = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20]
    axes[2].set_yticks(ticks, [f"{v:g}" for v in ticks])
    axes[2].minorticks_off()
    axes[2].set_xlabel("time (s)")
    for name, span in (windows(timeline, marks, load) if load else {}).items():
        if span:
            axes[2].axvspan(span[0] - t0, span[1] - t0, alpha=0.12,
                            color={"before": "tab:blue", "during": "tab:red",
                                   "after": "tab:green"}[name])
            axes[2].text((span[0] + span[1]) / 2 - t0, 0.02, name, ha="center", va="bottom",
                         transform=axes[2].get_xaxis_transform(), fontsize=8)
    axes[2].legend(loc="upper right", fontsize=8)
    for ax in axes:
        for m, _ in marks:
            ax.axvline(m - t0, color="grey", linewidth=0.6, linestyle=":")
    clients = " -> ".join(str(c) for _, c in marks[:-1])
    axes[0].set_title(f"Simulated cluster from cluster.yaml: a burst of batch work "
                      f"({clients} clients), interactive probe every {PROBE_EVERY_S:g} s",
                      fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def run(out: Path, plot_path: Path, settings: SimSettings, phases=RAMP,
        idle_wait: float = 120, aged_share: float = AGED_SHARE) -> dict:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    folder = Path(tempfile.mkdtemp(prefix="adm-autoscale-"))
    with SimulatedCluster(cluster, settings, workdir=folder) as sim:
        config = serve_config(folder / "models", free_port("127.0.0.1"), aged_share=aged_share)
        url = deploy(sim, config, folder)
        wait_until("one serving node", lambda: len(serving_nodes(sim)) == 1, 120)
        load = Load(url)
        recorder = Recorder(sim, load).start()
        try:
            marks = ramp(load, phases)
            load.stop()
            end = marks[-1][0]
            wait_until("back to the minimum", lambda: any(
                s.t > end and s.nodes.get("gpu_serve", 0) == 1
                and sum(s.replicas.get(BASE, {}).values()) == 1
                for s in recorder.timeline.samples), idle_wait)
            time.sleep(2)
        finally:
            load.stop()
            timeline = recorder.stop()
        figs = figures(timeline, marks, load, sim.logs_dir)
    result = {"figures": figs, "marks": marks, "phases": phases,
              "settings": asdict(settings), "timeline": [asdict(s) for s in timeline.samples],
              "requests": [asdict(r) for r in load.requests]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "timeline.json").write_text(json.dumps(result, indent=1))
    plot(timeline, marks, plot_path, load)
    return result["figures"]


def report(figs: dict) -> str:
    """The printed summary of `figures`."""
    fmt = lambda v: "n/a" if v is None else f"{v:.1f} s"  # noqa: E731
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    lines = [
        f"load step -> new serving node ALIVE:               "
        f"{fmt(figs['load_step_to_new_node_s'])}",
        f"load step -> a replica RUNNING on it:              "
        f"{fmt(figs['load_step_to_new_replica_running_s'])}",
        f"load step -> first request that replica answered:  "
        f"{fmt(figs['load_step_to_new_replica_answer_s'])}",
        f"end of load -> back to 1 serving node:             "
        f"{fmt(figs['load_end_to_minimum_s'])}",
        "replicas RUNNING / serving nodes ALIVE (s from the load step): " + ", ".join(
            f"{t:+.0f}: {r}/{n}" for t, r, n in figs["replicas_timeline"]),
        f"interactive probe ({PROBE_STEPS} steps, 1 image), by when it was sent:",
        "| window | from .. to (s from the load step) | probes | p50 | p95 | batch images/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, w in figs["probe"].items():
        span = f"{w['from_s']:+.1f} .. {w['to_s']:+.1f}" if "from_s" in w else "n/a"
        rate = "n/a" if w["batch_images_per_s"] is None else f"{w['batch_images_per_s']:.1f}"
        lines.append(f"| {name} | {span} | {w['probes']} | {ms(w['p50_s'])} | "
                     f"{ms(w['p95_s'])} | {rate} |")
    lines.append(f"requests {figs['requests']} ({figs['batch_requests_ok']} batch and "
                 f"{figs['probe_requests_ok']} probe 200s): {figs['ok']} x 200, "
                 f"{figs['rejected_503']} x 503, {figs['errors']} errors")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/autoscale", help="folder of timeline.json")
    p.add_argument("--plot", default=str(ROOT / "docs" / "autoscaling.png"))
    p.add_argument("--idle-timeout-s", type=float, default=15.0,
                   help="the simulated nodes' idle timeout (cluster.yaml: 300)")
    p.add_argument("--burst-s", type=float, default=RAMP[1][1],
                   help="seconds of the burst (8 batch clients)")
    p.add_argument("--aged-share", type=float, default=AGED_SHARE,
                   help="the engines' aged_share (the serving default is 0.5)")
    args = p.parse_args()
    torch.set_num_threads(1)
    phases = (RAMP[0], (RAMP[1][0], args.burst_s), RAMP[2])
    figs = run(Path(args.out), Path(args.plot),
               SimSettings(idle_timeout_minutes=args.idle_timeout_s / 60), phases,
               aged_share=args.aged_share)
    print(json.dumps(figs, indent=1))
    print(report(figs))
    print(f"timeline: {Path(args.out) / 'timeline.json'}, plot: {args.plot}")


if __name__ == "__main__":
    main()
