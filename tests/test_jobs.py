"""The training job under `ray job submit`, against a `ray start --head` cluster of its own."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_cluster(tmp_path):
    """A separate local cluster, started with `ray start --head --block` so that stopping it
    (SIGTERM to that process) stops this cluster only, not the test session's Ray."""
    gcs, dash = free_port(), free_port()
    # The per-node agents get ports of their own: the defaults (e.g. 52365) may be held by the
    # test session's Ray, and then the job agent never comes up ("No available agent").
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}",
                   f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats", *agent_ports],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert proc.poll() is None, (tmp_path / "head.log").read_text()
        time.sleep(1)
    else:
        raise AssertionError("the head node did not come up: " + (tmp_path / "head.log").read_text())
    yield address, env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    # `ray start` records the cluster for later `ray.init()` calls; it is gone now.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
        current.unlink()


def submit(cmd, env, timeout=300):
    """`ray job submit ...`, retried while the head's job agent is still starting (the
    dashboard answers before the agent does: "No available agent to submit job")."""
    deadline = time.time() + 90
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_train_job_under_ray_job_submit(head_cluster, tmp_path):
    address, env = head_cluster
    data = tmp_path / "digits"
    prep = submit([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                   "--", sys.executable, "jobs/prepare_digits.py", "--out", str(data),
                   "--image-size", "16"], env)
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    cfg = yaml.safe_load((ROOT / "jobs/configs/quickstart/diffusion.yaml").read_text())
    cfg["model"]["flags"].update(image_size=16, channel_mult="1,2", diffusion_steps=100)
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           sys.executable, "jobs/train_diffusion.py", "--config", str(config),
           "--data", str(data), "--storage", str(runs), "--num-workers", "2",
           "--max-steps", "3", "optim.batch_size=16", "run.log_interval=1"]
    proc = submit(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3/3" in proc.stdout
    export = runs / "quickstart-diffusion" / "export"
    assert (export / "model000003.pt").exists() and (export / "flags.json").exists()
    # a bad config fails before any worker starts, naming the key, and the job exits non-zero
    bad = submit(cmd[:-2] + ["optim.batch_size=15"], env)
    assert bad.returncode != 0
    assert "optim.batch_size: 15 is not divisible by run.num_workers=2" in bad.stdout + bad.stderr
