"""Scaling, end to end, on a simulated multi-node cluster built from cluster.yaml.

`adm.simcluster` starts a head whose autoscaler is Ray's own (fake multi-node provider), with
cluster.yaml's node types scaled down to this machine and a 10 s idle timeout. One cluster serves
every scenario of this module. The training and generation jobs (b, c) are submitted when the
module starts and run on their own node types while the serving scenarios (a, d) run:

a. Serving under a burst of batch-class work: a config like serve_configs/local.yaml whose base
   replicas ask for `adm_serve` (min 1, max 3) and scale on the work queued in their step
   engines (QueuedWorkPolicy); batch clients go 1 -> 8 while an interactive probe sends a small
   request every 0.5 s. Replicas and serving nodes go up, every request gets a 200, no replica
   runs on a training or batch node, a replica on a new node answers requests, and the probe's
   latency, high while the burst's batch rows crowd the one replica, recovers once the new
   replicas run.
d. Losing a serving node, on the nodes (a) brought up: its raylet is SIGKILLed under batch
   load; Serve replaces the replica, the autoscaler launches a node, and the requests that fail
   are counted and bounded. When the load ends, nodes and replicas go back to one each.
b. Training: `ray job submit` of jobs/train_diffusion.py --gpus with a config that names no
   run.resources: its workers default to the training node type (adm_train), launch a
   training node (never a serving one), train, export; the node is removed after the idle
   timeout. A job asking for a resource no node type offers fails at once.
c. Generation: jobs/sample.py with its actors on `adm_batch` launches a batch node and writes
   exactly N samples.

Every assertion on nodes and replicas is on what Ray reports: its state API (nodes, actors) and
Serve's REST API (what `serve status` shows), never the test's own bookkeeping. When the module
ends, no process of the cluster may be left: none in its session, none holding a file of its
temp dir open (the workers a killed raylet left behind included). The pytest process
may host the session's Ray, so nothing here calls `ray.init`: jobs go through `ray job submit`,
the app through `serve deploy`, observations through HTTP APIs with the cluster's address.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray.util.state import list_actors

from adm.simcluster import SimSettings, SimulatedCluster, descendants
from test_cluster import small_config  # the quickstart diffusion config, shrunk

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("adm_bench_autoscale",
                                                  ROOT / "benchmarks" / "autoscale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
RAY = str(Path(sys.executable).with_name("ray"))
IDLE_S = 10
SAMPLES = 12


def cluster_processes(session: int, temp_dir: Path) -> dict[int, str]:
    """pid -> command line of every live process of a simulated cluster: those of its session
    (its head starts one; Ray's processes change their process group, never their session) and
    any process holding a file open under its temp dir (Ray's session dir: logs, sockets), from
    /proc. Zombies are ended already."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        ours = int(fields[3]) == session
        try:
            ours = ours or any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(str(temp_dir))
                               for fd in os.listdir(f"/proc/{entry}/fd"))
        except OSError:  # gone meanwhile, or another user's
            pass
        if ours:
            out[int(entry)] = cmd[:120]
    return out


@pytest.fixture(scope="module")
def sim(tmp_path_factory, other_ray):
    """The simulated cluster; stopped at the end, after which the other Ray on the machine (and
    so the test session's) must still be there and no process of this cluster left."""
    cluster = SimulatedCluster(yaml.safe_load((ROOT / "cluster.yaml").read_text()),
                               SimSettings(idle_timeout_minutes=IDLE_S / 60),
                               workdir=tmp_path_factory.mktemp("sim"))
    session, before, left, tree = None, {}, {}, set()
    try:
        cluster.start()
        session = cluster.session
        yield cluster
    finally:
        if session is not None:
            before = cluster_processes(session, cluster.temp_dir)
            tree = {session, *descendants(session)}
        cluster.stop()
        if session is not None:
            time.sleep(1)
            left = cluster_processes(session, cluster.temp_dir)
        cluster.cleanup()
    orphans = sorted(p for p in before if p not in tree)
    print(f"\nsimulated cluster stopped: {len(before)} processes, {len(orphans)} of them "
          f"outside the head's process tree")
    assert before, "the cluster had processes"
    assert not left, f"processes of the simulated cluster still running: {left}"
    other_ray()


@pytest.fixture(scope="module")
def app(sim, tmp_path_factory):
    """The serving app deployed on the cluster; its URL."""
    from adm.runtime import free_port

    folder = tmp_path_factory.mktemp("app")
    url = bench.deploy(sim, bench.serve_config(folder / "models", free_port("127.0.0.1")), folder)
    bench.wait_until("one serving node", lambda: len(bench.serving_nodes(sim)) == 1, 120)
    return url


def kinds_of(sim: SimulatedCluster) -> dict[str, str]:
    """Node id -> kind, for every node the cluster ever had (Ray's state API)."""
    return {n.node_id: bench.node_kind(n) for n in sim.nodes()}


def replica_nodes(sim: SimulatedCluster, deployment: str) -> list[str]:
    """The nodes every replica actor of a deployment ever ran on (any state)."""
    actors = list_actors(address=sim.address, detail=True, raise_on_missing_output=False,
                         filters=[("class_name", "=", f"ServeReplica:{bench.APP}:{deployment}")])
    return [a.node_id for a in actors if a.node_id]


def one_serving_node_and_replica(sim: SimulatedCluster) -> bool:
    states, _ = bench.serve_replicas(sim)
    return len(bench.serving_nodes(sim)) == 1 and sum(states.get(bench.BASE, {}).values()) == 1


BEFORE_S = 5.0  # 1 batch client (and the probe) before the burst
AFTER_S = 8.0  # the burst goes on this long after the "after" window opens (bench.windows)
BURST_MAX_S = 60.0  # ... and never longer than this
HURT = 4.0  # the burst, before a new replica runs, raises the probe's p95 at least this x
RECOVERED = 0.25  # after the replicas run: the probe's p95 at most this x its p95 during,
RECOVERED_VS_BEFORE = 5.0  # and at most this x its p95 before the burst


class BurstOver:
    """The burst phase's end (for `bench.ramp`): AFTER_S after the "after" window opened
    (`bench.after_opens`, once MAX_REPLICAS base replicas were RUNNING in the recorder's
    timeline), or BURST_MAX_S after it began."""

    def __init__(self, recorder):
        self.recorder, self.start, self.full, self.opens = recorder, None, None, None

    def began(self, phase: int, clients: int) -> None:
        if phase == 1:
            self.start = time.time()

    def __call__(self) -> bool:
        now = time.time()
        if self.full is None:
            self.full = next((s.t for s in self.recorder.timeline.samples if s.t > self.start
                              and bench.running(s) >= bench.MAX_REPLICAS), None)
        if self.full is not None and self.opens is None:
            self.opens = bench.after_opens(self.recorder.load, self.full)
        return now - self.start >= BURST_MAX_S or (
            self.opens is not None and now - self.opens >= AFTER_S)


def test_a_burst_of_batch_work_adds_replicas_and_interactive_latency_recovers(sim, app,
                                                                              batch_jobs):
    """1 batch client, then 8 (4 images x 50 steps each), and the interactive probe (1 image
    x 10 steps every 0.5 s): base replicas (Serve's REST API) and serving nodes go up; every
    request gets a 200 (32 requests per replica and 64 queued never fill, so Serve has no cause
    for a 503); a replica on a new serving node answers requests.

    Interactive latency recovers. The probe's p95 is taken over the probes sent in each window
    of `bench.windows`: before the burst; during it, until a new replica is RUNNING; after it,
    from when the burst's replicas were all RUNNING (+2 s) and the batch requests sent before
    that were answered (the one replica's backlog gone: on a busy machine that takes longer)
    to the burst's end, which comes AFTER_S later. The burst hurt: p95 during >= HURT x p95
    before (on one replica its batch rows wait past max_wait_steps and age: with the
    scenario's aged_share 1.0 none of them may be paused, and the probe waits behind them). It recovered: p95 after <= RECOVERED x p95 during and
    <= RECOVERED_VS_BEFORE x p95 before (spread over three replicas the batch rows no longer
    wait that long, and the probe overtakes them; the rest is two cores shared by three
    engines). Each window holds at least 6 probes.
    (The way back down is checked at the end of the next test, which runs on the nodes this one
    brought up: a second scale-up from one node would cost the suite half a minute.)"""
    load = bench.Load(app)
    recorder = bench.Recorder(sim, load).start()
    over = BurstOver(recorder)
    try:
        marks = bench.ramp(load, ((1, BEFORE_S), (8, over)), over.began)
    finally:
        load.stop()
        timeline = recorder.stop()
    figs = bench.figures(timeline, marks, load, sim.logs_dir)
    print(f"\nbatch burst: {json.dumps(figs)}\n{bench.report(figs)}")
    step = marks[1][0]
    print("probes (sent, s from the load step: latency, s):", " ".join(
        f"{r.start - step:+.1f}:{r.end - r.start:.2f}" for r in sorted(
            load.requests, key=lambda r: r.start) if r.kind == "interactive"))
    codes = [r.status for r in load.requests]
    others = [(r.kind, r.status, r.error) for r in load.requests if r.status != 200]
    assert not others, f"{len(others)} of {len(codes)} requests not 200: {others[:5]}"
    assert figs["batch_requests_ok"] >= 20 and figs["probe_requests_ok"] >= 40, figs
    assert figs["load_step_to_new_replica_answer_s"] is not None, (figs, timeline.replica_logs)
    peak = max(s.nodes.get("gpu_serve", 0) for s in timeline.samples)
    assert peak >= 2, f"serving nodes never went above 1: {[s.nodes for s in timeline.samples]}"
    assert figs["max_replicas_running"] >= 2, figs["replicas_timeline"]
    kinds = kinds_of(sim)
    assert {kinds[n] for n in replica_nodes(sim, bench.BASE)} == {"gpu_serve"}
    probe = figs["probe"]
    assert all(probe[w]["probes"] >= 6 for w in ("before", "during", "after")), probe
    before, during, after = (probe[w]["p95_s"] for w in ("before", "during", "after"))
    assert during >= HURT * before, f"the burst did not hurt the probe: {probe}"
    assert after <= RECOVERED * during and after <= RECOVERED_VS_BEFORE * before, \
        f"the probe's latency did not recover: {probe}"


def test_a_serving_node_killed_under_load_is_replaced_then_all_scale_back(sim, app):
    """6 batch clients (24 rows: QueuedWorkPolicy keeps three replicas) on two serving nodes or
    more (those of the burst, or new ones): one node's raylet is SIGKILLed; the node shows
    DEAD, a new serving node and replica come up, the failures are 5xx with a message and
    bounded, every request after recovery gets a 200. When the load ends, serving nodes and
    replicas go back to one each."""
    load = bench.Load(app)
    load.set_clients(6)
    try:
        def two_serving():
            running = bench.serve_replicas(sim)[1].get(bench.BASE, [])
            return len(set(running) & {n.node_id for n in bench.serving_nodes(sim)}) >= 2
        bench.wait_until("two serving nodes with a replica", two_serving, 120)
        running = bench.serve_replicas(sim)[1][bench.BASE]
        victim = sorted(running)[-1]
        before = {n.node_id for n in sim.nodes()}
        pid = sim.raylet_pid(victim)
        assert pid, f"no raylet of node {victim}"
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)

        def replaced():
            nodes = {n.node_id: n for n in sim.nodes()}
            states, where = bench.serve_replicas(sim)
            new = [n for n in nodes.values() if n.node_id not in before
                   and n.state == "ALIVE" and bench.node_kind(n) == "gpu_serve"]
            return (nodes[victim].state == "DEAD" and new
                    and victim not in where.get(bench.BASE, [])
                    and states.get(bench.BASE, {}).get("RUNNING", 0) >= 2)
        bench.wait_until("the node DEAD, a new serving node, the replicas RUNNING", replaced, 150)
        recovered_at = time.time()
        time.sleep(5)  # requests after the recovery must succeed again
    finally:
        load.stop()
    ended_at = time.time()
    during = [r for r in load.requests if r.end >= killed_at and r.start <= recovered_at]
    failed = [r for r in during if r.status not in (200, 503)]
    after = [r for r in load.requests if r.start > recovered_at]
    print(f"\nserving node killed: {len(failed)} of {len(during)} requests in flight or sent "
          f"during the {recovered_at - killed_at:.0f} s until recovery failed "
          f"({sorted({r.status for r in failed})}); {len(after)} after, all "
          f"{sorted({r.status for r in after})}")
    assert all(r.status >= 500 and r.error for r in failed), \
        [(r.status, r.error) for r in failed]  # a 5xx with a message; none hung (status 0)
    assert len(failed) <= 12, [(r.status, r.error) for r in failed]  # the in-flight ones
    assert after and all(r.status == 200 for r in after), [(r.status, r.error) for r in after]
    assert {kinds_of(sim)[n] for n in replica_nodes(sim, bench.BASE)} == {"gpu_serve"}
    bench.wait_until("back to one serving node and one replica",
                     lambda: one_serving_node_and_replica(sim), 120)
    print(f"back to one serving node and one replica {time.time() - ended_at:.1f} s after "
          f"the load ended")


