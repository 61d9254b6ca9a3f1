"""What a user sees in the terminal when a job runs: its own lines, not Ray's internals."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Lines of Ray's internals that reached the terminal before (issue 8, item 11).
NOISE = ["PlacementGroupCleaner", "Failed to query Ray Train", "TrainingReport(",
         "DeprecationWarning", "tqdm is not installed", "Running Dataset",
         "Started a local Ray instance", "Started training worker group",
         "Setting up process group", "Attempting to start training worker group"]


@pytest.fixture(scope="module")
def digits16(ray_session, tmp_path_factory):
    from adm.data.digits import prepare_digits

    out = str(tmp_path_factory.mktemp("digits16") / "digits")
    prepare_digits(out, image_size=16)
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_job_shows_a_bar_and_one_line_per_interval(digits16, tmp_path):
    cfg = yaml.safe_load((ROOT / "jobs/configs/quickstart/diffusion.yaml").read_text())
    cfg["model"]["flags"].update(image_size=16, channel_mult="1,2", diffusion_steps=100)
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # In a PID namespace of its own, as on a user's machine, the job's Ray is the only one it
    # can see: Ray's state API (which Train's controller queries) refuses to pick among several
    # local clusters, and the test session runs one already.
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc",
         sys.executable, str(ROOT / "jobs/train_diffusion.py"), "--config", str(config),
         "--data", digits16, "--storage", str(tmp_path / "runs"), "--max-steps", "4",
         "optim.batch_size=8", "run.log_interval=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    found = [n for n in NOISE if n in out]
    assert not found, f"Ray internals in the terminal: {found}\n{out[-4000:]}"
    steps = re.findall(r"\[diffusion\] step (\d+)/4 loss=", out)
    assert steps == ["2", "4"], out[-4000:]  # one line per log interval, each once
    assert re.search(r"\[diffusion\] train: 100%.*4(\.0+)?/4(\.0+)?.*step", out), out[-4000:]
    assert "[diffusion] done:" in proc.stdout
    noisy = [line for line in out.splitlines() if " INFO " in line]
    assert not noisy, noisy[:5]


def test_training_job_with_missing_data_fails_in_one_line_before_ray(tmp_path):
    """Bad input ends in one `error:` line and exit 2, checked before Ray starts (no Ray
    session folder is created)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")  # where a Ray started by the job would live
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train_classifier.py"), "--config",
         str(ROOT / "jobs/configs/quickstart/classifier.yaml"), "--data", "/nonexistent/digits"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.uri: no prepared dataset at "
                                                   "/nonexistent/digits"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ray").exists()  # Ray never started
