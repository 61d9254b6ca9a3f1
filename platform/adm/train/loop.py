"""The per-worker training loop shared by the diffusion model, the classifier and the upsampler.

Only the loss differs between the three (`objectives.py`); optimizer, EMA, mixed precision,
gradient accumulation, non-finite-step skipping, checkpoints, metrics and the loss-aware
timestep sampler's gather are written once, here. Ray Train runs `train_loop_per_worker` on
every worker (DDP over NCCL on GPUs, gloo on CPUs).

Randomness: every draw of step s on worker r (timesteps, noise, dropout) comes from
(run.seed, r, s), so a run resumed from a checkpoint at step s draws what an uninterrupted run
draws after s, and two runs with the same seed draw the same.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from .. import storage
from ..checkpoints import load_checkpoint
from ..config import to_dict
from ..precision import AUTOCAST
from .checkpoint import load_state, save_state
from .ema import ema_multi_avg_fn
from .config import TrainConfig, build_model
from .metrics import MetricAccumulator, TensorBoardLog
from .objectives import make_objective
from .progress import StepReporter


log = logging.getLogger("adm.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class ResumeError(RuntimeError):
    """A checkpoint that the run's config cannot continue from."""


def _autocast(device: torch.device, precision: str):
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate an equally-shaped tensor from every worker (rank order)."""
    if not _distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of every random draw of `step` on worker `rank`."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Worker:
    """Everything one worker trains with; `step` counts optimizer steps taken (or skipped)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model wrapped for DDP (the model itself with one worker)
    emas: dict[float, AveragedModel]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    objective: object
    step: int = 0

    def state(self) -> dict:
        """The training state a checkpoint keeps (tensors and plain values only)."""
        return {"model": self.model.state_dict(),
                "ema": [_ema_params(self.emas[rate]) for rate in self.emas],
                # updates each EMA has had (+1): the warm-up's n, so a resume continues it
                "ema_counts": [int(self.emas[rate].n_averaged) for rate in self.emas],
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "objective": self.objective.state_dict()}

    def meta(self) -> dict:
        cfg = self.cfg
        return {"step": self.step, "kind": cfg.kind, "ema_rates": [str(r) for r in self.emas],
                "flags": cfg.model_flags, "config": to_dict(cfg)}


