"""Distributed training on Ray Train (2 CPU workers, gloo), on the real quickstart digits."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.train
import torch
import yaml

from adm.compat import openai
from adm.config import ConfigError
from adm.train.config import FLAG_NAMES, load_config

# The Train controller and workers run this module's callbacks and loop wrappers: send them by
# value (the workers cannot import the test module).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart"

# A smaller, faster variant of the quickstart models for tests: 16 px.
TINY_DIFFUSION = {
    "image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
    "attention_resolutions": "8", "num_head_channels": 32, "class_cond": True,
    "num_classes": 10, "learn_sigma": True, "resblock_updown": True,
    "diffusion_steps": 100, "noise_schedule": "cosine",
}


@pytest.fixture(scope="module")
def digits(ray_session, tmp_path_factory):
    """The quickstart data, prepared once by the real job code."""
    from adm.data.digits import prepare_digits

    out = str(tmp_path_factory.mktemp("digits") / "digits")
    prepare_digits(out)
    return out


def write_config(tmp_path, kind="diffusion", flags=None, **sections):
    base = yaml.safe_load((QUICKSTART / f"{kind}.yaml").read_text())
    if flags is not None:
        base["model"]["flags"] = flags
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


def fit(path, *overrides, callbacks=(), **options):
    from adm.train.trainer import fit as _fit

    cfg = load_config(path, overrides, **options)
    return cfg, _fit(cfg, callbacks=callbacks)


class ReportLog(ray.train.UserCallback):
    """Test-only Ray Train callback (it runs on the Train controller): one line per report,
    "report STEP CHECKPOINTED WORKERS", and "failure" when a worker dies."""

    def __init__(self, path):
        self.path = str(path)

    def _write(self, line):
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def after_report(self, run_context, metrics, checkpoint):
        self._write(f"report {int(metrics[0]['step'])} {int(checkpoint is not None)} "
                    f"{len(metrics)} {json.dumps(metrics)}")

    def after_exception(self, run_context, worker_exceptions):
        self._write("failure")


def read_reports(path):
    """[(step, checkpointed, metrics of every worker)] per attempt (split at failures)."""
    attempts = [[]]
    for line in Path(path).read_text().splitlines():
        if line == "failure":
            attempts.append([])
            continue
        _, step, ckpt, _, metrics = line.split(" ", 4)
        attempts[-1].append((int(step), bool(int(ckpt)), json.loads(metrics)))
    return [a for a in attempts if a] if len(attempts) > 1 else attempts


# ---------------------------------------------------------------- config checks (no Ray)

def test_config_errors_name_the_key(tmp_path):
    good = write_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key.*optim.learning_rate"):
        load_config(good, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="optim.batch_size: expected int"):
        load_config(good, ["optim.batch_size=big"])
    with pytest.raises(ConfigError, match="optim.batch_size: 33 is not divisible by run.num_workers=2"):
        load_config(good, ["optim.batch_size=33", "run.num_workers=2"])
    with pytest.raises(ConfigError, match="optim.precision"):
        load_config(good, ["optim.precision=fp8"])
    with pytest.raises(ConfigError, match="model.flags.num_chanels: not a model or diffusion"):
        load_config(good, ["model.flags.num_chanels=3"])
    # one key's bounds: pydantic constraints of its field, named with the dotted key
    for override, message in (("optim.lr=0", "optim.lr: must be positive, got 0"),
                              ("run.keep_checkpoints=0", "run.keep_checkpoints: must be positive"),
                              ("optim.grad_clip=-1", "optim.grad_clip: must be >= 0, got -1"),
                              ("optim.ema_rate=[0.99, 1.0]", "optim.ema_rate.1: must be < 1"),
                              ("optim.ema_rate=[]", "optim.ema_rate: must hold at least 1")):
        with pytest.raises(ConfigError) as e:
            load_config(good, [override])
        assert str(e.value).startswith(message), (override, str(e.value))
    cfg = load_config(good, ["optim.lr=3e-4"], run__num_workers=4, optim__max_steps=7)
    assert (cfg.optim.lr, cfg.run.num_workers, cfg.optim.max_steps) == (3e-4, 4, 7)
    # an optional key is cleared from the command line; a classifier without held-out data is
    # a valid run (it reports training accuracy)
    cfg = load_config(write_config(tmp_path, "classifier"), ["data.val_uri=null",
                                                             "run.init_from=null"])
    assert cfg.data.val_uri is None and cfg.run.init_from is None


def test_model_flags_take_model_and_diffusion_flags_only(tmp_path):
    """Training flags in model.flags are refused with the key to use instead, and the
    flags a run records (flags.json) are exactly the kind's model and diffusion flags."""
    from adm.train.config import FLAG_NAMES

    good = write_config(tmp_path)
    for flag, where in (("lr", "optim.lr"), ("batch_size", "optim.batch_size"),
                        ("ema_rate", "optim.ema_rate")):
        with pytest.raises(ConfigError, match=f"model.flags.{flag}: .*set {where} instead"):
            load_config(good, [f"model.flags.{flag}=1"])
    for kind in ("diffusion", "classifier", "upsampler"):
        flags = load_config(write_config(tmp_path, kind)).model_flags
        assert set(flags) == FLAG_NAMES[kind], kind
        assert not {"lr", "batch_size", "microbatch", "use_ddim"} & set(flags)
        assert ("diffusion_steps" in flags) and ("noise_schedule" in flags)
    assert "image_size" in FLAG_NAMES["classifier"] and "large_size" in FLAG_NAMES["upsampler"]
    imagenet = load_config(str(ROOT / "jobs/configs/imagenet/adm128.yaml")).model_flags
    assert set(imagenet) == FLAG_NAMES["diffusion"] and imagenet["num_channels"] == 256


