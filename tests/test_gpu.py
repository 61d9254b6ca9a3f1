"""The sampling path on a CUDA device: the reference's guided DDIM-10 in float32, fp16 and bf16
autocast within the CPU test's bf16 tolerance, the fp16 reference loop (the GPU check's
baseline) within the same, inductor-compiled networks against eager ones, the padding rule's
batch invariance, the auto precision as torch counts native bf16, and precision/recall on the
GPU against the CPU.

Marked `gpu`: deselected where there is no CUDA device (CI); `benchmarks/gpu_check.sh` runs
them on a GPU machine."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adm import factory
from adm.diffusion import sample
from adm.precision import AUTOCAST, auto_precision
from helpers import assert_within, fixture_network, load_fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_loop import convert_to_fp16, reference_ddim  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
LOOP = 1e-3  # test_sampling.py's tolerance for a whole loop against the reference
FX = load_fixture("ddim_loop.pt")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 means float32 on the GPU too (no TF32 matmuls or convolutions)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def guided(**options) -> torch.Tensor:
    c = FX["ddim_sample_loop"]
    model = fixture_network(FX["model"]).to(CUDA)
    classifier = fixture_network(FX["classifier"]).to(CUDA)
    base = factory.create_diffusion({**c["diffusion_flags"], "timestep_respacing": ""})
    return sample(model, base, c["shape"], steps=10, y=c["model_kwargs"]["y"].to(CUDA),
                  noise=c["noise"].to(CUDA), classifier=classifier,
                  classifier_scale=c["guided"]["classifier_scale"], **options).cpu()


def test_reference_guided_ddim_in_float32():
    assert_within(guided(), FX["ddim_sample_loop"]["guided"]["sample"], LOOP, 0.0,
                  "cuda float32 guided ddim10")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_the_bf16_tolerance(dtype):
    want = FX["ddim_sample_loop"]["guided"]["sample"]
    err = (guided(autocast_dtype=dtype) - want).abs().mean()
    assert 0 < err < 0.05, err  # test_sampling.py's bound: rounding, not another computation


def test_fp16_reference_loop_within_the_bf16_tolerance():
    """The GPU baseline: the reference loop with the reference's fp16 networks."""
    c = FX["ddim_sample_loop"]
    model = convert_to_fp16(fixture_network(FX["model"]).to(CUDA))
    classifier = convert_to_fp16(fixture_network(FX["classifier"]).to(CUDA))
    torch.manual_seed(0)
    got = reference_ddim(model, classifier, factory.create_diffusion(c["diffusion_flags"]),
                         c["noise"].to(CUDA), c["model_kwargs"]["y"].to(CUDA),
                         c["guided"]["classifier_scale"]).cpu()
    err = (got - c["guided"]["sample"]).abs().mean()
    assert 0 < err < 0.05, err


def test_auto_precision_is_bf16_where_torch_counts_it_native():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert auto_precision(CUDA) == ("bf16" if native else "fp16")


def test_compiled_networks_match_eager():
    assert_within(guided(compile=True), FX["ddim_sample_loop"]["guided"]["sample"], LOOP, 0.0,
                  "cuda compiled guided ddim10")


def test_a_row_does_not_depend_on_its_batch():
    """The padding rule on the GPU, at the auto precision: an input's bytes depend on its slot
    alone, not on what else fills the call."""
    from adm.stage import Stage

    c = FX["ddim_sample_loop"]
    stage = Stage(fixture_network(FX["model"]).to(CUDA),
                  factory.create_diffusion({**c["diffusion_flags"], "timestep_respacing": ""}),
                  c["shape"][-1], 4, fixture_network(FX["classifier"]).to(CUDA),
                  AUTOCAST[auto_precision(CUDA)], CUDA)
    labels, seeds = np.array([1, 5, 7, 2]), [11, 12, 13, 14]
    args = dict(sampler="ddim", steps=5, classifier_scale=2.0)
    whole = stage.sample(labels, seeds, **args)
    part = stage.sample(labels[[2, 0]], [seeds[2], seeds[0]], np.array([2, 0]), **args)
    assert np.array_equal(part, whole[[2, 0]])


def test_precision_recall_on_the_gpu_equals_the_cpu():
    from adm.evaluate.metrics import precision_recall

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(3000, 64)), rng.normal(0.2, 1.1, size=(2500, 64))
    on_gpu = precision_recall(real, fake, device="cuda", dtype=torch.float64)
    on_cpu = precision_recall(real, fake, device="cpu", dtype=torch.float64)
    assert on_gpu == on_cpu and 0 < on_gpu[0] < 1 and 0 < on_gpu[1] < 1
