"""What a user sees in the terminal when a job runs: its own lines, not Ray's internals."""
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import assert_clean_terminal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits16(ray_session, tmp_path_factory):
    from adm.data.digits import prepare_digits

    out = str(tmp_path_factory.mktemp("digits16") / "digits")
    prepare_digits(out, image_size=16)
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_job_shows_a_bar_and_one_line_per_interval(digits16, other_ray, tmp_path):
    """A training job on its own local Ray, beside the test session's Ray and another one
    (`other_ray`), its output captured as in a log file: Ray Train's internal state lookups
    find the job's cluster (no "multiple active Ray instances"), the other Ray is untouched,
    and the log has the bar as plain lines, one line per log interval, nothing else."""
    cfg = yaml.safe_load((ROOT / "jobs/configs/quickstart/diffusion.yaml").read_text())
    cfg["model"]["flags"].update(image_size=16, channel_mult="1,2", diffusion_steps=100)
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train_diffusion.py"), "--config", str(config),
         "--data", digits16, "--storage", str(tmp_path / "runs"), "--max-steps", "4",
         "optim.batch_size=8", "run.log_interval=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert_clean_terminal(out, max_lines=15)
    steps = re.findall(r"\[diffusion\] step (\d+)/4 loss=", out)
    assert steps == ["2", "4"], out[-4000:]  # one line per log interval, each once
    bars = [line for line in out.splitlines() if line.startswith("[diffusion] train:")]
    assert bars and re.search(r"100%.*\b4/4\b", bars[-1]), out[-4000:]  # closed at 4 of 4
    assert "[diffusion] done:" in proc.stdout
    noisy = [line for line in out.splitlines() if " INFO " in line]
    assert not noisy, noisy[:5]
    other_ray()


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


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bars_draw_live_on_a_terminal_and_as_plain_lines_elsewhere():
    from adm.progress import progress_bar

    log = _Stream(tty=False)
    with progress_bar(total=1000, desc="[x] stage", unit="step", stream=log,
                      log_interval_s=0.05) as outer:
        with progress_bar(total=10, desc="[x] inner", stream=log) as inner:  # a second bar
            for _ in range(10):
                inner.update(1)
        for _ in range(1000):
            outer.update(1)
            if outer.n % 250 == 0:
                time.sleep(0.06)  # past the interval: one line, at most, per 250 steps
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text, repr(text)
    lines = text.splitlines()
    stage = [line for line in lines if line.startswith("[x] stage:")]
    inner_lines = [line for line in lines if line.startswith("[x] inner:")]
    assert 2 <= len(stage) <= 6 and "1000/1000" in stage[-1] and "100%" in stage[-1], lines
    assert len(inner_lines) == 2 and "10/10" in inner_lines[-1], lines  # its start and its end
    assert len(lines) == len(stage) + len(inner_lines)

    tty = _Stream(tty=True)
    with progress_bar(total=3, desc="[x] live", stream=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()  # redrawn in place
