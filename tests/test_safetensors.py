"""safetensors exports and loading (`adm.checkpoints`, `adm.train.checkpoint`): every export
writes `<name>.safetensors` beside `<name>.pt` with the same keys, dtypes and values and the
flags (and classes) in its metadata; every loader (generation's `resolve`/`load`, Serve's
settings, evaluation's classifier features, `run.init_from`) reads either, from a path or
s3://; a wrong shape or a missing key is the same error as for a `.pt`; a corrupt file is
named, and a file named `.safetensors` is never unpickled."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from adm import checkpoints, storage
from adm.compat import openai
from adm.config import ConfigError
from adm.train.checkpoint import export_files, export_run, save_state
from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, randomized

FLAGS = TINY_UNET_FLAGS
CLASSES = [f"digit{i}" for i in range(10)]


def _state(seed: int = 1) -> tuple[dict, dict]:
    """A training state and meta as the loop keeps them: the model's weights and one EMA's
    (other values, so that a mix-up between the two files shows)."""
    model = randomized(openai.create_model(FLAGS), seed)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    return ({"model": model.state_dict(), "ema": [ema]},
            {"step": 7, "ema_rates": ["0.999"], "flags": FLAGS})


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes and shapes, and every value bit for bit (safetensors keeps its own
    key order; state dicts load by name)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_export_writes_safetensors_beside_each_pt_and_round_trips_bit_identical(tmp_path):
    state, meta = _state()
    out = tmp_path / "export"
    written = export_files(state, meta, str(out), CLASSES)
    assert {Path(w).name for w in written} == {
        "model000007.pt", "model000007.safetensors", "ema_0.999_000007.pt",
        "ema_0.999_000007.safetensors", "flags.json"}
    for stem, weights in (("model000007", state["model"]), ("ema_0.999_000007", state["ema"][0])):
        from_st = checkpoints.read_state_dict(str(out / f"{stem}.safetensors"))
        _assert_identical(from_st, weights)
        _assert_identical(from_st, checkpoints.read_state_dict(str(out / f"{stem}.pt")))
        # generation's loader: the file resolved (flags.json beside it) and loaded
        spec = checkpoints.resolve("model", str(out / f"{stem}.safetensors"), None, "diffusion")
        _assert_identical(checkpoints.load(spec, torch.device("cpu")).state_dict(), weights)
    raw = (out / "model000007.safetensors").read_bytes()
    assert checkpoints.safetensors_metadata(raw, "x") == {
        "format": "pt", "flags": json.dumps(FLAGS, sort_keys=True),
        "classes": json.dumps(CLASSES)}


def test_round_trip_keeps_every_dtype_and_copies_views():
    """Half, bfloat16, integer and bool tensors keep their dtype; a non-contiguous view is
    written as its values."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"f16": torch.randn(3, dtype=torch.float16), "bf16": torch.randn(3).bfloat16(),
               "f64": torch.randn(2, 2, dtype=torch.float64), "i64": torch.arange(5),
               "u8": torch.arange(4, dtype=torch.uint8), "mask": torch.tensor([True, False]),
               "view": base.T, "scalar": torch.tensor(2.5)}
    back = checkpoints.read_state_dict(io.BytesIO(checkpoints.to_safetensors(tensors)), "t")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_flags_and_classes_come_from_the_metadata_when_nothing_is_beside(tmp_path):
    state, meta = _state()
    export_files(state, meta, str(tmp_path / "export"), CLASSES)
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copyfile(tmp_path / "export" / "ema_0.999_000007.safetensors", lone)
    spec = checkpoints.resolve("model", str(lone), None, "diffusion")
    assert spec.flags == FLAGS and spec.classes == CLASSES
    _assert_identical(checkpoints.load(spec, torch.device("cpu")).state_dict(), state["ema"][0])
    # flags.json (and classes.json) beside the file win over its metadata
    (lone.parent / "flags.json").write_text(json.dumps({**FLAGS, "diffusion_steps": 50}))
    (lone.parent / "classes.json").write_text(json.dumps(["a"] * 10))
    spec = checkpoints.resolve("model", str(lone), None, "diffusion")
    assert spec.flags["diffusion_steps"] == 50 and spec.classes == ["a"] * 10