def test_fp16_flag_and_precision_must_agree(tmp_path):
    """use_fp16 runs the torso in float16 on CUDA; without optim.precision fp16 there would be
    no loss scaling. One setting decides: the mismatch names both keys."""
    good = write_config(tmp_path)
    with pytest.raises(ConfigError, match=r"model.flags.use_fp16: True .*optim.precision is "
                                          r"'fp32'"):
        load_config(good, ["model.flags.use_fp16=true"])
    with pytest.raises(ConfigError, match=r"model.flags.use_fp16: True \(from the preset "
                                          r"128x128_diffusion\).*'bf16'"):
        load_config(str(ROOT / "jobs/configs/imagenet/adm128.yaml"), ["optim.precision=bf16"])
    with pytest.raises(ConfigError, match=r"model.flags.classifier_use_fp16"):
        load_config(write_config(tmp_path, "classifier"),
                    ["model.flags.classifier_use_fp16=true"])
    assert load_config(good, ["model.flags.use_fp16=true", "optim.precision=fp16"])
    assert load_config(good, ["optim.precision=fp16"])  # autocast of the whole model: fine


def test_data_root_trains_on_train_and_holds_out_val(digits, tmp_path):
    """--data ROOT is the dataset root: train split for training, val split held out when it
    exists; a root without a val split trains without held-out evaluation."""
    from adm.train.cli import parse_args, resolve_config

    config = str(QUICKSTART / "classifier.yaml")
    cfg = resolve_config("classifier", parse_args("classifier", ["--config", config,
                                                                 "--data", digits]))
    assert (cfg.data.uri, cfg.data.val_uri) == (digits, digits)
    train_only = f"{digits}/train"
    cfg = resolve_config("classifier", parse_args("classifier", ["--config", config,
                                                                 "--data", train_only]))
    assert (cfg.data.uri, cfg.data.val_uri) == (train_only, None)
    cfg = resolve_config("classifier", parse_args(
        "classifier", ["--config", config, "--data", train_only, "--val-data", digits]))
    assert cfg.data.val_uri == digits
    # the ImageNet placeholders are replaced too
    cfg = resolve_config("classifier", parse_args(
        "classifier", ["--config", str(ROOT / "jobs/configs/imagenet/classifier64.yaml"),
                       "--data", digits]))
    assert (cfg.data.uri, cfg.data.val_uri) == (digits, digits)


