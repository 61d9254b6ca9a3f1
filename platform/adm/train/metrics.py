"""Training metrics: accumulated on the device between log intervals (no host syncs per step),
reduced across workers when reported, written to TensorBoard by rank 0."""
from __future__ import annotations

import os
import tempfile

import torch

from .. import storage


class MetricAccumulator:
    """Per-term means and per-quartile-of-t means (the reference's `loss_q0` ... `loss_q3`)."""

    def __init__(self, device: torch.device, num_timesteps: int):
        self.device, self.num_timesteps = device, num_timesteps
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # name -> [5]: total, then quartiles 0..3
        self.counts = torch.zeros(5, device=self.device)
        self.step_sums = torch.zeros(3, device=self.device)  # grad norm, finite steps, lr
        self.steps = 0
        self.images = 0

    def add(self, terms: dict[str, torch.Tensor], t: torch.Tensor) -> None:
        """Per-example terms [B] at timesteps t [B]."""
        q = (4 * t // self.num_timesteps).clamp(0, 3)
        ones = torch.ones_like(t, dtype=torch.float32)
        self.counts[0] += len(t)
        self.counts[1:].index_add_(0, q, ones)
        for name, values in terms.items():
            s = self.sums.setdefault(name, torch.zeros(5, device=self.device))
            v = values.detach().float()
            s[0] += v.sum()
            s[1:].index_add_(0, q, v)
        self.images += len(t)

    def add_step(self, grad_norm: torch.Tensor | None, lr: float) -> None:
        if grad_norm is not None:
            self.step_sums[0] += grad_norm.detach().float()
            self.step_sums[1] += 1
        self.step_sums[2] += lr
        self.steps += 1

    def summary(self, all_reduce_mean) -> dict[str, float]:
        """Means over the interval and over every worker (all workers must call this)."""
        names = sorted(self.sums)
        flat = torch.cat([self.counts, self.step_sums] + [self.sums[n] for n in names])
        flat = all_reduce_mean(flat).tolist()
        counts, (gsum, gsteps, lrsum), rest = flat[:5], flat[5:8], flat[8:]
        out = {}
        for i, name in enumerate(names):
            s = rest[5 * i: 5 * i + 5]
            out[name] = s[0] / max(counts[0], 1e-12)
            for q in range(4):
                if counts[1 + q] > 0:
                    out[f"{name}_q{q}"] = s[1 + q] / counts[1 + q]
        if gsteps > 0:
            out["grad_norm"] = gsum / gsteps
        out["lr"] = lrsum / max(self.steps, 1)
        return out


class TensorBoardLog:
    """TensorBoard event files in `<storage>/<name>/tensorboard` (written locally and copied
    there after each write when the storage is s3://)."""

    def __init__(self, cfg):
        from tensorboardX import SummaryWriter

        self.remote = storage.join(cfg.run.storage, cfg.run.name, "tensorboard")
        if storage.is_s3(self.remote):
            self.local = tempfile.mkdtemp(prefix="adm-tb-")
        else:
            self.local = self.remote
            os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(self.local)

    def write(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if self.local != self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    storage.write_bytes(storage.join(self.remote, name), f.read())

    def close(self) -> None:
        self.writer.close()
