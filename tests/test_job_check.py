"""`--check`: each job's command line and the settings it names are checked, and nothing else
happens: the README's cluster commands (s3:// URIs) pass with every S3 request bound to fail, and
a bad setting still ends in one `error:` line with status 2."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from helpers import run_main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> dict[str, list[str]]:
    """The README's `ray job submit ... -- python jobs/NAME.py ARGS` commands, by job name."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        if line.startswith("ray job submit $A -- python jobs/"):
            argv = shlex.split(line.split(" -- ", 1)[1])
            commands[Path(argv[1]).stem] = argv[2:]
    return commands


@pytest.fixture
def no_storage(monkeypatch):
    """Any S3 request would go to a closed loopback port and fail at once."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "none")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "none")


def test_readme_cluster_commands_pass_check_without_touching_storage(no_storage, capsys):
    commands = readme_commands()
    assert set(commands) == {"prepare_imagenet", "train_diffusion", "train_classifier", "sample",
                             "evaluate"}
    for name, argv in commands.items():
        assert run_main(name, [*argv, "--check"]) == 0, (name, capsys.readouterr().err)
        assert "settings are valid (--check" in capsys.readouterr().out, name


@pytest.mark.parametrize("name,bad,message", [
    ("train_diffusion", ["optim.batch_size=big"], "optim.batch_size: expected int"),
    ("sample", ["eta=-1"], "eta: must be >= 0"),
    ("evaluate", ["--batch-size", "0"], "batch size (0)"),
    ("prepare_imagenet", ["--images-per-shard", "0"], "images per shard must be at least 1"),
])
def test_check_refuses_a_bad_setting(no_storage, capsys, name, bad, message):
    argv = readme_commands()[name]
    assert run_main(name, [*argv, *bad, "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_without_check_the_job_does_reach_storage(no_storage, capsys):
    """The control: the same sample command without --check reads its model file (and fails on
    the closed endpoint), so a passing --check above did skip that work."""
    assert run_main("sample", readme_commands()["sample"]) == 2
    assert "error: " in capsys.readouterr().err
