"""The training job on a real multi-node Ray cluster on this one machine: separate `ray start`
processes (a head with the dashboard and job server, worker nodes joined to it), jobs submitted
with `ray job submit`, as on a real cluster.

The cluster (the `cluster` fixture): a head and a worker node whose environment holds the AWS
settings, a secret key and a session token, as a real cluster's nodes do; the digits are
prepared on S3 (an S3 server of this module's own) by `ray job submit`. One training run on it,
data and run folder on S3, proves two things (each training run costs a worker group's start,
so they share it):

* Losing a node mid-run: the 2-worker run, spread over two nodes, resumes from its last
  committed checkpoint on a replacement node and finishes (its export written on S3).
* Credentials: the job must not make Ray record the secret values anywhere (Train's run state,
  the job info, the run folder on S3, the Ray logs). A bad config fails before any worker
  starts, naming the key.

Runs and data are on S3, which every node reaches; a local `--storage` path works here only
because both nodes are on this machine (a real cluster needs S3, or NFS mounted alike).
"""
from __future__ import annotations

import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from adm import storage
from ray_cluster import ROOT, LocalCluster, RayNode, local_cluster
from s3_server import S3Server, running_s3_server

STEP_LINE = re.compile(r"\[diffusion\] step (\d+)/(\d+)")
GROUP_START = "Attempting to start training worker group"  # Ray Train's log line, every attempt
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def small_config(tmp_path: Path) -> Path:
    """The quickstart diffusion config shrunk to seconds per run (16 px, 2 levels, 100 steps)."""
    cfg = yaml.safe_load((ROOT / "jobs/configs/quickstart/diffusion.yaml").read_text())
    cfg["model"]["flags"].update(image_size=16, channel_mult="1,2", diffusion_steps=100)
    path = tmp_path / "diffusion.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prepare_digits(cluster: LocalCluster, out: str) -> None:
    prep = cluster.job("submit", "--working-dir", str(ROOT), "--", sys.executable,
                       "jobs/prepare_digits.py", "--out", out, "--image-size", "16")
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_job(client: JobSubmissionClient, job_id: str, timeout: float) -> JobStatus:
    return wait_for(f"job {job_id} to end",
                    lambda: (s := client.get_job_status(job_id)) in TERMINAL and s, timeout, 2)


def committed_checkpoint_steps(run: str, s3=None) -> list[int]:
    """Steps of the checkpoints Ray Train has committed: listed in its snapshot of the run
    (written after every worker reported) and complete (meta.json written); local or S3."""
    snapshot = storage.join(run, "checkpoint_manager_snapshot.json")
    if not storage.is_file(snapshot, s3):
        return []
    listed = set(re.findall(r"checkpoint_[0-9_.-]+", storage.read_bytes(snapshot, s3).decode()))
    steps = []
    for name in listed:
        meta = storage.join(run, name, "meta.json")
        if storage.is_file(meta, s3):
            steps.append(storage.read_json(meta, s3)["step"])
    return sorted(steps)


def printed_steps(log: str) -> list[int]:
    """The steps rank 0 printed ("[diffusion] step N/M"), a line shown twice counted once."""
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(log)]
    return [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]


