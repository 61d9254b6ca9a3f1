"""Autoscaled serving on a simulated cluster built from cluster.yaml: how long the cluster takes
to add a serving node under load, to serve from the new replica, and to shrink back when the
load ends.

    python benchmarks/autoscale.py                    # writes timeline.json, docs/autoscaling.png
    python benchmarks/autoscale.py --out runs/autoscale --plot docs/autoscaling.png

`adm.simcluster` starts a head with Ray's own autoscaler (fake multi-node provider) and
cluster.yaml's node types, scaled down to this machine (idle timeout 15 s instead of 5 min).
A Serve config like serve_configs/local.yaml is deployed with a tiny random-weight base model
whose replicas ask for `adm_serve` (min 1, max 3), so each replica needs a serving node. Loopback
clients then ramp 1 -> 8 -> 1 and stop. Every second the timeline records the offered load
(clients), the replicas per deployment and their states (Serve's REST API), the nodes per type
(Ray's state API), the p50/p95 latency of the requests that ended in that second, and errors.

Printed: from the load step to the first new serving node ALIVE, to the first replica RUNNING
on it (Serve's REST API), to the first request that replica answered (the access-log line the
replica writes when it returns a call, read from its log file: Serve's REST API names the file,
and the simulated nodes share one machine), and from the end of the load back to the minimum
(one serving node). The test suite (tests/test_autoscale.py) drives the same functions.
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
from serve import TINY, export  # noqa: E402  (benchmarks/serve.py: tiny random-weight models)

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
RAMP = ((1, 10.0), (8, 40.0), (1, 10.0))  # (clients, seconds)
STEPS = 50  # DDIM steps per request: ~0.1-0.3 s of CPU for the tiny model
LATENCY_WINDOW_S = 5.0  # p50/p95 of the requests that ended in the last 5 s


def node_kind(node) -> str:
    """'head', a cluster.yaml worker type (by its workload resource) or 'cpu_worker'."""
    if node.is_head_node:
        return "head"
    return next((kind for res, kind in KINDS.items() if node.resources_total.get(res)),
                "cpu_worker")


def serve_config(models: Path, port: int, max_replicas: int = 3) -> dict:
    """A config like serve_configs/local.yaml: the tiny base model, its replicas on serving
    nodes (adm_serve, one per node: the scaled node has 1 GPU), the ingress on the head."""
    base = export(models / "diffusion", factory.create_model(TINY), TINY)
    gpu = {"num_cpus": 1, "num_gpus": 1, "resources": {SERVE_RESOURCE: 1}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "adm.serve:build_app",
            "args": {"base": base, "max_images": 4, "max_steps": 100, "samplers": ["ddim"],
                     "default_sampler": "ddim", "default_steps": STEPS, "precision": "fp32",
                     "max_batch_requests": 8, "batch_wait_s": 0.05, "batch_rows": 8,
                     "require_api_key": False},
            # JSON lines: each replica's access log ("CALL run OK 12.3ms") with its time, read
            # by `first_answers`.
            "logging_config": {"encoding": "JSON"},
            "deployments": [
                {"name": BASE, "max_ongoing_requests": 4, "max_queued_requests": 64,
                 "ray_actor_options": gpu,
                 "autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas,
                                        "target_ongoing_requests": 2, "upscale_delay_s": 2,
                                        "downscale_delay_s": 5, "metrics_interval_s": 0.5,
                                        "look_back_period_s": 2}},
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


class Load:
    """Loopback clients sending back-to-back requests; `set_clients` changes their number
    while it runs (client i runs while i < clients)."""

    def __init__(self, url: str, timeout: float = 60):
        self.url, self.timeout = url, timeout
        self.requests: list[Request] = []
        self.clients = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

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
            self._one(session, index * 100000 + i)
            i += 1

    def _one(self, session: requests.Session, seed: int) -> None:
        body = {"class_id": seed % 10, "seed": seed, "steps": STEPS, "response": "json"}
        t = time.time()
        try:
            r = session.post(f"{self.url}/v1/generate", json=body, timeout=self.timeout)
            status, error = r.status_code, "" if r.status_code == 200 else r.text[:300]
        except requests.RequestException as e:
            status, error = 0, f"{type(e).__name__}: {e}"[:300]
        with self._lock:
            self.requests.append(Request(t, time.time(), status, error))

    def stop(self) -> None:
        """Stop every client once its request in flight has ended (at most `timeout` s)."""
        self._stop.set()
        for t in self._threads:
            if t is not None:
                t.join(self.timeout + 5)


def ramp(load: Load, phases=RAMP, on_phase: Callable[[int, int], None] | None = None) -> list:
    """Run the load phases; returns (start time, clients) of each."""
    marks = []
    for i, (clients, seconds) in enumerate(phases):
        load.set_clients(clients)
        marks.append((time.time(), clients))
        if on_phase:
            on_phase(i, clients)
        time.sleep(seconds)
    load.set_clients(0)
    marks.append((time.time(), 0))
    return marks


@dataclass
class Sample:
    """One second of the timeline."""

    t: float
    clients: int
    nodes: dict[str, int]  # kind -> ALIVE nodes
    replicas: dict[str, dict[str, int]]  # deployment -> state -> count
    replica_nodes: dict[str, list[str]]  # deployment -> node ids of its RUNNING replicas
    p50: float | None = None  # latency of the 200s of the last LATENCY_WINDOW_S, s
    p95: float | None = None
    answered: int = 0  # 200s that ended in this interval
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
            ok = [r.end - r.start for r in ended
                  if now - LATENCY_WINDOW_S <= r.end < now and r.status == 200]
            if ok:
                s.p50, s.p95 = (float(np.percentile(ok, q)) for q in (50, 95))
            s.answered = sum(r.status == 200 for r in done)
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


def first_answer(log_file: Path) -> float | None:
    """When a replica first returned a call (epoch seconds), from its JSON log: the first
    access-log line ("CALL run OK ..."); None if it answered none."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if str(record.get("message", "")).startswith("CALL run OK"):
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


