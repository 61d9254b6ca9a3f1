"""Timestep samplers for training: which t each example of a batch is trained at.

Sampling t from p(t) and weighting its loss by 1/(T·p(t)) keeps the objective's expectation
(importance sampling). `UniformSampler` is p = 1/T. `LossSecondMomentResampler` (Nichol &
Dhariwal 2021, section 3.3) makes p(t) ∝ √E[L_t²] over the last 10 losses seen at each step,
mixed with 0.001 of uniform, which lowers the variance of the L_vlb objective a lot; until every
step has 10 losses it samples uniformly.

Distributed training must keep every worker's sampler identical: gather (t, loss) pairs from all
workers and call `update_with_all_losses` with the same lists everywhere (the gather belongs to
the training loop).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

SAMPLERS = ("uniform", "loss-second-moment")


class ScheduleSampler(ABC):
    """A distribution over a diffusion's timestep indices 0..T−1.

    Draws come from the sampler's own generator once `reseed` has been called (training seeds
    it per step from the run's seed), else from numpy's global one, as the reference does."""

    rng: np.random.Generator | None = None

    def reseed(self, seed) -> None:
        """Draw from now on from a new generator seeded with `seed` (an int or a sequence of
        ints, as `numpy.random.default_rng` takes)."""
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, float64 [T]: p(t) = w / w.sum()."""

    def sample(self, batch_size: int, device, generator: np.random.Generator | None = None):
        """Importance-sample a batch of timesteps.

        :param generator: a numpy Generator to draw from; when None, the sampler's own
            generator (see `reseed`), else the global numpy RNG (as the reference).
        :return: (timesteps [batch_size] int64, weights [batch_size] float32 = 1/(T·p(t))),
            both on `device`; multiply the per-example losses by the weights.
        """
        w = self.weights()
        p = w / np.sum(w)
        rng = generator or self.rng or np.random
        indices = rng.choice(len(p), size=(batch_size,), p=p)
        weights = 1.0 / (len(p) * p[indices])
        return (torch.from_numpy(np.asarray(indices)).long().to(device),
                torch.from_numpy(weights).float().to(device))


class UniformSampler(ScheduleSampler):
    """p(t) = 1/T."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler updated with the losses observed at each timestep."""

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Record losses[i] observed at timestep ts[i]; deterministic, so that workers given the
        same (gathered) lists stay identical."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) ∝ √(mean of the last `history_per_term` squared losses at t), mixed with
    `uniform_prob` of the uniform distribution; uniform until every t has a full history."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:  # drop the oldest
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        """The history, to checkpoint with the training run."""
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self._loss_history = np.array(state["loss_history"], dtype=np.float64)
        self._loss_counts = np.array(state["loss_counts"], dtype=np.int64)


def create_named_schedule_sampler(name: str, diffusion, seed=None) -> ScheduleSampler:
    """``"uniform"`` or ``"loss-second-moment"`` for `diffusion` (anything with
    `num_timesteps`), drawing from its own generator seeded with `seed` when given; ValueError
    naming an unknown name."""
    if name == "uniform":
        sampler = UniformSampler(diffusion)
    elif name == "loss-second-moment":
        sampler = LossSecondMomentResampler(diffusion)
    else:
        raise ValueError(f"unknown schedule sampler {name!r}: expected one of {SAMPLERS}")
    if seed is not None:
        sampler.reseed(seed)
    return sampler
