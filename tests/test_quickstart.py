"""The quickstart end to end at its QUICK size (`make quickstart QUICK=1`): the real jobs on the
session's Ray (prepare, four Ray Train trainings, sampling, upsampling, evaluation), a real
Serve app from serve_configs/local.yaml asked over HTTP, the summary; a rerun reuses every
stage."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import load_job



@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_pipeline_end_to_end_and_rerun(ray_session, tmp_path, capsys):
    job = load_job("quickstart")
    out = tmp_path / "qs"
    assert job.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
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
        assert (out / "models" / model / "flags.json").is_file()
    assert "FID" in printed and str(out / "summary.json") in printed

    # Run again: every stage's output is there, so nothing is trained, sampled or served.
    assert job.main(["--quick", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["stage_seconds"] == {}
    assert again["scales"] == summary["scales"]
    assert "== " not in capsys.readouterr().out  # no stage header printed
