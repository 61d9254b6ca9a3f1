"""The speed benchmarks' baseline (benchmarks/reference_loop.py, the reference's guided DDIM loop
restated with its execution costs) computes what the reference computed: its guided and
unguided DDIM-10 outputs (fixtures/ddim_loop.pt) within the loop tolerance of
test_sampling.py."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from adm.compat import openai
from helpers import assert_within, fixture_network, load_fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_loop import reference_ddim  # noqa: E402

LOOP = 1e-3
FX = load_fixture("ddim_loop.pt")


def test_reference_loop_reproduces_the_reference_ddim10():
    c = FX["ddim_sample_loop"]
    model, classifier = fixture_network(FX["model"]), fixture_network(FX["classifier"])
    diffusion = openai.create_diffusion(c["diffusion_flags"])
    y = c["model_kwargs"]["y"]
    torch.manual_seed(0)
    guided = reference_ddim(model, classifier, diffusion, c["noise"], y,
                            c["guided"]["classifier_scale"])
    assert_within(guided, c["guided"]["sample"], LOOP, 0.0, "reference loop, guided")
    unguided = reference_ddim(model, None, diffusion, c["noise"], y, 0.0)
    assert_within(unguided, c["unguided"], LOOP, 0.0, "reference loop, unguided")
