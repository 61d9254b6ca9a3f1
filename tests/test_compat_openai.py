"""guided-diffusion's flags and released checkpoints: every preset's exact state-dict layout,
flag parsing and its errors, checkpoint loading and its refusals."""
import json
import os

import pytest
import torch

from adm import checkpoints, presets
from adm.compat import openai
from helpers import FIXTURES, float_state_dict, load_fixture

PRESETS = json.loads((FIXTURES / "presets.json").read_text())["presets"]
BUILDER = {"diffusion": openai.create_model, "upsampler": openai.create_superres_model,
           "classifier": openai.create_classifier}


def layout(model):
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_released_layout_from_flags(name):
    """Built on the meta device from the reference's flags (dict) and from the README's flag
    string: exactly the released keys, in order, with their shapes, and the parameter count."""
    entry = PRESETS[name]
    build = BUILDER[entry["kind"]]
    readme = " ".join(f"--{k} {v}" for k, v in entry["readme_flags"].items())
    with torch.device("meta"):
        for model in (build(entry["flags"]), build(readme)):
            assert layout(model) == entry["state_dict"]
            assert num_params(model) == entry["num_params"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_adm_presets_match_release(name):
    p = presets.preset(name)
    entry = PRESETS[name]
    assert p.kind == entry["kind"] and p.file == entry["file"]
    flags = p.model_flags
    for k, v in entry["flags"].items():  # every reference flag, same value
        assert flags[k] == v, (k, flags[k], v)
    with torch.device("meta"):
        model = p.build()
    assert layout(model) == entry["state_dict"]
    sample = entry.get("sample_flags")
    if sample:
        assert p.sampling.timestep_respacing == sample["timestep_respacing"]
        assert p.sampling.use_ddim == sample.get("use_ddim", False)
        assert p.sampling.classifier == entry.get("classifier")
        assert p.sampling.classifier_scale == sample.get("classifier_scale", 0.0)
    if "sample_flags_ddim25" in entry:
        alt = p.alternatives["ddim25"]
        assert (alt.timestep_respacing, alt.use_ddim, alt.classifier_scale) == ("ddim25", True, 1.0)
    for use in entry.get("used_with", []):
        assert (use["diffusion"], use["classifier_scale"]) in p.used_with


def test_preset_listing():
    assert presets.list_presets() == list(PRESETS)
    table = presets.describe_presets()
    for name in PRESETS:
        assert name in table
    assert "128x128_classifier scale 0.5" in table
    with pytest.raises(KeyError, match="no preset 'nope'"):
        presets.preset("nope")
    assert presets.preset("64x64_diffusion.pt").name == "64x64_diffusion"


def test_flag_string_types_and_forms():
    f = openai.parse_flags("--image_size=32 --class_cond true --dropout 0.1 --channel_mult 1,2")
    assert f["image_size"] == 32 and f["class_cond"] is True and f["dropout"] == 0.1
    assert f["channel_mult"] == "1,2" and f["num_channels"] == 128  # default kept
    # YAML-ish values: an int respacing and a list of resolutions
    f = openai.parse_flags({"timestep_respacing": 250, "attention_resolutions": [16, 8]})
    assert f["timestep_respacing"] == "250" and f["attention_resolutions"] == "16,8"
    assert openai.parse_flags(openai.format_flags(f)) == f


@pytest.mark.parametrize("flags, message", [
    ({"image_sise": 64}, "unknown flag.*image_sise"),
    ("--image_size 64 --bogus_flag 1", "unknown flag.*bogus_flag"),
    ("--image_size", "--image_size has no value"),
    ({"class_cond": "maybe"}, "class_cond='maybe'"),
    ({"num_channels": 12.5}, "num_channels=12.5"),
    ({"image_size": 100}, "image size 100 needs an explicit channel_mult"),
    ({"image_size": 32, "channel_mult": "1,x"}, "channel_mult='1,x'"),
    ({"image_size": 30, "channel_mult": "1,2,2"}, "divisible by 4"),
    ({"image_size": 64, "attention_resolutions": "24"}, "attention_resolutions='24'"),
    ({"image_size": 32, "channel_mult": "1,2", "num_channels": 48}, "not divisible by the 32"),
    ({"num_head_channels": 48}, "num_head_channels=48"),
])
def test_bad_model_flags_are_named(flags, message):
    with pytest.raises(openai.FlagError, match=message):
        openai.create_model(flags)


def test_bad_classifier_and_upsampler_flags_are_named():
    with pytest.raises(openai.FlagError, match="classifier_pool='max'"):
        openai.create_classifier({"classifier_pool": "max"})
    with pytest.raises(openai.FlagError, match="classifier_channel_mult"):
        openai.create_classifier({"image_size": 32})
    with pytest.raises(openai.FlagError, match="large_size=128.*channel_mult"):
        openai.create_superres_model({"large_size": 128, "small_size": 32})
    with pytest.raises(openai.FlagError, match="small_size=128 is larger than large_size=64"):
        openai.create_superres_model({"large_size": 64, "small_size": 128,
                                      "channel_mult": "1,2"})


def test_small_models_build_save_and_reload_through_flags(tmp_path):
    """The quickstart sizes the reference refuses: explicit multipliers for every builder."""
    cases = [
        (openai.create_model, "--image_size 16 --num_channels 32 --num_res_blocks 1 "
         "--channel_mult 1,2 --attention_resolutions 8 --class_cond True --num_classes 10"),
        (openai.create_superres_model, "--large_size 32 --small_size 16 --num_channels 32 "
         "--num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 --learn_sigma True"),
        (openai.create_classifier, "--image_size 16 --classifier_width 32 --classifier_depth 1 "
         "--classifier_channel_mult 1,2 --classifier_attention_resolutions 8 "
         "--classifier_num_head_channels 32 --num_classes 10"),
    ]
    for build, flags in cases:
        model = build(flags)
        path = tmp_path / "m.pt"
        torch.save(model.state_dict(), path)
        again = openai.load_checkpoint(build(flags), str(path))
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), k
    classifier = build(flags)
    assert classifier(torch.randn(2, 3, 16, 16), torch.tensor([0, 9])).shape == (2, 10)