def figures(timeline: Timeline, marks: list, load: Load, logs_dir: Path) -> dict:
    """The measured times of a ramp (seconds; None when it did not happen). `logs_dir`: Ray's
    logs dir of the cluster (the replicas' log files)."""
    step, end = marks[1][0], marks[-1][0]
    serve_nodes = {n: t for n, t in timeline.alive_since.items()
                   if timeline.node_kinds.get(n) == "gpu_serve"}
    before = {n for n, t in serve_nodes.items() if t < step}
    new = sorted((t, n) for n, t in serve_nodes.items() if n not in before)
    first_new = new[0] if new else None
    running = answered = None
    if first_new:
        for s in timeline.samples:
            if s.t >= first_new[0] and first_new[1] in s.replica_nodes.get(BASE, []):
                running = s.t
                break
        answered = first_answers(timeline, logs_dir).get(first_new[1])
    back = next((s.t for s in timeline.samples if s.t > end
                 and s.nodes.get("gpu_serve", 0) == 1
                 and s.replicas.get(BASE, {}).get("RUNNING", 0) == 1
                 and sum(s.replicas.get(BASE, {}).values()) == 1), None)
    codes = [r.status for r in load.requests]
    return {
        "load_step_to_new_node_s": first_new[0] - step if first_new else None,
        "load_step_to_new_replica_running_s": running - step if running else None,
        "load_step_to_new_replica_answer_s": answered - step if answered else None,
        "load_end_to_minimum_s": back - end if back else None,
        "max_serving_nodes": max((s.nodes.get("gpu_serve", 0) for s in timeline.samples),
                                 default=0),
        "requests": len(codes), "ok": codes.count(200), "rejected_503": codes.count(503),
        "errors": sum(c not in (200, 503) for c in codes),
    }


