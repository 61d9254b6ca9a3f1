"""The ADM networks against the reference's outputs, and their fast paths against float32."""
import functools
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from adm.compat import openai
from helpers import assert_within, float_state_dict, load_fixture

MODEL_ATOL = 4e-5  # fixture README: model outputs
BUILDERS = {"unet": openai.create_model, "superres": openai.create_superres_model,
            "classifier": openai.create_classifier}


def fixture_model(name: str, tmp_path=None):
    """Build a models.pt entry from its flags; load its weights through load_checkpoint (a
    real file) when tmp_path is given, else directly."""
    entry = load_fixture("models.pt")["models"][name]
    model = BUILDERS[entry["kind"]](entry["flags"])
    if tmp_path is not None:
        path = tmp_path / f"{name}.pt"
        torch.save(float_state_dict(entry), path)
        assert openai.load_checkpoint(model, str(path)) is model
    else:
        model.load_state_dict(float_state_dict(entry), strict=True)
    return model.eval(), entry


def run(model, entry, x=None, t=None, fmt=torch.contiguous_format):
    inputs = {k: (v.contiguous(memory_format=fmt) if v.dim() == 4 else v)
              for k, v in entry["inputs"].items()}
    x = inputs.pop("x") if x is None else x
    t = inputs.pop("t") if t is None else t
    inputs.pop("x", None), inputs.pop("t", None)
    with torch.no_grad():
        if entry["kind"] == "unet":
            return model(x, t, inputs.get("y"))
        if entry["kind"] == "superres":
            return model(x, t, low_res=inputs["low_res"], y=inputs.get("y"))
        return model(x, t)


MODEL_NAMES = ["unet_cond", "unet_uncond", "upsampler", "classifier_attention",
               "classifier_spatial", "classifier_adaptive", "classifier_spatial_v2"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_outputs_match_reference(name, tmp_path):
    model, entry = fixture_model(name, tmp_path)
    out = run(model, entry)
    assert_within(out, entry["output"], MODEL_ATOL, what=name)


def test_fractional_timesteps_match_reference():
    """rescale_timesteps hands the model float timesteps; the embedding must take them."""
    model, entry = fixture_model("unet_uncond")
    ft = entry["inputs_float_t"]
    out = run(model, entry, x=ft["x"], t=ft["t"])
    assert_within(out, entry["output_float_t"], MODEL_ATOL, what="float t")


@pytest.mark.parametrize("name", ["unet_cond", "unet_uncond", "classifier_attention"])
def test_plain_attention_matches_sdpa(name):
    """SDPA's unfused MATH kernel, the baseline benchmarks/models.py measures the fused kernels
    against, computes the same thing."""
    model, entry = fixture_model(name)
    with sdpa_kernel(SDPBackend.MATH):
        out = run(model, entry)
    assert_within(out, entry["output"], MODEL_ATOL, what=f"{name} plain attention")


@pytest.mark.parametrize("name", ["unet_cond", "upsampler", "classifier_attention",
                                  "classifier_spatial_v2"])
def test_channels_last_matches_float32(name):
    """Same float32 math in another memory layout: the README's model tolerance applies (it was
    measured with channels_last among others)."""
    model, entry = fixture_model(name)
    model = model.to(memory_format=torch.channels_last)
    out = run(model, entry, fmt=torch.channels_last)
    assert_within(out, entry["output"], MODEL_ATOL, what=f"{name} channels_last")


@pytest.mark.parametrize("name", ["unet_cond", "unet_uncond", "upsampler", "classifier_attention",
                                  "classifier_spatial_v2"])
def test_bf16_autocast_close_to_float32(name):
    """bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3). These random-weight models
    (no zero-initialised output layers) run ~20-40 rounding layers deep; independent roundings
    add up in quadrature to about 1-2% of the output's norm (measured: 0.5-1.7%). We allow 4%
    relative L2 and 6% of the largest output elementwise, and require a visible difference so
    the test proves bf16 really ran."""
    model, entry = fixture_model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, entry)
    assert out.dtype == torch.float32, "models return their input's dtype"
    want = entry["output"]
    rel_l2 = ((out - want).norm() / want.norm()).item()
    rel_max = ((out - want).abs().max() / want.abs().max()).item()
    assert 1e-4 < rel_l2 < 4e-2, rel_l2
    assert rel_max < 6e-2, rel_max


def test_group_norm_runs_in_float32_under_autocast():
    from adm.models.layers import GroupNorm32

    norm = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 4, 4) * 300 + 1000).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    want = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    assert y.dtype == torch.bfloat16
    assert_within(y.float(), want.to(torch.bfloat16).float(), 0.0, 0.0, what="group norm")


