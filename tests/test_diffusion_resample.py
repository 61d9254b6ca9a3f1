"""Timestep samplers: the loss-aware (second-moment) resampler through the reference's 60
updates (fixtures/resample.pt), the uniform sampler, and importance weights."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from adm.diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_gaussian_diffusion,
    create_named_schedule_sampler,
)
from helpers import assert_within, load_fixture

PROBS = (1e-15, 1e-9)


def test_loss_second_moment_resampler_matches_the_reference():
    fx = load_fixture("resample.pt")
    diffusion = types.SimpleNamespace(num_timesteps=fx["num_timesteps"])
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler)
    assert sampler.history_per_term == fx["history_per_term"]
    assert sampler.uniform_prob == fx["uniform_prob"]
    rows = [sampler.weights()]
    warm = [sampler._warmed_up()]
    for update in fx["updates"]:
        sampler.update_with_all_losses(update["ts"], update["losses"])
        rows.append(sampler.weights())
        warm.append(sampler._warmed_up())
    assert warm == fx["warmed_up"]
    assert warm.index(True) == fx["first_warm_update"]
    for i, (got, want) in enumerate(zip(rows, fx["weights"])):
        assert got.dtype == np.float64
        assert_within(torch.from_numpy(got / got.sum()), want / want.sum(), *PROBS, f"row {i}")
    # Warmed up, the probabilities are no longer uniform: the check above could fail.
    final = rows[-1] / rows[-1].sum()
    assert final.max() / final.min() > 1.5


def test_resampler_state_round_trips():
    fx = load_fixture("resample.pt")
    diffusion = types.SimpleNamespace(num_timesteps=fx["num_timesteps"])
    a, b = LossSecondMomentResampler(diffusion), LossSecondMomentResampler(diffusion)
    for update in fx["updates"]:
        a.update_with_all_losses(update["ts"], update["losses"])
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.weights(), b.weights())


def test_uniform_sampler_and_importance_weights():
    d = create_gaussian_diffusion(steps=20, noise_schedule="cosine")
    uniform = create_named_schedule_sampler("uniform", d)
    assert isinstance(uniform, UniformSampler) and np.array_equal(uniform.weights(), np.ones(20))
    t, w = uniform.sample(4096, "cpu", generator=np.random.default_rng(0))
    assert t.dtype == torch.int64 and w.dtype == torch.float32 and t.shape == w.shape == (4096,)
    assert int(t.min()) == 0 and int(t.max()) == 19 and torch.all(w == 1)
    # Loss-aware: weights are 1/(T p(t)), so E[w · loss_t] is the uniform average of the losses.
    fx = load_fixture("resample.pt")
    sampler = LossSecondMomentResampler(types.SimpleNamespace(num_timesteps=fx["num_timesteps"]))
    for update in fx["updates"]:
        sampler.update_with_all_losses(update["ts"], update["losses"])
    p = sampler.weights() / sampler.weights().sum()
    t, w = sampler.sample(200_000, "cpu", generator=np.random.default_rng(1))
    assert torch.allclose(w.double(), torch.from_numpy(1 / (len(p) * p[t.numpy()])), rtol=1e-6)
    counts = np.bincount(t.numpy(), minlength=len(p)) / len(t)
    assert np.abs(counts - p).max() < 0.01  # drawn from p
    losses = np.linspace(0.1, 3.0, len(p)) ** 2
    estimate = float((w.double().numpy() * losses[t.numpy()]).mean())
    assert abs(estimate / losses.mean() - 1) < 0.02  # unbiased importance weights


def test_unknown_sampler_is_an_error():
    with pytest.raises(ValueError, match="'importance'"):
        create_named_schedule_sampler("importance", create_gaussian_diffusion(steps=20))