def test_imagenet_configs_build_from_presets():
    files = sorted((ROOT / "jobs" / "configs" / "imagenet").glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        cfg = load_config(str(f))
        assert cfg.model.preset, f"{f.name} must take its model flags from a preset"


def test_data_checks_before_workers_start(digits, tmp_path):
    from adm.train.trainer import check_data

    path = write_config(tmp_path, data={"uri": digits})
    check_data(load_config(path))  # 32 px digits fit the 32 px model
    with pytest.raises(ConfigError, match="image size 64.*only 32 px"):
        check_data(load_config(path, ["model.flags.image_size=64"]))
    with pytest.raises(ConfigError, match="10 classes but the model has num_classes=5"):
        check_data(load_config(path, ["model.flags.num_classes=5"]))
    with pytest.raises(ConfigError, match="data.uri: no prepared dataset"):
        check_data(load_config(path, [f"data.uri={tmp_path}/nothing"]))


# ---------------------------------------------------------------- 2-worker runs

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_worker_diffusion_lowers_loss_and_exports(digits, tmp_path):
    path = write_config(tmp_path, flags=TINY_DIFFUSION,
                        data={"uri": digits}, optim={"batch_size": 32, "max_steps": 60, "lr": 1e-3},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "d2",
                             "log_interval": 10, "save_interval": 30})
    cfg, result = fit(path, callbacks=[ReportLog(tmp_path / "reports")])
    assert result.error is None
    (reports,) = read_reports(tmp_path / "reports")
    assert [step for step, _, _ in reports] == list(range(10, 61, 10))
    assert all(len(m) == 2 and m[0]["step"] == m[1]["step"] for _, _, m in reports)
    assert [step for step, ckpt, _ in reports if ckpt] == [30, 60]
    # TensorBoard events hold the loss curve
    events = list((tmp_path / "runs" / "d2" / "tensorboard").iterdir())
    assert events and events[0].stat().st_size > 0
    losses = _scalars(events[0], "mse")
    print("mse per 10 steps", [round(v, 4) for v in losses])
    assert losses[-1] < 0.8 * losses[0], losses
    export = tmp_path / "runs" / "d2" / "export"
    assert {p.name for p in export.iterdir()} == {
        "model000060.pt", "ema_0.999_000060.pt", "model000060.safetensors",
        "ema_0.999_000060.safetensors", "flags.json", "classes.json"}
    assert json.loads((export / "classes.json").read_text()) == [str(i) for i in range(10)]
    flags = json.loads((export / "flags.json").read_text())
    assert set(flags) == FLAG_NAMES["diffusion"]  # model and diffusion flags, nothing else
    assert {k: flags[k] for k in TINY_DIFFUSION} == TINY_DIFFUSION
    for name in ("model000060.pt", "ema_0.999_000060.pt", "model000060.safetensors",
                 "ema_0.999_000060.safetensors"):
        openai.load_checkpoint(openai.create_model(flags), str(export / name))


def _scalars(event_file, tag):
    """Values of one scalar tag from a TensorBoard event file, in step order."""
    from tensorboardX.proto import event_pb2
    import struct

    data, out, i = Path(event_file).read_bytes(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
        i += 12 + length + 4
        for v in event.summary.value:
            if v.tag == tag:
                out.append((event.step, v.simple_value))
    return [v for _, v in sorted(out)]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_worker_classifier_beats_chance(digits, tmp_path):
    path = write_config(tmp_path, "classifier",
                        flags={"image_size": 16, "classifier_width": 32, "classifier_depth": 1,
                               "classifier_channel_mult": "1,2",
                               "classifier_attention_resolutions": "8",
                               "classifier_num_head_channels": 32, "classifier_pool": "attention",
                               "num_classes": 10, "diffusion_steps": 100,
                               "noise_schedule": "cosine"},
                        data={"uri": digits, "val_uri": digits},
                        optim={"batch_size": 32, "max_steps": 240, "lr": 2e-3,
                               "lr_anneal_steps": 240},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "c2",
                             "log_interval": 40, "save_interval": 240, "eval_interval": 240,
                             "eval_batches": 11})
    cfg, result = fit(path)
    metrics = result.metrics
    print("classifier metrics", {k: round(v, 4) for k, v in metrics.items()})
    # 10 classes: chance is 0.10 (top-5: 0.5). Held-out images are noised at uniform t, where
    # the largest t leave nothing to see, so the ceiling is well below 1. Measured 0.56 / 0.93;
    # the bounds sit ~5 standard errors (176 images) below that and far above chance.
    assert metrics["val_acc_top1"] > 0.35, metrics
    assert metrics["val_acc_top5"] > 0.8, metrics
    assert metrics["val_images"] == 176  # the whole held-out split (11 batches of 16)