def _small_unet():
    torch.manual_seed(0)
    model = openai.create_model(
        "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
        "--attention_resolutions 8 --class_cond True --num_classes 10 --learn_sigma True "
        "--num_head_channels 32 --resblock_updown True")
    for p in model.parameters():  # move every layer off its (partly zero) initialisation
        p.data.normal_(0, 0.1)
    return model


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """fullgraph=True: the whole forward is one graph (no Python-side shape branching)."""
    model = _small_unet().eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.tensor([1, 7])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want, got = model(x, t, y), compiled(x, t, y)
    assert_within(got, want, 1e-5, what="compiled vs eager")


def test_gradient_checkpointing_gives_same_gradients():
    flags = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
             "--attention_resolutions 8 --learn_sigma True --num_head_channels 32")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = openai.create_model(f"{flags} --use_checkpoint {ckpt}").train()
        for p in model.parameters():
            p.data.normal_(0, 0.1)
        x = torch.randn(2, 3, 16, 16)
        model(x, torch.tensor([1, 900])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_within(grads[1], grads[0], 1e-6, what="checkpointed gradients")


def test_use_fp16_keeps_keys_and_runs_float32_on_cpu():
    """use_fp16 must not change the state dict (released flags all set it); on CPU it is a
    no-op, so outputs equal the float32 model's."""
    model, entry = fixture_model("unet_cond")
    fp16 = openai.create_model({**entry["flags"], "use_fp16": True})
    sd = model.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in fp16.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in sd.items()}
    fp16.load_state_dict(sd)
    assert_within(run(fp16.eval(), entry), entry["output"], MODEL_ATOL, what="use_fp16 on cpu")


def test_class_conditional_needs_labels():
    model, entry = fixture_model("unet_cond")
    with pytest.raises(ValueError, match="class-conditional"):
        model(entry["inputs"]["x"], entry["inputs"]["t"])


# -- no residual blocks per level (fixtures/adm_reference_extra/models_depth0.pt) -----------------

DEPTH0 = Path(__file__).parent / "fixtures" / "adm_reference_extra" / "models_depth0.pt"


@functools.lru_cache(maxsize=None)
def depth0_fixture() -> dict:
    return torch.load(DEPTH0, map_location="cpu", weights_only=True)


def _depth0_inputs(model, entry: dict, n: int = 2) -> tuple:
    """Random inputs of the model's size: (x [n,3,S,S], t [n], keyword inputs)."""
    kind, flags = entry["kind"], entry["flags"]
    size = flags["large_size"] if kind == "superres" else flags["image_size"]
    kwargs = {}
    if kind == "superres":
        kwargs["low_res"] = torch.randn(n, 3, flags["small_size"], flags["small_size"])
    if getattr(model, "num_classes", None) is not None and kind != "classifier":
        kwargs["y"] = torch.arange(n)
    return torch.randn(n, 3, size, size), torch.tensor([0, 999])[:n], kwargs


@pytest.mark.parametrize("name", sorted(torch.load(DEPTH0, weights_only=True)["models"]))
def test_zero_residual_blocks_build_as_the_reference_and_run(name):
    """num_res_blocks=0 (classifier_depth=0): the reference keeps only the resampling blocks in
    the encoder and one block per decoder level, the upsampler riding on it. Same keys, shapes
    and parameter count as the reference's model, and a forward pass of the right shape."""
    entry = depth0_fixture()["models"][name]
    model = BUILDERS[entry["kind"]](entry["flags"]).eval()
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == entry["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    x, t, kwargs = _depth0_inputs(model, entry)
    with torch.no_grad():
        out = model(x, t, **kwargs)
    want = (2, 1000) if entry["kind"] == "classifier" else (2, model.out_channels, *x.shape[2:])
    assert tuple(out.shape) == want and torch.isfinite(out).all()


def test_zero_residual_blocks_output_matches_reference():
    entry = depth0_fixture()["models"]["unet_nrb0"]
    model = openai.create_model(entry["flags"])
    model.load_state_dict(float_state_dict(entry), strict=True)
    with torch.no_grad():
        out = model.eval()(entry["inputs"]["x"], entry["inputs"]["t"])
    assert_within(out, entry["output"], MODEL_ATOL, what="unet_nrb0")


@pytest.mark.parametrize("build, flag", [(openai.create_model, "num_res_blocks"),
                                         (openai.create_superres_model, "num_res_blocks"),
                                         (openai.create_classifier, "classifier_depth")])
def test_negative_depth_is_refused_naming_the_flag(build, flag):
    flags = {"image_size": 16, "large_size": 16, "small_size": 8, "channel_mult": "1,2",
             "classifier_channel_mult": "1,2", "attention_resolutions": "8",
             "classifier_attention_resolutions": "8", "num_channels": 32,
             "classifier_width": 64, flag: -1}
    with pytest.raises(openai.FlagError, match=f"{flag}=-1"):
        build(flags)
