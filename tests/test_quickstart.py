"""The quickstart end to end at its QUICK size (`make quickstart QUICK=1`), as a user runs it:
`jobs/quickstart.py --quick` in its own process, on its own local Ray, with its output captured
as in a log file, while two other Rays run on the machine (the test session's and `other_ray`).
The real jobs (prepare, four Ray Train trainings, sampling, upsampling, evaluation), a real
Serve app from serve_configs/local.yaml asked over HTTP, the summary; a rerun reuses every
stage. Its log is also the check of what a training job prints beside other Rays (bars as
plain lines, a step line per interval, no Ray INFO lines)."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, assert_clean_terminal


def run_quickstart(out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "quickstart.py"), "--quick",
                           "--out", str(out)], cwd=out.parent, env=env, capture_output=True,
                          text=True, timeout=800)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_pipeline_end_to_end_and_rerun(ray_session, other_ray, tmp_path):
    out = tmp_path / "qs"
    proc = run_quickstart(out)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-6000:]
    # A log a user can read: stage headers, bars as plain lines, results; no debris.
    assert_clean_terminal(printed, max_lines=130)
    assert not [line for line in printed.splitlines() if " INFO " in line]
    # Each training (Ray Train's internal state lookups found this job's own Ray among the
    # three): its done line, its last step's line once and its bar as plain lines closed at
    # 10 of 10 (the last two with the bar, on stderr).
    for role, kind in (("diffusion", "diffusion"), ("classifier", "classifier"),
                       ("judge", "classifier"), ("upsampler", "upsampler")):
        section = proc.stdout.split(f"== training the {role} ")[1].split("\n== ")[0]
        assert f"[{kind}] done:" in section, section
    kinds = ["classifier", "classifier", "diffusion", "upsampler"]
    closed = re.findall(r"^\[(\w+)\] train: 100%.*\b10/10\b", proc.stderr, re.M)
    assert sorted(closed) == kinds, proc.stderr[-4000:]
    steps = re.findall(r"^\[(\w+)\] step (\d+)/10 loss=", printed, re.M)
    assert sorted(steps) == [(k, "10") for k in kinds], steps  # log_interval 100: the last
    other_ray()

    summary = json.loads((out / "summary.json").read_text())
    scales = [row["scale"] for row in summary["scales"]]
    assert scales == [0, 4]
    for row in summary["scales"]:
        for key in ("fid", "precision", "recall", "sample_accuracy"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (key, row)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert Path(row["grid"]).is_file()
        with np.load(out / "samples" / f"scale_{row['scale']:g}" / "samples.npz") as z:
            assert z["arr_0"].shape == (40, 8, 8, 3) and z["arr_1"].shape == (40,)
    with np.load(out / "samples" / "upsampled" / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3)
    served = Image.open(io.BytesIO(Path(summary["served_image"]).read_bytes()))
    assert served.format == "PNG" and served.height == 32  # the upsampler's size
    for model in ("diffusion", "classifier", "judge", "upsampler"):
        assert (out / "models" / model / "model.pt").is_file()
        assert (out / "models" / model / "model.safetensors").is_file()  # the same weights
        assert (out / "models" / model / "flags.json").is_file()
    assert "FID" in proc.stdout and str(out / "summary.json") in proc.stdout

    # Run again: every stage's output is there, so nothing is trained, sampled or served.
    proc = run_quickstart(out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["stage_seconds"] == {}
    assert again["scales"] == summary["scales"]
    assert "== " not in proc.stdout  # no stage header printed
