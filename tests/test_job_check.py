"""`--check`: each job's command line and the settings it names are checked, and nothing else
happens: the documented cluster commands (docs/deploy.md, s3:// URIs) pass with every S3 request
bound to fail, and so do the commands of the README's job table; a bad setting still ends in one
`error:` line with status 2."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from helpers import run_main

ROOT = Path(__file__).resolve().parents[1]
# The pipeline's steps, in the order the README's job table must list them.
PIPELINE = ["prepare", "train", "sample", "evaluate", "serve"]


def cluster_commands() -> dict[str, list[str]]:
    """The `ray job submit ... -- python jobs/NAME.py ARGS` commands of docs/deploy.md (the
    cluster guide the README links), by job name."""
    text = (ROOT / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        if line.startswith("ray job submit $A -- python jobs/"):
            argv = shlex.split(line.split(" -- ", 1)[1])
            commands[Path(argv[1]).stem] = argv[2:]
    return commands


def readme_job_table() -> list[tuple[str, list[str]]]:
    """The README's job table ("## The jobs") as (step, the cell's code spans) rows, in order."""
    section = (ROOT / "README.md").read_text().split("\n## The jobs\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] not in ("step", "---"):
            rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1] + " " + cells[2])))
    return rows


@pytest.fixture
def no_storage(monkeypatch):
    """Any S3 request would go to a closed loopback port and fail at once."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "none")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "none")


def test_cluster_commands_pass_check_without_touching_storage(no_storage, capsys):
    commands = cluster_commands()
    assert set(commands) == {"prepare_imagenet", "train_diffusion", "train_classifier", "sample",
                             "evaluate"}
    for name, argv in commands.items():
        assert run_main(name, [*argv, "--check"]) == 0, (name, capsys.readouterr().err)
        assert "settings are valid (--check" in capsys.readouterr().out, name


@pytest.mark.parametrize("name,bad,message", [
    ("train_diffusion", ["optim.batch_size=big"], "optim.batch_size: expected int"),
    ("sample", ["eta=-1"], "eta: must be >= 0"),
    ("evaluate", ["--batch-size", "0"], "batch_size: must be positive"),
    ("prepare_imagenet", ["--images-per-shard", "0"], "images_per_shard: must be positive"),
])
def test_check_refuses_a_bad_setting(no_storage, capsys, name, bad, message):
    argv = cluster_commands()[name]
    assert run_main(name, [*argv, *bad, "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_without_check_the_job_does_reach_storage(no_storage, capsys):
    """The control: the same sample command without --check reads its model file (and fails on
    the closed endpoint), so a passing --check above did skip that work."""
    assert run_main("sample", cluster_commands()["sample"]) == 2
    assert "error: " in capsys.readouterr().err


def test_readme_job_table_lists_the_pipeline_and_its_commands_pass_check(no_storage, capsys):
    """The README's one table of jobs: every step in pipeline order, each `python jobs/...`
    command in it valid as written (its --check), each file or folder it names present."""
    rows = readme_job_table()
    assert [step for step, _ in rows] == PIPELINE
    checked = []
    for step, spans in rows:
        for span in spans:
            argv = shlex.split(span)
            if len(argv) > 1 and argv[0] == "python" and argv[1].startswith("jobs/"):
                name = Path(argv[1]).stem
                assert run_main(name, [*argv[2:], "--check"]) == 0, (step, capsys.readouterr().err)
                assert "settings are valid (--check" in capsys.readouterr().out, span
                checked.append(name)
            for word in argv:
                if word.startswith(("jobs/", "serve_configs/")):
                    assert (ROOT / word).exists(), (step, word)
    assert {"prepare_imagenet", "train_diffusion", "sample", "evaluate"} <= set(checked)