def plot(timeline: Timeline, marks: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = timeline.samples[0].t
    t = [s.t - t0 for s in timeline.samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    axes[0].step(t, [s.clients for s in timeline.samples], where="post", label="clients")
    axes[0].set_ylabel("offered load\n(clients)")
    axes[1].step(t, [s.nodes.get("gpu_serve", 0) for s in timeline.samples], where="post",
                 label="gpu_serve nodes (ALIVE)")
    axes[1].step(t, [s.replicas.get(BASE, {}).get("RUNNING", 0) for s in timeline.samples],
                 where="post", linestyle="--", label=f"{BASE} replicas RUNNING")
    axes[1].set_ylabel("count")
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylim(0, max(s.nodes.get("gpu_serve", 0) for s in timeline.samples) + 1.5)
    axes[1].legend(loc="upper left", ncol=2)
    axes[2].plot(t, [s.p50 if s.p50 is not None else np.nan for s in timeline.samples],
                 label="p50")
    axes[2].plot(t, [s.p95 if s.p95 is not None else np.nan for s in timeline.samples],
                 label="p95")
    errs = [x for x, s in zip(t, timeline.samples) if s.errors]
    if errs:
        axes[2].scatter(errs, [0] * len(errs), color="red", marker="x", label="errors")
    axes[2].set_ylabel(f"latency (s), last {LATENCY_WINDOW_S:g} s")
    axes[2].set_xlabel("time (s)")
    axes[2].legend(loc="upper right")
    for ax in axes:
        for m, _ in marks:
            ax.axvline(m - t0, color="grey", linewidth=0.6, linestyle=":")
    axes[0].set_title("Serving on a simulated cluster from cluster.yaml: load 1 -> 8 -> 1 "
                      "clients, then idle")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def run(out: Path, plot_path: Path, settings: SimSettings, idle_wait: float = 120) -> dict:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    folder = Path(tempfile.mkdtemp(prefix="adm-autoscale-"))
    with SimulatedCluster(cluster, settings, workdir=folder) as sim:
        url = deploy(sim, serve_config(folder / "models", free_port("127.0.0.1")), folder)
        wait_until("one serving node", lambda: len(serving_nodes(sim)) == 1, 120)
        load = Load(url)
        recorder = Recorder(sim, load).start()
        try:
            marks = ramp(load)
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
    result = {"figures": figs, "marks": marks,
              "settings": asdict(settings), "timeline": [asdict(s) for s in timeline.samples]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "timeline.json").write_text(json.dumps(result, indent=1))
    plot(timeline, marks, plot_path)
    return result["figures"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/autoscale", help="folder of timeline.json")
    p.add_argument("--plot", default=str(ROOT / "docs" / "autoscaling.png"))
    p.add_argument("--idle-timeout-s", type=float, default=15.0,
                   help="the simulated nodes' idle timeout (cluster.yaml: 300)")
    args = p.parse_args()
    torch.set_num_threads(1)
    figs = run(Path(args.out), Path(args.plot),
               SimSettings(idle_timeout_minutes=args.idle_timeout_s / 60))
    print(json.dumps(figs, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.1f} s"  # noqa: E731
    print(f"load step -> new serving node ALIVE:               "
          f"{fmt(figs['load_step_to_new_node_s'])}")
    print(f"load step -> a replica RUNNING on it:              "
          f"{fmt(figs['load_step_to_new_replica_running_s'])}")
    print(f"load step -> first request that replica answered:  "
          f"{fmt(figs['load_step_to_new_replica_answer_s'])}")
    print(f"end of load -> back to 1 serving node:             "
          f"{fmt(figs['load_end_to_minimum_s'])}")
    print(f"requests {figs['requests']}: {figs['ok']} x 200, {figs['rejected_503']} x 503, "
          f"{figs['errors']} errors; timeline: {Path(args.out) / 'timeline.json'}, "
          f"plot: {args.plot}")


if __name__ == "__main__":
    main()
