"""The per-worker training loop shared by the diffusion model, the classifier and the upsampler.

Only the loss differs between the three (`objectives.py`); optimizer, EMA, mixed precision,
gradient accumulation, non-finite-step skipping, checkpoints, metrics and the loss-aware
timestep sampler's gather are written once, here. Ray Train runs `train_loop_per_worker` on
every worker (DDP over NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ..compat import openai
from ..config import from_dict, to_dict
from .checkpoint import load_state, save_state
from .config import TrainConfig, build_model, validate
from .ema import EMA
from .metrics import MetricAccumulator, TensorBoardLog
from .objectives import make_objective


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate an equally-shaped tensor from every worker (rank order)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


def train_loop_per_worker(loop_config: dict) -> None:
    """Train `loop_config["config"]` (a `TrainConfig` as a dict) from its last checkpoint, if
    any, to `optim.max_steps`; `loop_config["env"]` holds the driver's AWS settings."""
    os.environ.update(loop_config.get("env", {}))
    cfg = validate(from_dict(TrainConfig, loop_config["config"]))
    o, r = cfg.optim, cfg.run
    rank, world = _world()
    device = ray.train.torch.get_device()
    torch.manual_seed(r.seed * 1000 + rank)  # each worker draws its own t and noise

    model = build_model(cfg).to(device)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and r.init_from:  # a fresh run fine-tunes; a resumed one has its own weights
        openai.load_checkpoint(model, r.init_from)
    objective = make_objective(cfg, device)
    ema = EMA(model, o.ema_rate)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=o.precision == "fp16")
    step = 0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, meta = load_state(d)
        model.load_state_dict(state["model"])
        for rate, avg in zip(o.ema_rate, state["ema"]):
            ema.load_state_dict(rate, avg)
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        objective.load_state_dict(state["objective"])
        step = int(meta["step"])
    last_saved = step

    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    params = [p for p in model.parameters() if p.requires_grad]
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.data.val_uri else None
    acc = MetricAccumulator(device, objective.num_timesteps)
    tb = TensorBoardLog(cfg) if rank == 0 else None
    micro = o.microbatch if o.microbatch > 0 else cfg.per_worker_batch
    nonfinite_in_row = skipped_total = 0
    wait_s = busy_s = 0.0
    interval_start = time.perf_counter()

    def save_and_report(metrics: dict) -> None:
        """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
        if rank != 0:
            ray.train.report(metrics)
            return
        state = {
            "model": model.state_dict(),
            "ema": [ema.state_dict(rate) for rate in o.ema_rate],
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "objective": objective.state_dict(),
        }
        meta = {"step": step, "kind": cfg.kind, "ema_rates": [str(x) for x in o.ema_rate],
                "flags": cfg.model_flags, "config": to_dict(cfg)}
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state, meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    epoch = 0
    while step < o.max_steps:
        # Each pass over the shard is one epoch; the pipeline reshuffles (seeded) every epoch.
        batches = shard.iter_torch_batches(batch_size=cfg.per_worker_batch, drop_last=True,
                                           device=device)
        epoch += 1
        got_any = False
        t_wait = time.perf_counter()
        for batch in batches:
            got_any = True
            t_start = time.perf_counter()
            wait_s += t_start - t_wait
            lr = o.lr * max(0.0, 1.0 - step / o.lr_anneal_steps) if o.lr_anneal_steps else o.lr
            for group in opt.param_groups:
                group["lr"] = lr

            opt.zero_grad(set_to_none=True)
            n = cfg.per_worker_batch
            all_t, all_losses = [], []
            for i in range(0, n, micro):
                chunk = {k: v[i:i + micro] for k, v in batch.items()}
                last = i + micro >= n
                sync = contextlib.nullcontext() if last or ddp is model else ddp.no_sync()
                with sync:
                    with _autocast(device, o.precision):
                        loss, terms, t = objective.losses(ddp, chunk)
                    scaler.scale(loss * (len(t) / n)).backward()
                acc.add(terms, t)
                all_t.append(t)
                all_losses.append(terms["loss"].detach())
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip or math.inf)
            # DDP has all-reduced the gradients, so every worker sees the same norm and takes
            # the same decision here: no extra collective, one host sync per step.
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                scaler.step(opt)
                ema.update(model)
                nonfinite_in_row = 0
            else:
                nonfinite_in_row += 1
                skipped_total += 1
            scaler.update()
            if objective.loss_aware:  # every worker's (t, loss) pairs, so samplers stay equal
                objective.update_sampler(_all_gather_cat(torch.cat(all_t)),
                                         _all_gather_cat(torch.cat(all_losses)))
            acc.add_step(grad_norm if finite else None, lr)
            step += 1
            if r.trace_file:  # one short O_APPEND write per step: atomic between workers
                with open(r.trace_file, "a") as f:
                    f.write(f"{rank} {os.getpid()} {step}\n")
            busy_s += time.perf_counter() - t_start
            if nonfinite_in_row > o.max_nonfinite_in_row:
                raise NonFiniteError(
                    f"step {step}: non-finite loss or gradient in {nonfinite_in_row} steps in a "
                    f"row (limit optim.max_nonfinite_in_row={o.max_nonfinite_in_row}); the last "
                    f"good checkpoint is at step {last_saved}")

            last = step == o.max_steps
            save_now = step % r.save_interval == 0 or last
            eval_now = val_shard is not None and r.eval_interval > 0 and (
                step % r.eval_interval == 0 or last)
            if step % r.log_interval == 0 or save_now or eval_now:
                elapsed = time.perf_counter() - interval_start
                metrics = acc.summary(_all_reduce_mean)
                metrics.update(step=step, epoch=epoch, skipped_nonfinite=skipped_total,
                               images_per_s=acc.images * world / max(elapsed, 1e-9),
                               data_wait_frac=wait_s / max(wait_s + busy_s, 1e-9))
                if eval_now:
                    metrics.update(objective.evaluate(model, val_shard, cfg, _all_reduce_mean))
                if rank == 0:
                    print(f"[{cfg.kind}] step {step}/{o.max_steps} " + " ".join(
                        f"{k}={v:.4g}" for k, v in metrics.items()
                        if k in ("loss", "mse", "vb", "acc_top1", "val_acc_top1", "images_per_s",
                                 "data_wait_frac", "lr", "grad_norm")), flush=True)
                    tb.write(metrics, step)
                if save_now:
                    save_and_report(metrics)
                    last_saved = step
                else:
                    ray.train.report(metrics)
                acc.reset()
                wait_s = busy_s = 0.0
                interval_start = time.perf_counter()
            if step >= o.max_steps:
                break
            t_wait = time.perf_counter()
        if not got_any:
            raise ValueError(f"data.uri {cfg.data.uri}: an epoch gave no full batch of "
                             f"{cfg.per_worker_batch} images per worker; the data set is smaller "
                             "than the global batch")
    if tb is not None:
        tb.close()