def _ema_params(ema: AveragedModel) -> dict[str, torch.Tensor]:
    """An EMA's averaged weights keyed like the model's state dict, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}


def worker_device() -> torch.device:
    """The device Ray Train gave this worker; CPU when it is a GPU this torch cannot use (a
    GPU that Ray declares but a CPU build of torch cannot reach: the simulated cluster)."""
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def build_worker(cfg: TrainConfig) -> Worker:
    """The model, EMAs, optimizer, scaler and objective of this worker, at step 0."""
    ctx = ray.train.get_context()
    device = worker_device()
    torch.manual_seed(cfg.run.seed)  # the initial weights (DDP then broadcasts rank 0's)
    model = build_model(cfg).to(device)
    emas = {float(rate): AveragedModel(
        model, multi_avg_fn=ema_multi_avg_fn(rate, cfg.optim.ema_warmup), use_buffers=False)
        for rate in cfg.optim.ema_rate}
    for ema in emas.values():  # average from the initial weights on, as the reference does
        ema.n_averaged.fill_(1)  # (AveragedModel would copy the weights at its first update)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.optim.precision == "fp16")
    return Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, model, model, emas,
                  opt, scaler, make_objective(cfg, device))


def restore(w: Worker, checkpoint: ray.train.Checkpoint | None) -> None:
    """Continue from a Ray checkpoint, or start a fresh run (from `run.init_from` if set).
    EMAs are matched by rate; a checkpoint with other rates than the config is refused."""
    if checkpoint is None:
        if w.cfg.run.init_from:
            load_checkpoint(w.model, w.cfg.run.init_from)
            for ema in w.emas.values():
                ema.module.load_state_dict(w.model.state_dict())
        return
    with checkpoint.as_directory() as d:
        state, meta = load_state(d)
    saved = [float(r) for r in meta["ema_rates"]]
    if sorted(saved) != sorted(w.emas):
        raise ResumeError(f"optim.ema_rate: the run's checkpoint at step {meta['step']} keeps "
                          f"EMAs at rates {saved}, the config asks for {list(w.emas)}; resume "
                          "with the same rates or start a new run (run.name)")
    w.model.load_state_dict(state["model"])
    # (A checkpoint from before the counts were kept: one EMA update per step.)
    counts = state.get("ema_counts", [int(meta["step"]) + 1] * len(saved))
    for rate, params, count in zip(saved, state["ema"], counts):
        w.emas[rate].module.load_state_dict(params)
        w.emas[rate].n_averaged.fill_(int(count))
    w.opt.load_state_dict(state["optimizer"])
    w.scaler.load_state_dict(state["scaler"])
    w.objective.load_state_dict(state["objective"])
    w.step = int(meta["step"])


def train_step(w: Worker, batch: dict[str, torch.Tensor], acc: MetricAccumulator) -> bool:
    """One optimizer step on this worker's `batch` (gradients accumulated over microbatches,
    all-reduced by DDP). Returns whether it was taken: a step whose all-reduced gradient norm
    is not finite is skipped on every worker alike, and feeds neither the EMA nor the
    timestep sampler."""
    o = w.cfg.optim
    lr = o.lr * max(0.0, 1.0 - w.step / o.lr_anneal_steps) if o.lr_anneal_steps else o.lr
    for group in w.opt.param_groups:
        group["lr"] = lr
    seed = step_seed(w.cfg.run.seed, w.rank, w.step)
    torch.manual_seed(seed)
    w.objective.reseed(seed)

    w.opt.zero_grad(set_to_none=True)
    n = len(batch["image"])
    micro = o.microbatch if o.microbatch > 0 else n
    terms_t = []
    for i in range(0, n, micro):
        chunk = {k: v[i:i + micro] for k, v in batch.items()}
        last = i + micro >= n
        sync = contextlib.nullcontext() if last or w.ddp is w.model else w.ddp.no_sync()
        with sync:
            with _autocast(w.device, o.precision):
                loss, terms, t = w.objective.losses(w.ddp, chunk)
            w.scaler.scale(loss * (len(t) / n)).backward()
        terms_t.append((terms, t))
    w.scaler.unscale_(w.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(w.model.parameters(), o.grad_clip or math.inf)
    # The gradients are all-reduced, so every worker sees the same norm and takes the same
    # decision here: no extra collective, one host sync per step.
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        w.scaler.step(w.opt)
        for ema in w.emas.values():
            ema.update_parameters(w.model)
        for terms, t in terms_t:
            acc.add(terms, t)
        if w.objective.loss_aware:  # every worker's (t, loss), so the samplers stay equal
            w.objective.update_sampler(_all_gather_cat(torch.cat([t for _, t in terms_t])),
                                       _all_gather_cat(torch.cat([x["loss"] for x, _ in terms_t])))
    w.scaler.update()
    acc.add_step(grad_norm if finite else None, lr)
    w.step += 1
    return finite


def save_and_report(w: Worker, metrics: dict, save: bool) -> None:
    """Report the interval's metrics; every worker reports (it is a barrier), and rank 0
    attaches the checkpoint when `save`."""
    if not save or w.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_state(d, w.state(), w.meta())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _step_reporter(w: Worker, counter_name: str | None) -> StepReporter | None:
    """Rank 0 feeds the driver's progress bar (`adm.train.progress`), when the driver has one."""
    return StepReporter(counter_name, w.step) if w.rank == 0 and counter_name else None


