"""Property tests: for random schedules (named and arbitrary betas, plain and respaced) and
random timesteps, the forward marginal q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0)
match an independent float64 computation: one-step transitions composed by recursion, and Bayes'
rule for the product of two Gaussians (no cumulative products, none of the module's formulas)."""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adm.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from adm.diffusion import create_gaussian_diffusion

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def marginals(betas):
    """x_t | x_0 ~ N(m_t x_0, v_t) by composing x_t = √(1−β_t) x_{t−1} + √β_t ε_t one step at a
    time: lists m, v with m[t], v[t] after steps 0..t."""
    m, v, mean, var = [], [], 1.0, 0.0
    for beta in betas:
        mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
        m.append(mean)
        v.append(var)
    return m, v


@st.composite
def diffusions(draw):
    kind = draw(st.sampled_from(["linear", "cosine", "random", "respaced"]))
    steps = draw(st.integers(20, 400))
    if kind == "random":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        betas = rng.uniform(1e-4, draw(st.sampled_from([0.02, 0.2, 0.6])), size=steps)
        return GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType.EPSILON,
                                 model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
    if kind == "respaced":
        count = draw(st.integers(1, steps))
        return create_gaussian_diffusion(steps=steps, noise_schedule=draw(st.sampled_from(
            ["linear", "cosine"])), timestep_respacing=str(count))
    return create_gaussian_diffusion(steps=steps, noise_schedule=kind)


@SETTINGS
@given(d=diffusions(), data=st.data())
def test_q_sample_marginal_and_posterior_match_float64_closed_forms(d, data):
    n = 4
    t = torch.tensor(data.draw(st.lists(st.integers(0, d.num_timesteps - 1), min_size=n, max_size=n)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x0 = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    m, v = marginals(d.betas)  # the respaced chain's betas: its marginals are the base chain's
    alpha = 1 - d.betas

    # q(x_t | x_0)
    mt = torch.tensor([m[i] for i in t], dtype=torch.float64).view(-1, 1, 1, 1)
    vt = torch.tensor([v[i] for i in t], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = d.q_sample(x0, t, noise=eps)
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(x_t, mt * x0 + vt.sqrt() * eps, rtol=1e-10, atol=1e-12)
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, mt * x0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, vt.expand_as(x0), rtol=1e-10, atol=1e-12)
    # ... and in float32, to float32 precision.
    x_t32 = d.q_sample(x0.float(), t, noise=eps.float())
    assert x_t32.dtype == torch.float32
    torch.testing.assert_close(x_t32.double(), x_t, rtol=0, atol=1e-5)

    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; m_{t-1} x_0, v_{t-1})
    want_mean, want_var = [], []
    for k, i in enumerate(t.tolist()):
        if i == 0:  # x_{-1} = x_0: the posterior is a point mass
            want_mean.append(x0[k])
            want_var.append(0.0)
            continue
        precision = 1 / v[i - 1] + alpha[i] / d.betas[i]
        want_mean.append((m[i - 1] * x0[k] / v[i - 1] + math.sqrt(alpha[i]) * x_t[k] / d.betas[i])
                         / precision)
        want_var.append(1 / precision)
    got_mean, got_var, got_log_var = d.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(got_mean, torch.stack(want_mean), rtol=1e-9, atol=1e-10)
    want_var = torch.tensor(want_var, dtype=torch.float64).view(-1, 1, 1, 1).expand_as(x0)
    torch.testing.assert_close(got_var, want_var, rtol=1e-9, atol=1e-14)
    if d.num_timesteps > 1:  # log-variance: clipped to step 1's at step 0
        var1 = 1 / (1 / v[0] + alpha[1] / d.betas[1])
        want_log = torch.where(t.view(-1, 1, 1, 1) == 0, math.log(var1),
                               want_var.clamp_min(1e-300).log())
        torch.testing.assert_close(got_log_var, want_log.expand_as(x0), rtol=1e-9, atol=1e-9)
