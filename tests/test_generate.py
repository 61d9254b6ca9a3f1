"""Large-scale sampling (`adm.generate`, `jobs/sample.py`) on tiny random-weight models with a
real Ray: exactly N samples in index order, the same bytes whatever the batch sizes and actor
counts, the chained upsampler stage, resume and refusals, S3 output, and every bad setting
refused before any work (exit 2, one `error:` line, nothing written)."""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adm import storage
from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, export_random, load_job
from adm.compat import openai
from adm.config import ConfigError
from adm.diffusion import sample
from adm.diffusion.seeds import index_seeds
from adm.generate import generate, labels_for, load_sample_config, make_plan
from adm.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]
BASE = TINY_UNET_FLAGS
CLASSIFIER = TINY_CLASSIFIER_FLAGS
UPSAMPLER = {**{k: v for k, v in BASE.items() if k != "image_size"}, "large_size": 16,
             "small_size": 8}
CLASSES = [f"class{i}" for i in range(10)]


job = load_job("sample")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nets")
    base = export_random(root / "base", openai.create_model(BASE), BASE, 1)
    (root / "base" / "classes.json").write_text(json.dumps(CLASSES))
    cfg_flags = {**BASE, "class_dropout_prob": 0.1}
    return {"base": base,
            "base_cfg": export_random(root / "base_cfg", openai.create_model(cfg_flags), cfg_flags, 6),
            "classifier": export_random(root / "clf", openai.create_classifier(CLASSIFIER), CLASSIFIER, 2),
            "upsampler": export_random(root / "up", openai.create_superres_model(UPSAMPLER), UPSAMPLER, 3),
            "root": root}


def settings(nets, out, **kw):
    base = dict(model=nets["base"], num_samples=15, shard_size=5, steps=4, seed=3, out=str(out),
                cpus_per_worker=0.5)
    return load_sample_config(None, [], **{**base, **kw})


def run(nets, out, logs=None, **kw) -> bytes:
    generate(make_plan(settings(nets, out, **kw)), progress=False,
             log=(logs.append if logs is not None else lambda m: None))
    return storage.read_bytes(os.path.join(out, "samples.npz"))


def test_labels_come_from_seed_and_index():
    a = labels_for(np.arange(20), 7, "uniform", 10)
    assert np.array_equal(a[5:9], labels_for(np.array([5, 6, 7, 8]), 7, "uniform", 10))
    assert len(set(a.tolist())) > 3 and not np.array_equal(a, labels_for(np.arange(20), 8,
                                                                         "uniform", 10))
    assert np.array_equal(labels_for(np.arange(4), 0, "balanced", 3), [0, 1, 2, 0])
    assert set(labels_for(np.arange(50), 1, [3, 7], 10).tolist()) == {3, 7}


@pytest.mark.parametrize("sampler,eta,guided,cfg_scale", [
    ("ddpm", 0.0, True, 1.0), ("ddim", 0.5, False, 1.0), ("dpmpp_2m", 0.0, True, 2.0)])
