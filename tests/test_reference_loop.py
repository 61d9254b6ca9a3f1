"""The speed benchmarks' baseline (benchmarks/reference_loop.py, the reference's guided DDIM loop
restated with its execution costs) computes what the reference computed: its guided and
unguided DDIM-10 outputs (fixtures/ddim_loop.pt) within the loop tolerance of
test_sampling.py; and its fp16 form (the reference's `convert_to_fp16`, the GPU baseline)
casts what the reference casts and computes the float32 loop's samples up to fp16 rounding."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

from adm import factory
from adm.diffusion import sampling_diffusion
from helpers import (TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, assert_within, fixture_network,
                     load_fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_loop import convert_to_fp16, reference_ddim  # noqa: E402

LOOP = 1e-3
FX = load_fixture("ddim_loop.pt")


def test_reference_loop_reproduces_the_reference_ddim10():
    c = FX["ddim_sample_loop"]
    model, classifier = fixture_network(FX["model"]), fixture_network(FX["classifier"])
    diffusion = factory.create_diffusion(c["diffusion_flags"])
    y = c["model_kwargs"]["y"]
    torch.manual_seed(0)
    guided = reference_ddim(model, classifier, diffusion, c["noise"], y,
                            c["guided"]["classifier_scale"])
    assert_within(guided, c["guided"]["sample"], LOOP, 0.0, "reference loop, guided")
    unguided = reference_ddim(model, None, diffusion, c["noise"], y, 0.0)
    assert_within(unguided, c["unguided"], LOOP, 0.0, "reference loop, unguided")


def _dtypes(net: nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in net.named_parameters()}


def test_convert_to_fp16_casts_the_torsos_convolutions_only():
    """As guided-diffusion's `convert_to_fp16`: the convolutions of the input, middle and
    (U-Net) output blocks in float16, attention's 1-d qkv/projection convolutions included;
    norms, embeddings, each block's embedding Linear and the output heads stay float32."""
    model = convert_to_fp16(fixture_network(FX["model"]))
    classifier = convert_to_fp16(fixture_network(FX["classifier"]))
    for net, torso in ((model, ("input_blocks.", "middle_block.", "output_blocks.")),
                       (classifier, ("input_blocks.", "middle_block."))):
        convs = {f"{name}.{p}" for name, m in net.named_modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d)) and name.startswith(torso)
                 for p in ("weight", "bias") if getattr(m, p) is not None}
        half = {name for name, dtype in _dtypes(net).items() if dtype == torch.float16}
        assert half == convs and len(half) > 10
        assert set(_dtypes(net).values()) == {torch.float16, torch.float32}
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.out[2].weight.dtype == torch.float32  # the output conv: not the torso's
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.middle_block[0].emb_layers[1].weight.dtype == torch.float32
    assert model.middle_block[0].in_layers[0].weight.dtype == torch.float32  # a group norm
    assert model.middle_block[1].qkv.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in classifier.out.parameters())


def test_fp16_reference_loop_is_the_float32_loop_up_to_fp16_rounding():
    """On tiny random networks: the torso runs on float16 activations, the output is float32,
    and the guided samples differ from the float32 loop's by rounding alone."""
    g = torch.Generator().manual_seed(1)
    nets = []
    for net in (factory.create_model(TINY_UNET_FLAGS),
                factory.create_classifier(TINY_CLASSIFIER_FLAGS)):
        with torch.no_grad():  # random, non-zero outputs (the builders zero the last layers)
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        nets.append(net.eval())
    diffusion = sampling_diffusion(factory.create_diffusion(TINY_UNET_FLAGS), "ddim", 3)
    noise, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([1, 2, 3, 4])
    want = reference_ddim(*nets, diffusion, noise, y, 2.0)
    half = [convert_to_fp16(copy.deepcopy(net)) for net in nets]
    seen = []
    for net in half:
        net.middle_block.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    got = reference_ddim(*half, diffusion, noise, y, 2.0)
    assert got.dtype == torch.float32 and set(seen) == {torch.float16}
    err = (got - want).abs()
    assert 0 < err.mean() < 1e-3 and err.max() < 0.05, (err.mean(), err.max())