def test_a_lone_safetensors_without_flags_is_refused_as_a_lone_pt_is(tmp_path):
    sd = randomized(openai.create_model(FLAGS)).state_dict()
    (tmp_path / "m.safetensors").write_bytes(checkpoints.to_safetensors(sd))  # no metadata
    with pytest.raises(ConfigError, match=r"model: no flags.json beside .*m.safetensors \(nor "
                                          r"flags in a safetensors file's metadata\)"):
        checkpoints.resolve("model", str(tmp_path / "m.safetensors"), None, "diffusion")
    (tmp_path / "m2.safetensors").write_bytes(
        safetensors.torch.save({"x": torch.zeros(1)}, {"flags": "[1, 2]"}))
    with pytest.raises(ConfigError, match="the metadata of .*m2.safetensors does not hold a "
                                          "mapping of flags"):
        checkpoints.resolve("model", str(tmp_path / "m2.safetensors"), None, "diffusion")


def _bad_state_dict() -> dict[str, torch.Tensor]:
    """The tiny model's weights with one key missing, two unexpected and one shape wrong."""
    sd = dict(openai.create_model(FLAGS).state_dict())
    sd.pop("label_emb.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["another.extra"] = torch.zeros(300)  # stored before extra.weight in a .safetensors
    sd["out.2.weight"] = torch.zeros(6, 32, 1, 1)
    return sd


def test_wrong_shape_or_missing_key_is_the_same_error_as_for_a_pt(tmp_path):
    sd = _bad_state_dict()
    torch.save(sd, tmp_path / "bad.pt")
    (tmp_path / "bad.safetensors").write_bytes(checkpoints.to_safetensors(sd))
    (tmp_path / "flags.json").write_text(json.dumps(FLAGS))

    def errors(suffix: str) -> list[str]:
        path = str(tmp_path / f"bad{suffix}")
        out = []
        with pytest.raises(checkpoints.CheckpointError) as err:  # init_from, a worker's load
            openai.load_checkpoint(openai.create_model(FLAGS), path)
        out.append(str(err.value))
        with pytest.raises(ConfigError) as err:  # generation, Serve, evaluation: resolve
            checkpoints.resolve("model", path, None, "diffusion")
        out.append(str(err.value))
        return [m.replace(path, "FILE") for m in out]

    pt, st = errors(".pt"), errors(".safetensors")
    assert st == pt
    assert "missing keys: label_emb.weight" in st[0]
    assert "2 unexpected keys: another.extra, extra.weight" in st[0]
    assert "out.2.weight: checkpoint (6, 32, 1, 1) vs model (6, 32, 3, 3)" in st[1]


class _Exploit:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content, reason", [
    (b"", "header too small"),
    (b"not a safetensors file at all", "header too large"),
    (b"PK\x03\x04 a zip cut short", "header too large"),
])
def test_a_corrupt_safetensors_file_is_named(tmp_path, content, reason):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"checkpoint {path} is not a readable safetensors file "
                             f"\\(Error while deserializing: {reason}"):
        checkpoints.read_state_dict(str(path))
    # resolve names it too, with flags.json beside it (the tensors) or without (the metadata)
    with pytest.raises(ConfigError, match=f"model: checkpoint {path} is not a readable "
                                          f"safetensors file"):
        checkpoints.resolve("model", str(path), None, "diffusion")
    (tmp_path / "flags.json").write_text(json.dumps(FLAGS))
    with pytest.raises(ConfigError, match=f"model: checkpoint {path} is not a readable "
                                          f"safetensors file"):
        checkpoints.resolve("model", str(path), None, "diffusion")


