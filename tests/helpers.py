"""Shared test helpers: the reference fixtures and the fixture README's tolerance rule."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "adm_reference"


@functools.lru_cache(maxsize=None)
def load_fixture(name: str):
    """Load `tests/fixtures/adm_reference/<name>` (a `.pt` file) with `weights_only=True`."""
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def float_state_dict(entry: dict) -> dict:
    """The fixture's float8 weights as the exact float32 values the reference computed with."""
    return {k: v.float().clone() for k, v in entry["state_dict"].items()}


def assert_within(got, want, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """The fixture README's rule, elementwise:
    |got - want| <= atol * max(1, max|want|) + rtol * |want|."""
    got = torch.as_tensor(got).double()
    want = torch.as_tensor(want).double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    bound = atol * scale + rtol * want.abs()
    err = (got - want).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance; "
        f"max |err| {err.max().item():.3e}, atol {atol} (scaled {atol * scale:.3e}), rtol {rtol}"
    )


def fixture_network(name: str):
    """A fresh model of models.pt, built from its flags with its (float8-exact) weights, in
    eval mode."""
    from adm.compat import openai

    entry = load_fixture("models.pt")["models"][name]
    build = {"unet": openai.create_model, "superres": openai.create_superres_model,
             "classifier": openai.create_classifier}[entry["kind"]]
    model = build(entry["flags"])
    model.load_state_dict(float_state_dict(entry), strict=True)
    return model.eval()


# Tiny 8 px models (random weights) for sampling and generation tests.
TINY_UNET_FLAGS = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                   "attention_resolutions": "4", "num_head_channels": 32, "class_cond": True,
                   "num_classes": 10, "learn_sigma": True, "resblock_updown": True,
                   "diffusion_steps": 100, "noise_schedule": "cosine"}
TINY_CLASSIFIER_FLAGS = {"image_size": 8, "classifier_width": 32, "classifier_depth": 1,
                         "classifier_attention_resolutions": "4",
                         "classifier_channel_mult": "1,2", "classifier_num_head_channels": 32,
                         "num_classes": 10}


ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str):
    """The module of `jobs/<name>.py` (jobs are scripts, not a package), for calling its
    `main(argv)` in the test process."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"adm_job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, argv: list[str]) -> int:
    """Run `jobs/<name>.py`'s main(argv) in the test process; its exit status."""
    if name.startswith("train_"):  # jobs/train_<kind>.py is one call of the shared main
        from adm.train.cli import main

        return main(name.removeprefix("train_"), argv)
    return load_job(name).main(argv)


def randomized(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """`net` with every parameter drawn N(0, 0.1²), in eval mode: ADM zero-initialises its
    output layers, which would make every sample the same function of the noise alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def export_random(folder: Path, net: torch.nn.Module, flags: dict, seed: int) -> str:
    """`net` with random N(0, 0.1²) weights (`randomized`), saved as training exports it:
    `folder/model.pt` with `flags.json` beside it. Returns the model file's path."""
    import json

    randomized(net, seed)
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "flags.json").write_text(json.dumps(flags))
    return str(folder / "model.pt")


# Lines of Ray's internals that once reached a job's terminal and must not again (Train's
# report dumps and worker-group set-up, Ray's and Ray Data's start-up messages, warnings), and
# the error of Ray's state API when it cannot tell which of two local Rays is the job's.
RAY_NOISE = ["PlacementGroupCleaner", "Failed to query Ray Train", "TrainingReport(",
             "DeprecationWarning", "tqdm is not installed", "Running Dataset",
             "Started a local Ray instance", "Started training worker group",
             "Setting up process group", "Attempting to start training worker group",
             "Progress bars disabled", "multiple active Ray instances"]


def assert_clean_terminal(out: str, max_lines: int) -> None:
    """A job's captured output (not a terminal) as a log file should read: no escape codes
    (colours, cursor moves), no carriage returns (bars redrawn in place), none of Ray's
    internals, and a bounded number of lines."""
    escapes = [line for line in out.splitlines() if "\x1b" in line]
    assert not escapes, f"{len(escapes)} lines with escape codes, e.g. {escapes[:3]!r}"
    assert "\r" not in out, f"carriage returns: {out[max(0, out.index(chr(13)) - 200):][:400]!r}"
    found = [n for n in RAY_NOISE if n in out]
    assert not found, f"Ray internals in the output: {found}\n{out[-4000:]}"
    lines = out.splitlines()
    assert len(lines) <= max_lines, f"{len(lines)} lines (at most {max_lines}):\n{out[-6000:]}"


def api_limits(**overrides):
    """The Serve API's request bounds (`adm.serve.api.Limits`) of a 10-class base model with a
    100-step chain, no classifier, a null class and no upsampler; `overrides` replace fields."""
    from adm.checkpoints import ModelSpec
    from adm.serve.api import Limits

    fields = dict(max_images=4, max_steps=50, samplers=("ddim", "dpmpp_2m"),
                  max_guidance_scale=10.0, max_cfg_scale=5.0, max_body_bytes=8192,
                  num_classes=10, class_names=None,
                  base=ModelSpec("model", "m.pt", "diffusion", {"diffusion_steps": 100}, ""),
                  has_classifier=False, has_null_class=True, has_upsampler=False,
                  default_sampler="ddim", default_steps=10, default_guidance_scale=0.0)
    return Limits(**{**fields, **overrides})