def test_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path):
    entry = load_fixture("models.pt")["models"]["unet_cond"]
    model = openai.create_model(entry["flags"])
    sd = float_state_dict(entry)
    sd.pop("label_emb.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["out.2.weight"] = torch.zeros(6, 32, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(checkpoints.CheckpointError) as err:
        openai.load_checkpoint(model, str(path))
    msg = str(err.value)
    assert "missing keys: label_emb.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "out.2.weight: checkpoint (6, 32, 1, 1) vs model (6, 32, 3, 3)" in msg


class _Exploit:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    model = openai.create_model({"image_size": 16, "channel_mult": "1,2", "num_channels": 32,
                                 "attention_resolutions": "8"})
    with pytest.raises(checkpoints.CheckpointError, match="refused to load checkpoint.*pickled code"):
        openai.load_checkpoint(model, str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "is not a readable torch file"),
    (b"PK\x03\x04 a zip cut short", "is not a readable torch file"),
])
def test_unreadable_files_are_refused_naming_them(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint {path} {message}"):
        checkpoints.read_state_dict(str(path))
    # an open file is named as the caller says (resolve() reads bytes it already holds)
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint s3://b/m.pt {message}"):
        checkpoints.read_state_dict(path.open("rb"), "s3://b/m.pt")


def test_compat_only_names_the_reference_api():
    """`adm.compat.openai` defines nothing: its names are the factory's builders and the one
    checkpoint loader, the same objects the library uses."""
    from adm import factory

    assert openai.load_checkpoint is checkpoints.load_checkpoint
    assert openai.create_model is factory.create_model
    assert all(getattr(openai, name).__module__ in ("adm.factory", "adm.checkpoints")
               for name in openai.__all__ if callable(getattr(openai, name)))


def test_nested_state_dict_is_accepted(tmp_path):
    model = openai.create_classifier(
        load_fixture("models.pt")["models"]["classifier_adaptive"]["flags"])
    path = tmp_path / "nested.pt"
    torch.save({"model": model.state_dict(), "step": torch.tensor(3)}, path)
    assert openai.load_checkpoint(model, str(path)) is model


def test_flag_string_edge_cases():
    f = openai.parse_flags("--num_heads_upsample -1 --channel_mult '' --timestep_respacing=ddim25 "
                           "--dropout=0.5 --dropout 0.25")
    assert (f["num_heads_upsample"], f["channel_mult"], f["timestep_respacing"], f["dropout"]) \
        == (-1, "", "ddim25", 0.25)  # negative values, empty values, the last of a repeated flag
    with pytest.raises(openai.FlagError, match="unknown flag.*image\\b"):
        openai.parse_flags("--image=64")  # no abbreviation of --image_size
    with pytest.raises(openai.FlagError, match="--image_size has no value"):
        openai.parse_flags("--image_size --class_cond True")
    with pytest.raises(openai.FlagError, match="got 'stray'"):
        openai.parse_flags("--image_size 64 stray")


def test_values_the_reference_builds_are_accepted():
    """The reference builds these; only what it cannot build is refused, naming the flag."""
    small = {"image_size": 16, "num_channels": 32, "channel_mult": "1,2",
             "attention_resolutions": "8"}
    for extra in ({"num_res_blocks": 0}, {"dropout": 1.0},
                  {"num_heads": 0, "num_head_channels": 32}):
        openai.create_model({**small, **extra})
    openai.create_classifier({"image_size": 16, "classifier_width": 64, "classifier_depth": 0,
                              "classifier_channel_mult": "1,2",
                              "classifier_attention_resolutions": "8"})
    for extra, flag in (({"num_heads": 0}, "num_heads=0"), ({"dropout": 1.5}, "dropout=1.5"),
                        ({"num_heads_upsample": 0}, "num_heads_upsample=0")):
        with pytest.raises(openai.FlagError, match=flag):
            openai.create_model({**small, **extra})