@dataclass
class Cluster:
    """The module's cluster: its nodes, the S3 server they reach, the prepared data's URI, and
    the secret values in the nodes' environment."""

    cluster: LocalCluster
    head: RayNode
    worker: RayNode
    s3: S3Server
    bucket: str
    data: str
    secrets: dict[str, str]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A head and a worker node (3 CPUs each) whose environment holds the S3 settings with a
    secret key and a session token (from `ray start`, as a cluster's launcher or instance role
    gives them; jobs are submitted without secrets), Train's state tracking on (as the Train
    dashboard needs) and Ray's log deduplication off (the node-loss test reads every line); the
    digits prepared on S3 at 16 px by `ray job submit`. An S3 server of its own: the nodes are
    killed, and a request cut off mid-way must not leave the session's server stuck."""
    workdir = tmp_path_factory.mktemp("cluster")
    secrets = {"AWS_SECRET_ACCESS_KEY": f"adm-secret-{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"adm-token-{uuid.uuid4().hex}"}
    with running_s3_server() as s3:
        bucket = s3.new_bucket("adm-cluster")
        env = {**s3.env, **secrets, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_DEDUP_LOGS": "0"}
        with local_cluster(workdir, env=env) as c:
            head = c.start_head(num_cpus=3)
            worker = c.add_worker(num_cpus=3)
            data = f"s3://{bucket}/digits"
            prepare_digits(c, data)
            yield Cluster(c, head, worker, s3, bucket, data, secrets)


def json_paths_holding(obj, needle: str, path: str = "") -> list[str]:
    """The JSON paths (`a.b[0].c`) of the keys and string values of `obj` that contain
    `needle`."""
    if isinstance(obj, dict):
        out = []
        for key, value in obj.items():
            here = f"{path}.{key}" if path else str(key)
            out += [here] if needle in str(key) else []
            out += json_paths_holding(value, needle, here)
        return out
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in json_paths_holding(v, needle, f"{path}[{i}]")]
    return [path] if needle in str(obj) else []


def node_files(roots: list[Path]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every regular file under `roots` (sockets and the like are skipped,
    files that vanish while walking, e.g. rotated logs, too)."""
    for root in roots:
        for path in sorted(root.rglob("*")):
            try:
                if path.is_file() and not path.is_symlink():
                    yield str(path), path.read_bytes()
            except OSError:
                pass


def s3_objects(s3_server, bucket: str) -> Iterator[tuple[str, bytes]]:
    """(s3:// URI, bytes) of every object in `bucket`."""
    from adm.storage import s3_client
    client = s3_client(s3_server.options)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            yield f"s3://{bucket}/{obj['Key']}", body


def where_recorded(secrets: dict[str, str], cluster: LocalCluster, job_id: str, run_name: str,
                   s3_server, bucket: str) -> list[str]:
    """Every place where one of `secrets` (name -> value) is recorded: Train's run state as
    the dashboard serves it, the job's info (CLI and REST), every object in the bucket, every
    file of the nodes' Ray dirs (session dirs: logs, runtime resources)."""
    found = []
    state = requests.get(f"{cluster.address}/api/train/v2/runs/v1", timeout=30)
    assert state.status_code == 200, state.text[:2000]
    runs = state.json()["train_runs"]
    # Not vacuous: the run and its train_loop_config are there.
    assert any(r["name"] == run_name and r["run_settings"]["train_loop_config"] for r in runs), \
        "the run is not in Train's state: " + state.text[:2000]
    info = requests.get(f"{cluster.address}/api/jobs/{job_id}", timeout=30)
    assert info.status_code == 200, info.text[:2000]
    status = cluster.job("status", job_id)
    for name, value in secrets.items():
        found += [f"{name} in Train's run state (GET /api/train/v2/runs/v1): {p}"
                  for p in json_paths_holding(state.json(), value)]
        found += [f"{name} in the job info (GET /api/jobs/{job_id}): {p}"
                  for p in json_paths_holding(info.json(), value)]
        if value in status.stdout + status.stderr:
            found.append(f"{name} in `ray job status {job_id}`")
    needles = {name: value.encode() for name, value in secrets.items()}
    objects = 0
    for uri, data in s3_objects(s3_server, bucket):
        objects += 1
        found += [f"{name} in {uri}" for name, value in needles.items() if value in data]
    assert objects > 0
    for path, data in node_files([n.temp_dir for n in cluster.nodes()]):
        found += [f"{name} in {path}" for name, value in needles.items() if value in data]
    return found


SECRET_ON_EVERY_NODE = """
import os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
secret = ray.remote(num_cpus=0)(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY", "-"))
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(len(nodes), "nodes:", *ray.get([secret.options(scheduling_strategy=
      NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]))
"""


# --- Losing a node mid-run; no secret recorded -------------------------------------------

MAX_STEPS, SAVE_EVERY = 30, 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_survives_losing_a_node_and_records_no_secret(cluster: Cluster, tmp_path):
    """Data and runs on S3, the job submitted with `ray job submit` and no secrets in its
    runtime env. A bad config fails before any worker starts, naming the key. Then a 2-worker
    run placed STRICT_SPREAD (one worker per node): once a checkpoint is committed, the worker
    node dies (SIGKILL to all its processes); a replacement node joins (STRICT_SPREAD needs two
    nodes, as a cluster's autoscaler would replace a lost machine). The run must restart from
    its last checkpoint, not step 0, and finish. Afterwards neither the secret key nor the
    session token may appear in Train's run state (the dashboard's Train V2 API), the job's
    info, the run's objects on S3, or any file in the nodes' Ray dirs (session logs)."""
    head, worker, data, secrets = cluster.head, cluster.worker, cluster.data, cluster.secrets
    s3_server, bucket, opts = cluster.s3, cluster.bucket, cluster.s3.options
    cluster = cluster.cluster
    runs = f"s3://{bucket}/runs"
    train = ["jobs/train_diffusion.py", "--config", str(small_config(tmp_path)), "--data", data,
             "--storage", runs, "--num-workers", "2"]

    # A bad config under `ray job submit` fails before any worker starts, naming the key, and
    # the job exits non-zero.
    bad = cluster.job("submit", "--working-dir", str(ROOT), "--", sys.executable, *train,
                      "optim.batch_size=15")
    assert bad.returncode != 0
    assert "optim.batch_size: 15 is not divisible by run.num_workers=2" in (
        bad.stdout + bad.stderr)

    earlier = {a.pid for a in cluster.actors("RayTrainWorker", state=None)}  # other runs
    job_id = f"train-{uuid.uuid4().hex[:8]}"
    sub = cluster.job(
        "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT), "--",
        # --verbose: the test reads Ray Train's own log lines (worker-group starts, the
        # failure policy), which a job keeps out of its output by default
        sys.executable, train[0], "--verbose", *train[1:],
        "--max-steps", str(MAX_STEPS), "optim.batch_size=16", "run.name=multinode",
        "run.log_interval=1", f"run.save_interval={SAVE_EVERY}", "run.max_failures=2",
        "run.placement_strategy=STRICT_SPREAD")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = JobSubmissionClient(cluster.address)

    def logs() -> str:
        return client.get_job_logs(job_id)

    def job_running() -> bool:
        status = client.get_job_status(job_id)
        assert status not in TERMINAL, f"job ended early ({status}):\n{logs()[-5000:]}"
        return status == JobStatus.RUNNING

    # The two Train workers run on different nodes.
    wait_for("the job to start", job_running, 120)
    first = wait_for("two Train workers", lambda: job_running() and (
        len(a := cluster.actors("RayTrainWorker")) == 2 and a), 240)
    assert {a.node_id for a in first} == {head.node_id(), worker.node_id()}, first

    # A checkpoint is committed; the run is still going; the worker node dies.
    run = f"{runs}/multinode"
    steps = wait_for("a committed checkpoint",
                     lambda: job_running() and committed_checkpoint_steps(run, opts), 300, 0.2)
    killed_at = max(steps)
    killed_pids = worker.kill()
    assert killed_at < MAX_STEPS and client.get_job_status(job_id) == JobStatus.RUNNING
    replacement = cluster.add_worker(num_cpus=3)

    status = wait_for_job(client, job_id, 600)
    log = logs()
    (tmp_path / "job.log").write_text(log)
    assert status == JobStatus.SUCCEEDED, log[-6000:]

    # The job log: Ray Train started the worker group again after the failure; the first
    # group printed steps from 1, the last one from the last committed checkpoint's step + 1
    # (rank 0 prints every step; Ray may show a line twice).
    assert "[FailurePolicy] RETRY" in log, log[-6000:]
    attempts = [printed_steps(part) for part in log.split(GROUP_START)[1:]]
    assert len(attempts) >= 2, f"the worker group was started only once:\n{log[-6000:]}"
    assert attempts[0][0] == 1 and attempts[0][-1] < MAX_STEPS, attempts
    assert not any(attempts[1:-1]), f"an intermediate group trained: {attempts}"
    resumed_from = attempts[-1][0] - 1
    assert resumed_from > 0 and resumed_from % SAVE_EVERY == 0 \
        and resumed_from >= killed_at, (
            f"the restarted run began at step {resumed_from + 1}, not after its last "
            f"checkpoint (step {killed_at} was committed before the kill): {attempts}")
    assert attempts[-1] == list(range(resumed_from + 1, MAX_STEPS + 1)), attempts

    # The restarted group: new worker processes, on the head and the replacement node.
    first_pids = {a.pid for a in first}
    later = [a for a in cluster.actors("RayTrainWorker", state=None)
             if a.pid not in first_pids | earlier]
    assert {a.node_id for a in later} == {head.node_id(), replacement.node_id()}, later
    assert not {a.pid for a in later} & set(killed_pids)

    export = f"{run}/export"
    assert storage.is_file(f"{export}/model{MAX_STEPS:06d}.pt", opts), \
        storage.listdir(export, opts)
    assert storage.is_file(f"{export}/ema_0.999_{MAX_STEPS:06d}.pt", opts)
    assert storage.is_file(f"{export}/flags.json", opts)

    found = where_recorded(secrets, cluster, job_id, "multinode", s3_server, bucket)
    assert not found, "secret values recorded by Ray or the job:\n" + "\n".join(found)

    # Control: every node's environment held the secret (a task on each node says so),
    # and the file scan finds it once a job prints it to its log.
    secret = secrets["AWS_SECRET_ACCESS_KEY"]
    echo = cluster.job("submit", "--", sys.executable, "-c", SECRET_ON_EVERY_NODE)
    assert echo.returncode == 0, echo.stdout[-3000:] + echo.stderr[-3000:]
    assert f"2 nodes: {secret} {secret}" in echo.stdout, echo.stdout[-3000:]
    assert any(secret.encode() in data for _, data in node_files([cluster.head.temp_dir]))