def test_same_bytes_for_any_actor_count_and_batch_size(ray_session, nets, tmp_path, sampler,
                                                       eta, guided, cfg_scale):
    """Exactly N samples, each index once and in order, in the evaluator's format; batch 5 on
    1 actor and on 2 actors give the same file byte for byte, and batch 3 the same images up
    to the kernels' rounding by row count (at most 1 in 255, rarely; the same bytes on some
    CPUs). DPM-Solver++ with both classifier and classifier-free guidance on a model trained
    for the latter too."""
    kw = dict(sampler=sampler, eta=eta, classifier=nets["classifier"] if guided else None,
              classifier_scale=4.0 if guided else None, cfg_scale=cfg_scale)
    if cfg_scale != 1.0:
        kw["model"] = nets["base_cfg"]
    a = run(nets, tmp_path / "a", batch_size=5, num_workers=1, **kw)
    b = run(nets, tmp_path / "b", batch_size=5, num_workers=2, **kw)
    assert a == b
    with np.load(io.BytesIO(a)) as z, \
            np.load(io.BytesIO(run(nets, tmp_path / "c", batch_size=3, num_workers=2, **kw))) as c:
        diff = np.abs(z["arr_0"].astype(int) - c["arr_0"].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        assert np.array_equal(z["arr_1"], c["arr_1"])
    with np.load(io.BytesIO(a)) as z:  # as the ADM evaluator opens it
        assert sorted(z.files) == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (15, 8, 8, 3)
    assert labels.dtype == np.int64
    assert np.array_equal(labels, labels_for(np.arange(15), 3, "uniform", 10))
    assert len({im.tobytes() for im in images}) == 15  # no index twice
    assert (tmp_path / "a" / "grid.png").read_bytes().startswith(b"\x89PNG")
    shards = sorted(os.listdir(tmp_path / "a" / "shards"))
    assert shards == ["shard-000000.npz", "shard-000001.npz", "shard-000002.npz"]


def test_a_sample_is_computed_at_its_own_row_whatever_came_with_it(nets, tmp_path,
                                                                    monkeypatch):
    """A stage computes index i at row i mod batch_size of a full-size call, so the rows that
    arrive with it (stage 2 gets stage 1's batches in any order) cannot change its bits, even
    where the CPU's GEMM rounds a row by its position (MKL's sgemm on an AVX-512 EPYC)."""
    import adm.stage
    from adm.generate.pipeline import StageSampler

    plan = make_plan(settings(nets, tmp_path / "x", batch_size=5, sampler="ddim",
                              precision="fp32"))
    stage = StageSampler(plan.base, seed=3, clip_denoised=True, eta=0.0, gpus=False)
    labels = labels_for(np.arange(10), 3, "uniform", 10)
    calls = []  # the float32 output [5, C, H, W] of each model call

    def recorded(*args, **kwargs):
        calls.append(sample(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(adm.stage, "sample", recorded)

    def run(ids):
        calls.clear()
        stage({"id": np.asarray(ids), "label": labels[ids]})
        return calls

    (whole,) = run([5, 6, 7, 8, 9])
    assert torch.equal(run([9, 6])[0][[4, 1]], whole[[4, 1]])
    assert torch.equal(run([8])[0][[3]], whole[[3]])
    (first,) = run([0, 1, 2, 3, 4])
    # __call__ splits a batch that spans ranges into one call per range, rows in input order.
    calls.clear()
    mixed = stage({"id": np.array([9, 2, 6]), "label": labels[[9, 2, 6]]})["image"]
    assert [c.shape[0] for c in calls] == [5, 5]
    assert torch.equal(calls[0][[2]], first[[2]]) and torch.equal(calls[1][[4, 1]], whole[[4, 1]])
    assert np.array_equal(mixed[[0, 2]], to_uint8(whole[[4, 1]]))
    assert np.array_equal(mixed[[1]], to_uint8(first[[2]]))


def test_chained_run_upsamples_each_base_sample(ray_session, nets, tmp_path):
    """Stage 2 makes sample i from sample i's base image and label, with its own noise."""
    out = tmp_path / "chain"
    run(nets, out, num_samples=6, shard_size=4, batch_size=2, upsampler=nets["upsampler"],
        upsampler_steps=3, upsampler_batch_size=3, upsampler_workers=2, sampler="ddim",
        precision="fp32")  # the float32 loop written out below
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    with np.load(out / "base_samples.npz") as z:
        base, base_labels = z["arr_0"], z["arr_1"]
    assert images.shape == (6, 16, 16, 3) and base.shape == (6, 8, 8, 3)
    assert np.array_equal(labels, base_labels)
    # Sample i, written out: the upsampler on base image i (batches of 3, as its stage runs).
    up = openai.load_checkpoint(openai.create_superres_model(UPSAMPLER), nets["upsampler"]).eval()
    diffusion = openai.create_diffusion(UPSAMPLER)
    for rows in (slice(0, 3), slice(3, 6)):
        low = torch.from_numpy(base[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = sample(up, diffusion, (3, 3, 16, 16), sampler="ddpm", steps="3",
                   y=torch.from_numpy(labels[rows]), model_kwargs={"low_res": low},
                   seeds=index_seeds(3, range(6)[rows], "upsampler"))
        want = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(images[rows], want)


def test_the_serving_engine_gives_the_generation_jobs_bytes(ray_session, nets, tmp_path):
    """A served image is the generation job's sample, bit for bit (float32): indices 0..7 of a
    run seeded 3 (guided DDPM, then the upsampler), each started in a step engine of 8 slots
    (adm.engine, as a Serve replica runs it) at its own step beside rows of other settings,
    come out as the images jobs/sample.py wrote for those indices."""
    from adm.diffusion.rows import RowSpec, RowStepper
    from adm.engine import Engine, Request, StepperRunner

    out = tmp_path / "job"
    run(nets, out, num_samples=8, shard_size=8, batch_size=8, sampler="ddpm",
        classifier=nets["classifier"], classifier_scale=4.0, upsampler=nets["upsampler"],
        upsampler_steps=3, upsampler_batch_size=8, precision="fp32")
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    with np.load(out / "base_samples.npz") as z:
        base = z["arr_0"]
    net = openai.load_checkpoint(openai.create_model(BASE), nets["base"]).eval()
    clf = openai.load_checkpoint(openai.create_classifier(CLASSIFIER), nets["classifier"]).eval()
    up = openai.load_checkpoint(openai.create_superres_model(UPSAMPLER), nets["upsampler"]).eval()

    def serve_rows(stepper, spec, stream, low=None):
        """Each index its own request, submitted a step apart, between other work."""
        engine, got = Engine(StepperRunner(stepper), 8), {}
        for i in range(8):
            engine.submit(Request(f"other{i}", RowSpec("ddpm", 5 + i), [9 - i], [100 + i],
                                  None if low is None else low[7 - i:8 - i]))
            engine.submit(Request(
                str(i), spec, [int(labels[i])], index_seeds(3, [i], stream),
                None if low is None else low[i:i + 1],
                on_event=lambda kind, data, i=i: got.__setitem__(i, data["images"][0])
                if kind == "result" else None))
            engine.step()
        while engine.step():
            pass
        return np.stack([got[i] for i in range(8)])

    served = serve_rows(RowStepper(net, openai.create_diffusion(BASE), slots=8, image_size=8,
                                   classifier=clf), RowSpec("ddpm", 4, classifier_scale=4.0),
                        "base")
    assert np.array_equal(served, base)
    upsampled = serve_rows(RowStepper(up, openai.create_diffusion(UPSAMPLER), slots=8,
                                      image_size=16), RowSpec("ddpm", "3"), "upsampler", served)
    assert np.array_equal(upsampled, images)


def test_resume_finished_and_refused_reruns(ray_session, nets, tmp_path):
    out = tmp_path / "run"
    first = run(nets, out, num_samples=10, batch_size=4)
    # A crash after shard 0 was written: the rest and the merged files are gone.
    for name in ("shards/shard-000001.npz", "samples.npz", "grid.png"):
        (out / name).unlink()
    logs: list[str] = []
    assert run(nets, out, logs, num_samples=10, batch_size=2, num_workers=2) == first
    assert any("resuming: 1 finished shard" in m for m in logs)
    logs.clear()
    mtime = (out / "samples.npz").stat().st_mtime_ns
    run(nets, out, logs, num_samples=10, batch_size=4)
    assert any("already finished" in m for m in logs)
    assert (out / "samples.npz").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"^seed: .* holds a run with seed=3; this run has 4"):
        make_plan(settings(nets, out, num_samples=10, seed=4))
    with pytest.raises(ConfigError, match=r"^num_samples: "):
        make_plan(settings(nets, out, num_samples=12))
    with pytest.raises(ConfigError, match=r"^classes: "):
        make_plan(settings(nets, out, num_samples=10, classes="balanced"))


def test_job_reruns(nets, tmp_path, capsys):
    """Through jobs/sample.py: a finished run is reported and left alone, a run with other
    settings in its folder exits 2 naming the setting, and writes nothing."""
    out = tmp_path / "done"
    out.mkdir()
    cfg = settings(nets, out, num_samples=4, shard_size=4)
    from adm.generate import output

    plan = make_plan(cfg).decide("fp32", "test")  # a finished run's files, written without
    #                                                 sampling
    output.write_settings(str(out), plan.decisive(), plan.execution())
    (out / "samples.npz").write_bytes(b"finished")
    argv = ["--model", nets["base"], "--num-samples", "4", "--steps", "4", "--seed", "3",
            "--out", str(out), "shard_size=4"]
    before = sorted(p.name for p in out.iterdir())
    assert job.main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    assert job.main(argv + ["--seed", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: seed: ")
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "samples.npz").read_bytes() == b"finished"


def test_actors_holding_every_cpu_still_finish(ray_session, nets, tmp_path):
    """4 one-CPU actors on the session's 4-CPU Ray: nothing upstream of the actor pools needs
    a CPU (in-memory source blocks), so this runs instead of waiting forever (the 2-core
    hang, which a read-task source gets into here)."""
    cpus = ray_session.cluster_resources()["CPU"]
    data = run(nets, tmp_path / "x", num_samples=6, shard_size=3, batch_size=3, num_workers=2,
               upsampler=nets["upsampler"], upsampler_workers=2, cpus_per_worker=cpus / 4)
    with np.load(io.BytesIO(data)) as z:
        assert z["arr_0"].shape == (6, 16, 16, 3)


def test_s3_output(ray_session, nets, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    out = f"s3://{s3_server.new_bucket()}/samples/run1"
    data = run(nets, out, num_samples=4, shard_size=3, batch_size=2)
    with np.load(io.BytesIO(data)) as z:
        assert z["arr_0"].shape == (4, 8, 8, 3)
    assert storage.is_file(f"{out}/shards/shard-000001.npz")
    assert storage.is_file(f"{out}/settings.json")


def _bad(nets, tmp_path, capsys, *argv) -> str:
    out = tmp_path / "never"
    assert job.main(["--out", str(out), "--num-samples", "4", *argv]) == 2
    assert not out.exists()  # nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_settings_fail_before_any_work(nets, tmp_path, capsys):
    """Each bad setting: exit 2 with one `error:` line naming it, nothing written, no Ray."""
    m = nets["base"]
    root = nets["root"]
    assert "model_preset: no preset 'nope'" in _bad(nets, tmp_path, capsys, "--model", m,
                                                    "--model-preset", "nope")
    assert "model: no file at" in _bad(nets, tmp_path, capsys, "--model", str(root / "x.pt"))
    (root / "lone.pt").write_bytes((root / "base" / "model.pt").read_bytes())
    assert "no flags.json beside" in _bad(nets, tmp_path, capsys, "--model", str(root / "lone.pt"))
    wrong = root / "wrong"
    wrong.mkdir(exist_ok=True)
    (wrong / "flags.json").write_text(json.dumps({**BASE, "num_channels": 64}))
    (wrong / "model.pt").write_bytes((root / "base" / "model.pt").read_bytes())
    msg = _bad(nets, tmp_path, capsys, "--model", str(wrong / "model.pt"))
    assert "model:" in msg and "shape mismatches" in msg and "input_blocks.0.0.weight" in msg
    big = root / "clf16"
    if not big.exists():
        export_random(big, openai.create_classifier({**CLASSIFIER, "image_size": 16}),
              {**CLASSIFIER, "image_size": 16}, 4)
    assert "classifier: it reads 16px" in _bad(nets, tmp_path, capsys, "--model", m,
                                               "--classifier", str(big / "model.pt"))
    five = root / "clf5"
    if not five.exists():
        export_random(five, openai.create_classifier({**CLASSIFIER, "num_classes": 5}),
                      {**CLASSIFIER, "num_classes": 5}, 4)
    assert "classifier: it has 5 classes; the base model has 10" in _bad(
        nets, tmp_path, capsys, "--model", m, "--classifier", str(five / "model.pt"))
    msg = _bad(nets, tmp_path, capsys, "--model", m, "--model-preset", "64x64_diffusion")
    assert msg.startswith("error: model:") and "does not fit" in msg  # the preset's flags
    up4 = root / "up4"
    if not up4.exists():
        flags = {**UPSAMPLER, "small_size": 4, "large_size": 8}
        export_random(up4, openai.create_superres_model(flags), flags, 5)
    assert "upsampler: its small_size is 4" in _bad(nets, tmp_path, capsys, "--model", m,
                                                    "--upsampler", str(up4 / "model.pt"))
    assert "num_samples: must be positive" in _bad(nets, tmp_path, capsys, "--model", m,
                                                   "--num-samples", "0")
    assert "classes: the model has no class 12" in _bad(nets, tmp_path, capsys, "--model", m,
                                                        "--classes", "3,12")
    assert "classes: 'dog'" in _bad(nets, tmp_path, capsys, "--model", m, "--classes",
                                    "class1,dog")
    assert "classifier_scale: given without a classifier" in _bad(
        nets, tmp_path, capsys, "--model", m, "--classifier-scale", "2")
    assert "steps:" in _bad(nets, tmp_path, capsys, "--model", m, "--steps", "ddim999")
    assert "eta: 0.5 is a DDIM parameter" in _bad(nets, tmp_path, capsys, "--model", m,
                                                   "--sampler", "ddpm", "eta=0.5")
    assert "cfg_scale: 2.0 needs a model trained with label dropout" in _bad(
        nets, tmp_path, capsys, "--model", m, "--cfg-scale", "2")
    assert "cfg_scale: must be finite" in _bad(nets, tmp_path, capsys, "--model",
                                               nets["base_cfg"], "--cfg-scale", "nan")
    assert "timesteps: 'cosine' is not one of" in _bad(nets, tmp_path, capsys, "--model", m,
                                                       "timesteps=cosine")
    assert "steps: timesteps='logsnr' spaces an int" in _bad(
        nets, tmp_path, capsys, "--model", m, "--steps", "ddim4", "--timesteps", "logsnr")
    assert "steps: lambda_min=-3.0 sets where a log-SNR grid starts" in _bad(
        nets, tmp_path, capsys, "--model", m, "--sampler", "ddim", "--steps", "4",
        "--lambda-min", "-3")
    assert "lambda_min: must be <= 20, got nan" in _bad(
        nets, tmp_path, capsys, "--model", m, "--sampler", "dpmpp_2m", "--lambda-min", "nan")


def test_lambda_min_reaches_the_plan_and_the_run_settings(nets, tmp_path):
    """DPM-Solver++'s grid start, as jobs/sample.py and the configs give it: part of the
    stage's plan (what the actors sample with) and of the settings a resume compares."""
    plan = make_plan(settings(nets, tmp_path / "l", sampler="dpmpp_2m", steps=4,
                              lambda_min=-3.0))
    assert plan.base.lambda_min == -3.0
    assert plan.decisive()["settings"]["lambda_min"] == -3.0
    assert plan.decisive()["base"]["lambda_min"] == -3.0
    whole = make_plan(settings(nets, tmp_path / "w", sampler="dpmpp_2m", steps=4,
                               lambda_min=float("-inf")))
    assert whole.base.lambda_min == float("-inf")
    assert make_plan(settings(nets, tmp_path / "d", sampler="dpmpp_2m",
                              steps=4)).base.lambda_min is None


def test_guidance_interval_reaches_the_stage_and_the_run_settings(nets, tmp_path, monkeypatch):
    """`guidance_interval` as jobs/sample.py gives it: in the base stage's plan and in the
    settings a resume compares (absent when unset, so runs recorded before it resume); the
    stage's sampler calls `sample` with it; refused without a classifier."""
    import adm.stage
    from adm.generate.pipeline import StageSampler

    plan = make_plan(settings(nets, tmp_path / "g", classifier=nets["classifier"],
                              classifier_scale=2.0, guidance_interval=[0.5, 8.0],
                              precision="fp32"))
    assert plan.base.guidance_interval == (0.5, 8.0)
    assert plan.decisive()["settings"]["guidance_interval"] == [0.5, 8.0]
    assert plan.decisive()["base"]["guidance_interval"] == [0.5, 8.0]
    plain = make_plan(settings(nets, tmp_path / "p", classifier=nets["classifier"]))
    assert "guidance_interval" not in plain.decisive()["settings"]
    assert "guidance_interval" not in plain.decisive()["base"]
    seen = []
    monkeypatch.setattr(adm.stage, "sample", lambda *a, **kw: (seen.append(kw), sample(*a, **kw))[1])
    stage = StageSampler(plan.base, seed=3, clip_denoised=True, eta=0.0, gpus=False)
    stage({"id": np.arange(2), "label": np.array([1, 2])})
    assert seen and all(kw["guidance_interval"] == (0.5, 8.0) for kw in seen)
    with pytest.raises(ConfigError, match="guidance_interval"):
        settings(nets, tmp_path / "n", guidance_interval=[0.5, 8.0])
    with pytest.raises(ConfigError, match="guidance_interval"):
        settings(nets, tmp_path / "b", classifier=nets["classifier"], guidance_interval=[8, 1])


def test_cache_interval_grid_end_and_the_fast_preset_reach_the_stage(nets, tmp_path,
                                                                      monkeypatch):
    """`cache_interval`, `lambda_max` and `quality: fast` as jobs/sample.py gives them: in the
    base stage's plan, its actors' `sample` calls and the settings a resume compares (absent
    when unset: earlier runs resume with the same settings); the preset fills in only what is
    not given; bad values are refused naming the setting."""
    import adm.stage
    from adm.diffusion.quality import FAST
    from adm.generate.pipeline import StageSampler

    plan = make_plan(settings(nets, tmp_path / "c", cache_interval=2, sampler="unipc",
                              lambda_min=-2.8, lambda_max=1.0, precision="fp32"))
    assert (plan.base.cache_interval, plan.base.lambda_max) == (2, 1.0)
    assert plan.decisive()["settings"]["cache_interval"] == 2
    assert plan.decisive()["base"]["lambda_max"] == 1.0
    seen = []
    monkeypatch.setattr(adm.stage, "sample", lambda *a, **kw: (seen.append(kw), sample(*a, **kw))[1])
    StageSampler(plan.base, seed=3, clip_denoised=True, eta=0.0, gpus=False)(
        {"id": np.arange(2), "label": np.array([1, 2])})
    assert seen and all((kw["cache_interval"], kw["lambda_max"]) == (2, 1.0) for kw in seen)
    plain = make_plan(settings(nets, tmp_path / "p"))
    for key in ("cache_interval", "lambda_max", "quality"):
        assert key not in plain.decisive()["settings"] and key not in plain.decisive()["base"]
    assert plain.base.cache_interval == 1 and plain.base.sampler == "ddpm"

    fast = make_plan(settings(nets, tmp_path / "f", quality="fast", steps=None,
                              classifier=nets["classifier"], classifier_scale=2.0))
    assert (fast.base.sampler, fast.base.steps, fast.base.lambda_min, fast.base.lambda_max,
            fast.base.guidance_interval, fast.base.cache_interval) == (
        FAST["sampler"], FAST["steps"], FAST["lambda_min"], FAST["lambda_max"],
        tuple(FAST["guidance_interval"]), FAST["cache_interval"])
    assert fast.decisive()["settings"]["quality"] == "fast"
    mine = make_plan(settings(nets, tmp_path / "m", quality="fast", steps=6, cache_interval=2))
    assert (mine.base.steps, mine.base.cache_interval, mine.base.guidance_interval) == (6, 2, None)
    for bad, text in ((dict(cache_interval=0), "cache_interval"),
                      (dict(cache_interval=11), "cache_interval"),
                      (dict(quality="ultra"), "quality"),
                      (dict(sampler="ddim", lambda_max=1.0), "lambda_max")):
        with pytest.raises(ConfigError, match=text):
            make_plan(settings(nets, tmp_path / "b", **bad))


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs" / "sample").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_paper_configs_load_and_agree_with_the_readme_presets(path):
    from adm.generate.config import check_numbers
    from adm.presets import preset

    cfg = load_sample_config(str(path))
    check_numbers(cfg)
    base = preset(cfg.model_preset)
    assert base.kind == "diffusion" and cfg.model.endswith(base.file)
    assert cfg.steps == base.sampling.timestep_respacing and cfg.sampler == "ddpm"
    assert cfg.classifier_preset == base.sampling.classifier
    assert cfg.classifier_scale == base.sampling.classifier_scale
    assert cfg.num_samples == 50000
    if cfg.upsampler:
        up = preset(cfg.upsampler_preset)
        assert up.kind == "upsampler" and up.model_flags["small_size"] == \
            base.model_flags["image_size"]
        assert cfg.upsampler_steps == up.sampling.timestep_respacing


def _descendants_named(marker: bytes) -> list[int]:
    """PIDs of this process's descendants (Ray workers of this test session only) whose
    command line (Ray's process title) contains `marker`."""
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    me, found = os.getpid(), []
    for pid in parent:
        p = pid
        while p in parent and p not in (0, 1, me):
            p = parent[p]
        if p != me:
            continue
        try:
            if marker in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_worker_killed_mid_run_then_a_rerun_gives_the_same_file(ray_session, nets, tmp_path):
    """SIGKILL every stage-1 actor once the first shard is written; whatever the run does
    then (Ray Data restarts the actors, or the run fails), running it again gives the file of
    an uninterrupted run."""
    kw = dict(num_samples=12, shard_size=2, batch_size=2, sampler="ddpm")
    want = run(nets, tmp_path / "whole", **kw)
    out = tmp_path / "killed"
    killed: list[int] = []

    def kill_after_first_shard():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            shards = out / "shards"
            if shards.is_dir() and any(n.endswith(".npz") for n in os.listdir(shards)):
                for pid in _descendants_named(b"MapWorker(MapBatches(StageSampler))"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_first_shard)
    killer.start()
    try:
        run(nets, out, **kw)
    except Exception:  # a failed run is allowed: the rerun must finish it
        pass
    killer.join()
    assert killed, "no stage-1 actor was found to kill"
    assert run(nets, out, **kw) == want


class _Unseekable(io.RawIOBase):
    """A write-only stream that cannot seek or tell, like an S3 multipart upload."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += b
        return len(b)


def _evaluator_read(data: bytes, name: str) -> np.ndarray:
    """Read one array as the ADM evaluator's `open_npz_array` does: the zip member's .npy
    header, then its raw bytes in batches."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z, z.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        assert not fortran
        chunks = []
        while chunk := f.read(2 * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize):
            chunks.append(chunk)
        return np.frombuffer(b"".join(chunks), dtype=dtype).reshape(shape)


def test_streamed_npz_is_numpy_savez_and_reads_as_the_evaluator_reads():
    from adm.generate.output import NpzWriter, npz_bytes

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.int64)
    seekable, unseekable = io.BytesIO(), _Unseekable()
    for f in (seekable, unseekable):
        w = NpzWriter(f, images.shape)
        for s, e in ((0, 3), (3, 5), (5, 7)):
            w.add(images[s:e])
        w.finish(labels)
    assert seekable.getvalue() == npz_bytes({"arr_0": images, "arr_1": labels})
    for data in (seekable.getvalue(), bytes(unseekable.data)):
        with np.load(io.BytesIO(data)) as z:
            assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)
        assert np.array_equal(_evaluator_read(data, "arr_0"), images)
    with pytest.raises(ValueError, match="6 images written of 7"):
        w = NpzWriter(io.BytesIO(), images.shape)
        w.add(images[:6])
        w.finish(labels)


def test_merge_streams_shards_in_order_and_checks_them(tmp_path):
    """merge() of hand-written shards gives numpy.savez's bytes of the whole arrays (for
    samples.npz and a chained run's base_samples.npz); a shard missing an index is refused
    and leaves no samples.npz behind."""
    from adm.generate import output

    rng = np.random.default_rng(1)
    n, size = 8, 3
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    base = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    out = str(tmp_path / "run")
    for k, r in enumerate(output.shard_ranges(n, size)):
        sl = slice(r.start, r.stop)
        output.write_shard(out, k, {"index": np.arange(r.start, r.stop), "label": labels[sl],
                                    "image": images[sl], "base": base[sl]})
    output.merge(out, n, size, chained=True)
    assert (tmp_path / "run" / "samples.npz").read_bytes() == output.npz_bytes(
        {"arr_0": images, "arr_1": labels})
    assert (tmp_path / "run" / "base_samples.npz").read_bytes() == output.npz_bytes(
        {"arr_0": base, "arr_1": labels})
    assert (tmp_path / "run" / "grid.png").read_bytes() == output.grid_png(images)

    for name in ("samples.npz", "base_samples.npz", "grid.png"):
        (tmp_path / "run" / name).unlink()
    output.write_shard(out, 1, {"index": np.array([3, 4, 4]), "label": labels[3:6],
                                "image": images[3:6], "base": base[3:6]})
    with pytest.raises(RuntimeError, match=r"shard-000001.npz: does not hold indices 3..5"):
        output.merge(out, n, size, chained=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["shards"]


def test_compile_is_decided_in_the_plan_precision_on_the_stage_device(nets, tmp_path):
    """compile "auto" is decided when the run is planned, per stage: compiled once a stage's
    busiest actor makes COMPILE_PAYS_AFTER_CALLS model calls. precision "auto" is left to the
    stage's device on a fresh run, and taken from settings.json on a resume: a run decided on
    a GPU (fp16) and resumed from a CPU-only driver keeps fp16. A rerun whose settings decide
    otherwise is refused, naming the setting."""
    from adm.generate import output
    from adm.stage import COMPILE_PAYS_AFTER_CALLS

    # 4 steps per batch of 16 rows: the threshold falls between these two sample counts.
    below = 16 * (COMPILE_PAYS_AFTER_CALLS // 4 - 1)
    up = dict(upsampler=nets["upsampler"], upsampler_steps="4")
    small = make_plan(settings(nets, tmp_path / "a", num_samples=below, batch_size=16, **up))
    assert (small.base.precision, small.upsampler.precision) == ("auto", "auto")
    assert small.undecided
    assert (small.base.compile, small.upsampler.compile) == (False, False)
    big = make_plan(settings(nets, tmp_path / "b", num_samples=below + 1, batch_size=16))
    assert big.base.compile is True
    two = make_plan(settings(nets, tmp_path / "c", num_samples=below + 1, batch_size=16,
                             num_workers=2))
    assert two.base.compile is False  # each actor makes half the calls
    given = make_plan(settings(nets, tmp_path / "d", precision="fp32", compile=True))
    assert (given.base.precision, given.base.compile) == ("fp32", True)
    assert not given.undecided and given.decisive()["base"]["precision"] == "fp32"

    output.write_settings(str(tmp_path / "d"), given.decisive(), given.execution())
    with pytest.raises(ConfigError, match=r"^compile: "):
        make_plan(settings(nets, tmp_path / "d", precision="fp32", compile=False))

    on_gpu = small.decide("fp16", "a GPU of compute capability 7.5")
    output.write_settings(str(tmp_path / "a"), on_gpu.decisive(), on_gpu.execution())
    resumed = make_plan(settings(nets, tmp_path / "a", num_samples=below, batch_size=16, **up))
    assert (resumed.base.precision, resumed.upsampler.precision) == ("fp16", "fp16")
    assert not resumed.undecided and resumed.decisive() == on_gpu.decisive()
    with pytest.raises(ConfigError, match=r"^precision: .* holds a run with precision='auto'"):
        make_plan(settings(nets, tmp_path / "a", num_samples=below, batch_size=16,
                           precision="bf16", **up))


def test_the_probe_holds_a_stage_actors_resources(ray_session, nets, tmp_path):
    """The task that decides precision "auto" is placed as a stage's actors are: it holds
    their CPUs (Ray's own record of what the task was given), and answers for this CPU."""
    from adm.generate.pipeline import ask_device

    flags = set(Path("/proc/cpuinfo").read_text().split())
    plan = make_plan(settings(nets, tmp_path / "p", cpus_per_worker=0.75))
    answer = ask_device(plan)
    assert answer["resources"] == {"CPU": 0.75}
    assert answer["precision"] == ("bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32")
    assert answer["device"].startswith("CPU (")


def test_a_resume_keeps_the_recorded_precision_whatever_the_device_says(ray_session, nets,
                                                                         tmp_path):
    """A run whose precision "auto" was decided on another machine (the opposite of this
    CPU's answer, recorded as `generate` records a stage device's answer) and is resumed here
    keeps the recorded precision and gives the first run's bytes; the resume never asks the
    device (no "precision auto:" line)."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    here = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32"
    other = "fp32" if here == "bf16" else "bf16"
    out = tmp_path / "run"
    kw = dict(num_samples=10, batch_size=5)
    elsewhere = make_plan(settings(nets, out, **kw)).decide(other, "another machine")
    generate(elsewhere, progress=False, log=lambda m: None)
    first = storage.read_bytes(os.path.join(out, "samples.npz"))
    recorded = json.loads((out / "settings.json").read_text())
    assert recorded["decisive"]["base"]["precision"] == other
    assert recorded["execution"]["precision_decided_on"] == "another machine"

    for name in ("shards/shard-000001.npz", "samples.npz", "grid.png"):
        (out / name).unlink()
    logs: list[str] = []
    assert run(nets, out, logs, **kw) == first
    assert not any("precision auto" in m for m in logs), logs
    assert json.loads((out / "settings.json").read_text()) == recorded
    # A fresh folder asks this machine's device, which answers otherwise.
    fresh: list[str] = []
    run(nets, tmp_path / "fresh", fresh, num_samples=5, batch_size=5)
    assert any(m.startswith(f"precision auto: {here}, as decided on CPU") for m in fresh), fresh


def test_a_changed_resolved_setting_is_named_by_its_own_path(tmp_path):
    """A difference only in what the settings resolved to (a nested key such as
    base.precision) is named, with both values, by its own dotted path."""
    from adm.generate.output import check_settings, write_settings
    recorded = {"settings": {"seed": 3}, "base": {"precision": "fp16", "steps": 25}}
    write_settings(str(tmp_path), recorded, {})
    assert check_settings(str(tmp_path), recorded) is True
    changed = {"settings": {"seed": 3}, "base": {"precision": "bf16", "steps": 25}}
    with pytest.raises(ConfigError, match=r"^base\.precision: .* holds a run with "
                                          r"base\.precision='fp16'; this run has 'bf16'"):
        check_settings(str(tmp_path), changed)