def _parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def train_worker_pids():
    """This test session's Ray Train worker processes (Ray names them ray::RayTrainWorker...;
    a worker's parent is our Ray's raylet, whose parent is this process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ((entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
                        and _parent(_parent(int(entry.name))) == os.getpid()):
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # the process ended while we looked
    return pids


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_resumes_from_last_checkpoint(digits, tmp_path):
    """SIGKILL a worker in the middle of the run; the group restarts from the last committed
    checkpoint and finishes. The reports (one per step, from a test-only Train callback) show
    which steps each attempt trained: every attempt after a failure starts right after the
    latest committed checkpoint, and the final lineage holds every step exactly once."""
    log = tmp_path / "reports"
    path = write_config(tmp_path, flags=TINY_DIFFUSION, data={"uri": digits},
                        optim={"batch_size": 16, "max_steps": 25},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "k",
                             "log_interval": 1, "save_interval": 5, "max_failures": 2})
    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            done = read_reports(log)[-1] if log.exists() else []
            # late enough that Ray Train has committed a checkpoint even on a loaded machine
            if done and done[-1][0] >= 13 and any(ckpt for _, ckpt, _ in done):
                pids = train_worker_pids()
                if len(pids) == 2:
                    os.kill(max(pids), signal.SIGKILL)
                    killed.append(done[-1][0])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        cfg, result = fit(path, callbacks=[ReportLog(log)])
    finally:
        stop.set()
        thread.join(5)
    assert killed, "the worker was never killed"
    attempts = read_reports(log)
    assert len(attempts) >= 2, attempts
    lineage, committed = [], []
    for attempt in attempts:
        if lineage:  # a restart: from the latest checkpoint committed before it
            resumed_from = attempt[0][0] - 1
            assert resumed_from == committed[-1] and resumed_from % 5 == 0, (resumed_from,
                                                                                 committed)
            lineage = [s for s in lineage if s <= resumed_from]
        steps = [s for s, _, _ in attempt]
        assert steps == list(range(steps[0], steps[-1] + 1)), steps  # no step twice or skipped
        lineage += steps
        committed += [s for s, ckpt, _ in attempt if ckpt]
    assert 5 <= committed[0] and any(s >= killed[0] - 1 for s in lineage)
    assert lineage == list(range(1, 26))
    assert (tmp_path / "runs" / "k" / "export" / "model000025.pt").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_rerun_continues_step_count_and_init_from(digits, tmp_path):
    """A finished 2-step run, run again with --max-steps 4, trains steps 3-4 only; export/ then
    holds the step-2 and step-4 files. A released-format file given to --init-from trains on."""
    log = tmp_path / "reports"
    flags = dict(TINY_DIFFUSION)
    released = tmp_path / "released.pt"
    torch.manual_seed(1)
    torch.save(openai.create_model(flags).state_dict(), released)  # the released layout
    path = write_config(tmp_path, flags=flags, data={"uri": digits},
                        optim={"batch_size": 16, "max_steps": 2, "lr": 2e-4, "ema_warmup": True},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "r",
                             "log_interval": 1, "save_interval": 100,
                             "init_from": str(released)})
    fit(path, callbacks=[ReportLog(log)])
    fit(path, optim__max_steps=4, callbacks=[ReportLog(log)])
    (reports,) = read_reports(log)
    assert [s for s, _, _ in reports] == [1, 2, 3, 4]
    # The EMA warm-up's update count went on across the rerun: 1 (the start) + 4 updates.
    from adm.train.checkpoint import latest_checkpoint, load_state

    state, meta = load_state(latest_checkpoint(str(tmp_path / "runs" / "r")))
    assert meta["step"] == 4 and state["ema_counts"] == [5]
    export = tmp_path / "runs" / "r" / "export"
    assert {p.name for p in export.iterdir()} == {
        "model000002.pt", "ema_0.999_000002.pt", "model000004.pt", "ema_0.999_000004.pt",
        "model000002.safetensors", "ema_0.999_000002.safetensors", "model000004.safetensors",
        "ema_0.999_000004.safetensors", "flags.json", "classes.json"}
    # init_from: the step-2 model started from the released weights (one AdamW step of lr 2e-4
    # moves each weight by at most ~lr per step)
    start = torch.load(released, weights_only=True)
    after = torch.load(export / "model000002.pt", weights_only=True)
    diff = max((after[k] - start[k]).abs().max().item() for k in start)
    assert 0 < diff < 5 * 2e-4 * 2


def test_export_checkpoint_job_reports_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export_checkpoint.py"),
                           str(tmp_path / "none"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "holds no training checkpoint" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_nonfinite_steps_are_skipped_alike_then_stop_the_run(digits, tmp_path):
    """lr 1e30: the first step blows the weights up, every later loss is non-finite. Each such
    step is skipped on both workers (same decision from the all-reduced gradient norm); the
    fourth in a row stops the run with an error naming the step, and the checkpoints hold the
    last good (finite) weights."""
    path = write_config(tmp_path, flags=TINY_DIFFUSION, data={"uri": digits},
                        optim={"batch_size": 16, "max_steps": 20, "lr": 1e30,
                               "max_nonfinite_in_row": 3},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "nan",
                             "log_interval": 1, "save_interval": 1, "max_failures": 0})
    with pytest.raises(Exception) as err:
        fit(path, callbacks=[ReportLog(tmp_path / "reports")])
    msg = str(err.value)
    assert "step 5: non-finite loss or gradient in 4 steps in a row" in msg, msg[-2000:]
    (reports,) = read_reports(tmp_path / "reports")
    assert [s for s, _, _ in reports] == [1, 2, 3, 4]
    # both workers skipped the same steps
    assert [[w["skipped_nonfinite"] for w in m] for _, _, m in reports] == [
        [0, 0], [1, 1], [2, 2], [3, 3]]
    from adm.train.checkpoint import latest_checkpoint, load_state

    ckpt = latest_checkpoint(str(tmp_path / "runs" / "nan"))
    state, meta = load_state(ckpt)
    assert meta["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bf16_accumulation_clipping_and_loss_aware_sampler(digits, tmp_path):
    """bf16 autocast, 2 microbatches per worker, clipping, and the loss-second-moment sampler
    fed with the losses of both workers: after 3 steps of 2 x 8 images it holds 48 losses."""
    path = write_config(tmp_path, flags=TINY_DIFFUSION, data={"uri": digits},
                        optim={"batch_size": 16, "max_steps": 3, "precision": "bf16",
                               "microbatch": 4, "grad_clip": 1.0,
                               "schedule_sampler": "loss-second-moment"},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "mp",
                             "log_interval": 1, "save_interval": 3})
    cfg, result = fit(path)
    assert result.metrics["step"] == 3 and 0 < result.metrics["grad_norm"] < float("inf")
    from adm.train.checkpoint import latest_checkpoint, load_state

    state, _ = load_state(latest_checkpoint(str(tmp_path / "runs" / "mp")))
    assert int(state["objective"]["loss_counts"].sum()) == 48


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fp16_with_grad_scaler(digits, tmp_path):
    path = write_config(tmp_path, flags=TINY_DIFFUSION, data={"uri": digits},
                        optim={"batch_size": 8, "max_steps": 3, "precision": "fp16"},
                        run={"num_workers": 1, "storage": str(tmp_path / "runs"), "name": "fp16",
                             "log_interval": 1, "save_interval": 3})
    cfg, result = fit(path)
    from adm.train.checkpoint import latest_checkpoint, load_state

    state, meta = load_state(latest_checkpoint(str(tmp_path / "runs" / "fp16")))
    assert meta["step"] == 3 and state["scaler"]["scale"] > 0  # the scaler's state is kept



@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_from_s3_with_checkpoints_on_s3(ray_session, s3_server, tmp_path,
                                               monkeypatch):
    from adm import storage
    from adm.data.digits import prepare_digits

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.new_bucket()
    data = f"s3://{bucket}/digits"
    prepare_digits(data, image_size=16, s3=s3_server.options)
    path = write_config(tmp_path, flags=TINY_DIFFUSION, data={"uri": data},
                        optim={"batch_size": 8, "max_steps": 2},
                        run={"num_workers": 1, "storage": f"s3://{bucket}/runs", "name": "s3",
                             "log_interval": 1, "save_interval": 2})
    fit(path)
    run = f"s3://{bucket}/runs/s3"
    assert storage.exists(f"{run}/export/model000002.pt")
    assert any(n.startswith("checkpoint_") for n in storage.listdir(run))
    assert storage.listdir(f"{run}/tensorboard")
    flags = json.loads(storage.read_bytes(f"{run}/export/flags.json"))
    openai.load_checkpoint(openai.create_model(flags), f"{run}/export/ema_0.999_000002.pt")


def nan_loss_at_step_3(loop_config):
    """The real per-worker loop, with the loss of its 3rd step made NaN (fault injection)."""
    from adm.train import loop, objectives

    calls = {"n": 0}
    losses = objectives.DiffusionObjective.losses

    def poisoned(self, model, batch):
        loss, terms, t = losses(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return loss, terms, t

    objectives.DiffusionObjective.losses = poisoned
    loop.train_loop_per_worker(loop_config)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_nonfinite_step_does_not_feed_the_loss_aware_sampler(digits, tmp_path):
    """One NaN loss with the loss-second-moment sampler: the step is skipped on both workers,
    its losses stay out of the sampler's history (else its weights turn NaN once warmed up and
    every later draw fails), and the run goes on and finishes. 10 diffusion steps warm the
    sampler up after 100 losses: 7 steps of 16."""
    from adm.train.checkpoint import latest_checkpoint, load_state
    from adm.train.trainer import make_trainer

    flags = {**TINY_DIFFUSION, "diffusion_steps": 10}
    path = write_config(tmp_path, flags=flags, data={"uri": digits},
                        optim={"batch_size": 16, "max_steps": 16,
                               "schedule_sampler": "loss-second-moment"},
                        run={"num_workers": 2, "storage": str(tmp_path / "runs"), "name": "nan1",
                             "log_interval": 4, "save_interval": 16, "max_failures": 0})
    cfg = load_config(path)
    result = make_trainer(cfg, train_loop=nan_loss_at_step_3).fit()
    assert result.error is None, result.error
    assert result.metrics["step"] == 16 and result.metrics["skipped_nonfinite"] == 1
    state, _ = load_state(latest_checkpoint(str(tmp_path / "runs" / "nan1")))
    history = state["objective"]["loss_history"]
    assert torch.isfinite(history).all()
    assert int(state["objective"]["loss_counts"].sum()) == 100  # full: 15 good steps x 16 > 100


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_same_seed_same_run(digits, tmp_path):
    """Timesteps, noise and data order all come from run.seed: two runs with the same seed
    end with the same weights, another seed with other weights."""
    def run(name, seed):
        path = write_config(tmp_path, flags=TINY_DIFFUSION, data={"uri": digits},
                            optim={"batch_size": 8, "max_steps": 2},
                            run={"num_workers": 1, "storage": str(tmp_path / "runs"),
                                 "name": name, "log_interval": 2, "save_interval": 2,
                                 "seed": seed})
        fit(path)
        return torch.load(tmp_path / "runs" / name / "export" / "model000002.pt",
                          weights_only=True)

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_timestep_draws_come_from_seed_rank_and_step():
    """The sampler's own generator, reseeded per step from (seed, rank, step): the draws of a
    step do not depend on what was drawn before (so a resumed run draws what an uninterrupted
    one draws), and differ between workers and steps."""
    from adm.diffusion import create_named_schedule_sampler
    from adm.train.loop import step_seed

    class Chain:
        num_timesteps = 1000

    def draw(seed, rank, step, warm_up=0):
        sampler = create_named_schedule_sampler("uniform", Chain(), seed=123)
        for _ in range(warm_up):
            sampler.sample(4, "cpu")
        sampler.reseed(step_seed(seed, rank, step))
        return sampler.sample(16, "cpu")[0]

    np.random.seed(0)
    before = np.random.random()
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5, warm_up=3))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.equal(draw(0, 0, 5), draw(1, 0, 5))
    np.random.seed(0)
    assert np.random.random() == before  # numpy's global generator was not used


def test_resume_matches_emas_by_rate_and_refuses_other_rates(tmp_path):
    """A checkpoint's EMAs are restored by rate, whatever the order of optim.ema_rate; a
    config with other rates than the checkpoint is refused."""
    from adm.train.checkpoint import save_state
    from adm.train.loop import ResumeError, Worker, restore
    from torch.optim.swa_utils import AveragedModel

    cfg = load_config(write_config(tmp_path, flags=TINY_DIFFUSION))
    from adm.train.config import build_model
    from adm.train.objectives import make_objective

    def worker(rates):
        model = build_model(cfg)
        return Worker(cfg, 0, 1, torch.device("cpu"), model, model,
                      {r: AveragedModel(model, use_buffers=False) for r in rates},
                      torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu",
                                                                                  enabled=False),
                      make_objective(cfg, torch.device("cpu")))

    saved = worker([0.9, 0.99])
    for i, ema in enumerate(saved.emas.values()):
        for p in ema.module.parameters():
            p.data.fill_(i + 1.0)  # 0.9 -> ones, 0.99 -> twos
    saved.step = 7
    d = tmp_path / "ckpt"
    d.mkdir()
    save_state(str(d), saved.state(), saved.meta())
    ckpt = ray.train.Checkpoint.from_directory(str(d))

    resumed = worker([0.99, 0.9])
    restore(resumed, ckpt)
    assert resumed.step == 7
    assert all((p == 1).all() for p in resumed.emas[0.9].module.parameters())
    assert all((p == 2).all() for p in resumed.emas[0.99].module.parameters())
    with pytest.raises(ResumeError, match=r"optim.ema_rate: .*rates \[0.9, 0.99\].*\[0.999\]"):
        restore(worker([0.999]), ckpt)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_classifier_without_held_out_data_trains_and_says_so(digits, tmp_path, capsys):
    """No held-out split is not an error: the classifier trains, reports its training
    accuracy, and one line says that held-out evaluation is off."""
    path = write_config(tmp_path, "classifier",
                        flags={"image_size": 16, "classifier_width": 32, "classifier_depth": 1,
                               "classifier_channel_mult": "1,2",
                               "classifier_attention_resolutions": "8",
                               "classifier_num_head_channels": 32, "num_classes": 10,
                               "diffusion_steps": 100},
                        data={"uri": f"{digits}/train"},
                        optim={"batch_size": 8, "max_steps": 2},
                        run={"num_workers": 1, "storage": str(tmp_path / "runs"), "name": "nv",
                             "log_interval": 1, "save_interval": 2, "eval_interval": 1})
    cfg, result = fit(path, "data.val_uri=null")
    assert cfg.data.val_uri is None
    assert 0 <= result.metrics["acc_top1"] <= 1 and "val_acc_top1" not in result.metrics
    out = capsys.readouterr().out
    assert out.count("held-out evaluation is off") == 1