def test_a_torch_pickle_named_safetensors_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    torch.save({"time_embed.0.weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"checkpoint {path} is not a readable safetensors file"):
        openai.load_checkpoint(openai.create_model(FLAGS), str(path))
    assert not marker.exists()


def test_a_safetensors_file_without_the_suffix_is_told_by_its_bytes(tmp_path):
    """An S3 key or a file without `.safetensors` is read as one by its header; the released
    torch files (zip or legacy pickle) are not taken for one."""
    sd = randomized(openai.create_model(FLAGS)).state_dict()
    data = checkpoints.to_safetensors(sd, FLAGS)
    (tmp_path / "weights").write_bytes(data)
    _assert_identical(checkpoints.read_state_dict(str(tmp_path / "weights")), sd)
    _assert_identical(checkpoints.read_state_dict(io.BytesIO(data), "s3://b/weights"), sd)
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
        assert not checkpoints.looks_like_safetensors(buf.getvalue()[:9])
        _assert_identical(checkpoints.read_state_dict(io.BytesIO(buf.getvalue()), "m"), sd)


def test_serve_and_evaluation_resolve_a_safetensors_export(tmp_path):
    """Serve's settings and evaluation's classifier features go through the same resolve."""
    from adm.evaluate.networks import build_network, resolve_network
    from adm.serve.settings import ServeSettings, load_settings

    base = randomized(openai.create_model(FLAGS), 2)
    clf = randomized(openai.create_classifier(TINY_CLASSIFIER_FLAGS), 3)
    for name, net, flags in (("base", base, FLAGS), ("clf", clf, TINY_CLASSIFIER_FLAGS)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(
            checkpoints.to_safetensors(net.state_dict(), flags, CLASSES))
    loaded = load_settings(ServeSettings(base=str(tmp_path / "base" / "model.safetensors"),
                                         classifier=str(tmp_path / "clf" / "model.safetensors")))
    assert loaded.base.flags == FLAGS and loaded.base.classes == CLASSES
    assert loaded.classifier.flags == TINY_CLASSIFIER_FLAGS
    features = resolve_network(f"classifier:{tmp_path / 'clf' / 'model.safetensors'}")
    extractor = build_network(features, torch.device("cpu"))
    _assert_identical(extractor.classifier.state_dict(), clf.state_dict())


def _worker(tmp_path, *overrides: str):
    """A training worker of the tiny diffusion config, as `adm.train.loop` builds one."""
    from torch.optim.swa_utils import AveragedModel

    from adm.train.config import build_model, load_config
    from adm.train.loop import Worker
    from adm.train.objectives import make_objective
    from test_train import TINY_DIFFUSION, write_config

    cfg = load_config(write_config(tmp_path, flags=TINY_DIFFUSION), list(overrides))
    model = build_model(cfg)
    return Worker(cfg, 0, 1, torch.device("cpu"), model, model,
                  {r: AveragedModel(model, use_buffers=False) for r in cfg.optim.ema_rate},
                  torch.optim.AdamW(model.parameters()),
                  torch.amp.GradScaler("cpu", enabled=False),
                  make_objective(cfg, torch.device("cpu")))


def test_a_training_runs_export_has_safetensors_and_init_from_reads_it(tmp_path):
    """A training worker's checkpoint, exported as `fit` exports it (`export_run`): each
    `.pt` has its `.safetensors` (the same tensors, the run's flags and classes); a new run
    started from that file (`run.init_from`) starts from those weights."""
    w = _worker(tmp_path)
    randomized(w.model, 4)
    for ema in w.emas.values():
        randomized(ema.module, 5)
    w.step = 3
    run = tmp_path / "runs" / "r"
    (run / "checkpoint_000000").mkdir(parents=True)
    save_state(str(run / "checkpoint_000000"), w.state(), w.meta())
    (run / "classes.json").write_text(json.dumps(CLASSES))
    export = run / "export"
    export_run(str(run), str(export))
    assert {p.name for p in export.iterdir()} == {
        "model000003.pt", "model000003.safetensors", "ema_0.999_000003.pt",
        "ema_0.999_000003.safetensors", "flags.json", "classes.json"}
    for stem in ("model000003", "ema_0.999_000003"):
        _assert_identical(checkpoints.read_state_dict(str(export / f"{stem}.safetensors")),
                          checkpoints.read_state_dict(str(export / f"{stem}.pt")))
    meta = checkpoints.safetensors_metadata(
        (export / "ema_0.999_000003.safetensors").read_bytes(), "ema")
    assert json.loads(meta["flags"]) == json.loads((export / "flags.json").read_text())
    assert json.loads(meta["classes"]) == CLASSES

    from adm.train.loop import restore

    ema_file = export / "ema_0.999_000003.safetensors"
    fresh = _worker(tmp_path, f"run.init_from={ema_file}")
    restore(fresh, None)
    _assert_identical(fresh.model.state_dict(), checkpoints.read_state_dict(str(ema_file)))


@pytest.mark.timeout(120)
def test_export_and_load_over_s3(s3_server, monkeypatch):
    """The export's files on S3, resolved and loaded from their s3:// URIs."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    state, meta = _state(6)
    out = f"s3://{s3_server.new_bucket()}/run/export"
    export_files(state, meta, out, CLASSES)
    uri = f"{out}/model000007.safetensors"
    assert storage.is_file(uri)
    spec = checkpoints.resolve("model", uri, None, "diffusion")
    assert spec.flags == FLAGS and spec.classes == CLASSES  # no classes.json: the metadata's
    _assert_identical(checkpoints.load(spec, torch.device("cpu")).state_dict(), state["model"])
    storage.delete(f"{out}/flags.json")
    assert checkpoints.resolve("model", uri, None, "diffusion").flags == FLAGS
