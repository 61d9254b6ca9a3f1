"""What a user sees in the terminal when a job runs: its own lines, not Ray's internals. (A
training job's log beside other Rays is checked by the quickstart test, whose four trainings
print it.)"""
import io
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