def submit(sim: SimulatedCluster, *entrypoint: str, timeout: float = 300
           ) -> subprocess.CompletedProcess:
    """`ray job submit` (blocking) of a job script of this checkout to the simulated cluster.

    No --working-dir: the simulated nodes share one session dir, so one node's runtime-env
    agent would delete the unpacked package another node's workers still start in; the
    nodes import `adm` as installed (or from the PYTHONPATH the cluster inherited)."""
    script, *args = entrypoint
    return subprocess.run([RAY, "job", "submit", "--address", sim.address, "--",
                           sys.executable, str(ROOT / script), *args],
                          env=sim.env_for_clients(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def batch_jobs(sim, tmp_path_factory):
    """The training and the generation job, submitted now (`ray job submit`, blocking, each in
    a thread of its own); the tests below take their results. Yields (folder, futures)."""
    folder = tmp_path_factory.mktemp("jobs")
    model = bench.export(folder / "model", bench.factory.create_model(bench.TINY), bench.TINY, 0)
    train_args = ["--config", str(small_config(folder)), "--data", str(folder / "digits"),
                  "--storage", str(folder / "runs"), "--gpus"]

    def train() -> dict:
        out = {"prepare": submit(sim, "jobs/prepare_digits.py", "--out", str(folder / "digits"),
                                 "--image-size", "16")}
        if out["prepare"].returncode == 0:
            start = time.time()
            out["infeasible"] = submit(sim, "jobs/train_diffusion.py", *train_args,
                                       "run.resources={adm_tpu: 1}", timeout=120)
            out["infeasible_s"] = time.time() - start
            # No run.resources: --gpus alone must keep the workers off serving GPUs.
            out["train"] = submit(sim, "jobs/train_diffusion.py", *train_args,
                                  "--num-workers", "2", "--max-steps", "4",
                                  "run.cpus_per_worker=0.5", "run.name=sim",
                                  "run.save_interval=4")
        return out

    def generate() -> subprocess.CompletedProcess:
        return submit(sim, "jobs/sample.py", "--model", model, "--num-samples", str(SAMPLES),
                      "--steps", "2", "--batch-size", "4", "--out", str(folder / "samples"),
                      "--gpus", "--no-progress", "resources={adm_batch: 1}", "shard_size=6")

    with ThreadPoolExecutor(2) as pool:
        yield folder, {"train": pool.submit(train), "generate": pool.submit(generate)}


def failed(job: subprocess.CompletedProcess) -> str:
    return f"exit {job.returncode}\n{job.stdout[-4000:]}\n{job.stderr[-2000:]}"


def test_training_lands_on_training_nodes_exports_and_they_are_removed(sim, batch_jobs):
    """The config names no run.resources: `--gpus` workers ask for the training type's
    adm_train (their request, as Ray's state API reports it) and run on training nodes."""
    folder, futures = batch_jobs
    out = futures["train"].result(timeout=600)
    assert out["prepare"].returncode == 0, failed(out["prepare"])
    bad = out["infeasible"]
    assert bad.returncode != 0 and "no node type offers adm_tpu" in bad.stdout, failed(bad)
    assert all(t in bad.stdout for t in ("gpu_train", "gpu_serve", "gpu_batch")), failed(bad)
    assert out["infeasible_s"] < 90, out["infeasible_s"]  # at once, not pending forever
    assert out["train"].returncode == 0, failed(out["train"])
    assert (folder / "runs/sim/export").is_dir(), list((folder / "runs/sim").iterdir())
    kinds = kinds_of(sim)
    workers = list_actors(address=sim.address, detail=True, raise_on_missing_output=False,
                          filters=[("class_name", "=", "RayTrainWorker")])
    assert len(workers) >= 2 and {kinds[w.node_id] for w in workers} == {"gpu_train"}, \
        [(w.node_id, w.state) for w in workers]
    asked = [{k.split("_group_")[0] for k in w.required_resources} for w in workers]
    assert all("adm_train" in a for a in asked), asked
    bench.wait_until("the training nodes removed when idle", lambda: not any(
        n.state == "ALIVE" and bench.node_kind(n) == "gpu_train" for n in sim.nodes()),
        IDLE_S + 60)


def test_generation_on_batch_nodes_writes_exactly_n_samples(sim, batch_jobs):
    folder, futures = batch_jobs
    job = futures["generate"].result(timeout=600)
    assert job.returncode == 0, failed(job)
    with np.load(folder / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (SAMPLES, 8, 8, 3) and f["arr_1"].shape == (SAMPLES,)
    kinds = kinds_of(sim)
    actors = [a for a in list_actors(address=sim.address, detail=True, limit=10000,
                                     raise_on_missing_output=False)
              if "StageSampler" in a.class_name]
    assert actors and {kinds[a.node_id] for a in actors} == {"gpu_batch"}, \
        [(a.class_name, a.node_id) for a in actors]
    bench.wait_until("the batch nodes removed when idle", lambda: not any(
        n.state == "ALIVE" and bench.node_kind(n) == "gpu_batch" for n in sim.nodes()),
        IDLE_S + 60)


def test_on_a_local_ray_a_request_no_node_fits_fails_at_once(ray_session):
    """Without an autoscaler, the nodes alive are all there will be: `--gpus` on a machine
    without GPUs fails at once, naming GPU and the node, instead of pending forever."""
    from adm.nodetypes import NodeTypeMismatch, check_fits, cluster_node_types, worker_demand

    # (until the monitor's first report, a few seconds after Ray starts, nothing is checked)
    bench.wait_until("the monitor's report", lambda: cluster_node_types() is not None, 30, 0.5)
    check_fits(worker_demand(1), "training workers")
    with pytest.raises(NodeTypeMismatch, match="no node type offers GPU. Node types: "):
        check_fits(worker_demand(1, 1), "training workers")