def _quiet_train_reports(level: str) -> None:
    """Ray Train (2.60) logs every report, a dump of all its metrics, at INFO through a logger
    named after its source file (.../ray/train/v2/_internal/execution/context.py), outside the
    `ray.train` loggers that its LoggingConfig filters: give that logger the run's level too.
    Found by name among the process's loggers, so no private Ray module is imported."""
    suffix = os.path.join("train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(level)


LOGGED = ("loss", "mse", "vb", "acc_top1", "val_acc_top1", "grad_norm", "lr", "images_per_s",
          "data_wait_frac")


def train_loop_per_worker(loop_config: dict) -> None:
    """Train `loop_config["config"]` (a `TrainConfig`, checked on the driver) from its last
    checkpoint, if any, to `optim.max_steps`, one `train_step` per batch. The interval's metrics
    are logged and reported every `run.log_interval` steps and whenever the run checkpoints
    (every `run.save_interval` steps and at the last) or evaluates on held-out data (every
    `run.eval_interval` steps and at the last, when `data.val_uri` is set). `loop_config["s3"]`
    holds the driver's non-secret S3 settings (endpoint, region); credentials come from the
    worker's own environment or role."""
    storage.use_s3_settings(**loop_config.get("s3", {}))
    _quiet_train_reports(loop_config.get("log_level", "WARNING"))
    cfg: TrainConfig = loop_config["config"]
    o, r = cfg.optim, cfg.run
    w = build_worker(cfg)
    restore(w, ray.train.get_checkpoint())
    w.ddp = ray.train.torch.prepare_model(w.model, move_to_device=False)

    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.data.val_uri else None
    acc = MetricAccumulator(w.device, w.objective.num_timesteps)
    tb = TensorBoardLog(cfg) if w.rank == 0 else None
    bar = _step_reporter(w, loop_config.get("progress"))
    s = LoopState(last_saved=w.step)
    for batch in _batches(w, shard, s):
        _counted_train_step(w, batch, acc, s)
        if bar is not None:
            bar.update(w.step)
        _check_nonfinite(w, s)

        done = w.step >= o.max_steps
        save = w.step % r.save_interval == 0 or done
        evaluate = val_shard is not None and r.eval_interval > 0 and (
            w.step % r.eval_interval == 0 or done)
        if w.step % r.log_interval == 0 or save or evaluate:
            metrics = _interval_metrics(w, acc, s)
            if evaluate:
                metrics.update(w.objective.evaluate(w.model, val_shard, cfg, _all_reduce_mean))
            _log(w, metrics, tb)
            save_and_report(w, metrics, save)
            if save:
                s.last_saved = w.step
            acc.reset()
            s.start_interval()
    if bar is not None:
        bar.close(w.step)
    if tb is not None:
        tb.close()


@dataclass
class LoopState:
    """The loop's bookkeeping beside the worker's training state: the epoch (passes over the
    shard), the steps skipped as non-finite in a row and in all, the step of the last
    checkpoint, and the current log interval's seconds spent waiting for data (`wait_s`) and in
    `train_step` (`busy_s`) since it began (`interval_start`, a `time.perf_counter()` reading)."""

    last_saved: int
    epoch: int = 0
    nonfinite_in_row: int = 0
    skipped: int = 0
    wait_s: float = 0.0
    busy_s: float = 0.0
    interval_start: float = field(default_factory=time.perf_counter)

    def start_interval(self) -> None:
        self.wait_s = self.busy_s = 0.0
        self.interval_start = time.perf_counter()


def _batches(w: Worker, shard: ray.data.DataIterator,
             s: LoopState) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches on its device until it has taken `optim.max_steps` steps: pass
    after pass over its shard, each pass one epoch (counted in `s.epoch`), reshuffled (seeded)
    by the pipeline. The time spent waiting for each batch is added to `s.wait_s`; the time
    between batches (the step, logging, saving) is not."""
    cfg = w.cfg
    while w.step < cfg.optim.max_steps:
        s.epoch += 1
        got_batch = False
        t_wait = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=cfg.per_worker_batch, drop_last=True,
                                              device=w.device):
            got_batch = True
            s.wait_s += time.perf_counter() - t_wait
            yield batch
            if w.step >= cfg.optim.max_steps:
                return
            t_wait = time.perf_counter()
        if not got_batch:
            raise ValueError(f"data.uri {cfg.data.uri}: an epoch gave no full batch of "
                             f"{cfg.per_worker_batch} images per worker; the data set is smaller "
                             "than the global batch")


def _counted_train_step(w: Worker, batch: dict[str, torch.Tensor], acc: MetricAccumulator,
                        s: LoopState) -> None:
    """`train_step`, with its time added to `s.busy_s` and a skipped step counted in `s`."""
    t_start = time.perf_counter()
    if train_step(w, batch, acc):
        s.nonfinite_in_row = 0
    else:
        s.nonfinite_in_row += 1
        s.skipped += 1
    s.busy_s += time.perf_counter() - t_start


def _check_nonfinite(w: Worker, s: LoopState) -> None:
    """Stop the run when more than `optim.max_nonfinite_in_row` steps in a row were skipped."""
    limit = w.cfg.optim.max_nonfinite_in_row
    if s.nonfinite_in_row > limit:
        raise NonFiniteError(
            f"step {w.step}: non-finite loss or gradient in {s.nonfinite_in_row} steps in a row "
            f"(limit optim.max_nonfinite_in_row={limit}); the last good checkpoint is at step "
            f"{s.last_saved}")


def _interval_metrics(w: Worker, acc: MetricAccumulator, s: LoopState) -> dict[str, float]:
    """The log interval's metrics, averaged over its steps and over every worker (so every
    worker must call this): the loss terms (and their quartiles of t), gradient norm and
    learning rate, then the step, epoch, steps skipped so far, images per second of all
    workers together, and the fraction of the interval spent waiting for data."""
    elapsed = time.perf_counter() - s.interval_start
    metrics = acc.summary(_all_reduce_mean)
    metrics.update(step=w.step, epoch=s.epoch, skipped_nonfinite=s.skipped,
                   images_per_s=acc.images * w.world / max(elapsed, 1e-9),
                   data_wait_frac=s.wait_s / max(s.wait_s + s.busy_s, 1e-9))
    return metrics


def _log(w: Worker, metrics: dict[str, float], tb: TensorBoardLog | None) -> None:
    """On rank 0: one log line of the `LOGGED` metrics, and every metric to TensorBoard."""
    if w.rank != 0:
        return
    # A log record, not a print: Train's print patch shows prints twice.
    log.info(f"[{w.cfg.kind}] step {w.step}/{w.cfg.optim.max_steps} " + " ".join(
        f"{k}={metrics[k]:.4g}" for k in LOGGED if k in metrics))
    tb.write(metrics, w.step)
