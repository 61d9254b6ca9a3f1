"""UniPC (`sampler="unipc"`, Zhao et al. 2023: bh2, data prediction, orders 1-3): its
coefficients against an independent quadrature, its order of convergence against an
independent ODE solve, its first steps, guidance and options through `sample` (its
availability wherever `dpmpp_2m` is: test_dpm_solver). The exact problems (Gaussian denoiser,
two-Gaussian mixture, a chain uniform in λ) are test_dpm_solver's."""
from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from adm.diffusion import (SAMPLERS, SamplerName,
                           logsnr_timesteps, sample, sampling_diffusion, unipc)
from adm.diffusion.samplers import _dpmpp_2m_coefs, _unipc_coefs
from test_dpm_solver import (MixtureDenoiser, _mixture_x0, guided_runs, lambda_uniform_chain,
                             orders, x_T)


def lagrange_quadrature(lam: np.ndarray, start: int, nodes: list[int]) -> np.ndarray:
    """The weights w_j of the exact step from index `start` to start − 1,
    x_t = (σ_t/σ_s)·x_s + α_t·∫₀ʰ e^{u−h}·P(u) du with P the polynomial through the data
    predictions at `nodes` (indices; u = λ − λ_s), as multiples of α_t(1 − e^{−h}) (UniPC's b):
    Gauss-Legendre (64 points) of each Lagrange basis polynomial, written out here."""
    h = lam[start - 1] - lam[start]
    u_nodes = np.array([lam[j] - lam[start] for j in nodes])
    x, w = np.polynomial.legendre.leggauss(64)
    u = h * (x + 1) / 2
    out = []
    for j, uj in enumerate(u_nodes):
        basis = np.ones_like(u)
        for k, uk in enumerate(u_nodes):
            if k != j:
                basis *= (u - uk) / (uj - uk)
        out.append(h / 2 * np.sum(w * np.exp(u - h) * basis))
    return np.array(out) / (1 - np.exp(-h))


def test_the_solved_updates_are_the_interpolatory_quadrature_and_the_others_the_papers():
    """On an uneven chain: UniP-3 (its ρ solved) weighs x0 at i, i+1, i+2 as the exact
    integral of their quadratic does, UniC-2 and UniC-3 (solved) weigh x0 at i−1, i, ... as
    the integral of the polynomial through them does (1e-10); UniP-2 and UniC-1 are the paper's
    ρ = 1/2 updates; a, b are DPM-Solver++'s; the first step is DDIM's and is not corrected."""
    rng = np.random.default_rng(0)
    lam = np.sort(rng.uniform(-4, 4, 12))[::-1]  # index 0 the cleanest
    ac = 1 / (1 + np.exp(-2 * lam))
    two = _dpmpp_2m_coefs(ac)
    T = len(lam)
    for order in (1, 2, 3):
        predictors, correctors = _unipc_coefs(ac, order)
        assert correctors[T - 1] is None and predictors[T - 1][2:] == (1.0,) + (0.0,) * order
        for i in range(1, T):
            p = min(order, T - i)
            a, b, *w = predictors[i]
            assert (a, b) == pytest.approx(two[i][:2], rel=1e-12)
            assert len(w) == order + 1 and sum(w) == pytest.approx(1.0, abs=1e-12)
            r1 = (lam[i + 1] - lam[i]) / (lam[i - 1] - lam[i]) if p > 1 else None
            if p == 3:
                np.testing.assert_allclose(w[:3], lagrange_quadrature(lam, i, [i, i + 1, i + 2]),
                                           rtol=0, atol=1e-10)
            elif p == 2:  # the paper's ρ = 1/2: m_0 + (m_1 − m_0)/(2 r_1)
                np.testing.assert_allclose(w[:2], [1 - 0.5 / r1, 0.5 / r1], rtol=1e-12)
            # The corrector of x_{i−1}, on [x0_{i−1}, x0_i, x0_{i+1}, ...].
            a, b, *w = correctors[i - 1]
            assert (a, b) == pytest.approx(two[i][:2], rel=1e-12)
            if p == 1:
                np.testing.assert_allclose(w[:2], [0.5, 0.5], rtol=1e-12)
            else:
                want = lagrange_quadrature(lam, i, [i - 1] + [i + k for k in range(p)])
                np.testing.assert_allclose(w[:p + 1], want, rtol=0, atol=1e-10)
            assert not any(w[p + 1:])


def _mixture_exact(noise: torch.Tensor) -> torch.Tensor:
    """The mixture ODE solved from λ = −5 to 5 by scipy's DOP853 (rtol 1e-12), then the data
    prediction there (test_dpm_solver's independent solution)."""
    from scipy.integrate import solve_ivp

    sigma = lambda lam: (1 / (1 + np.exp(2 * lam))) ** 0.5  # noqa: E731

    def rhs(lam, y):  # y = x/σ
        return np.exp(lam) * _mixture_x0(sigma(lam) * y, lam)

    y = solve_ivp(rhs, (-5.0, 5.0), noise.numpy().ravel() / sigma(-5.0), method="DOP853",
                  rtol=1e-12, atol=1e-12).y[:, -1]
    return torch.from_numpy(_mixture_x0(sigma(5.0) * y, 5.0).reshape(noise.shape))


def test_unipc_converges_at_order_p_plus_one():
    """On the two-Gaussian mixture (its x0 predictor not linear), against the independent ODE
    solve: halving the step divides UniPC-p's error by about 2^(p+1) (the corrector adds an
    order to the predictor's, for no extra model call), so UniPC-2 is third order, as
    DPM-Solver++(3M), and beats 2M by over 10x at 320 steps."""
    base = lambda_uniform_chain()
    model = MixtureDenoiser(base.alphas_cumprod)
    noise = x_T(32)
    want = _mixture_exact(noise)
    errors = {1: [], 2: [], 3: [], "dpmpp_2m": []}
    for intervals in (40, 80, 160, 320):
        d = sampling_diffusion(base, "unipc", intervals + 1)
        assert d.num_timesteps == intervals + 1
        for key in errors:
            if key == "dpmpp_2m":
                got = SAMPLERS["dpmpp_2m"](d, model, noise.clone(), clip_denoised=False)
            else:
                got = unipc(d, model, noise.clone(), clip_denoised=False, order=key)
            errors[key].append((got - want).abs().max().item())
    measured = {k: orders(v) for k, v in errors.items()}
    print("errors", errors, "orders", measured)
    # Measured: UniPC-1 1.71, 1.87, 1.94; UniPC-2 2.73, 2.92, 2.97; UniPC-3 4.62, 3.36, 3.61
    # (its lower-order warm-up steps leave a term of order 3 that still shows at 320 steps).
    for p in (1, 2):
        assert p + 1 - 0.15 < measured[p][-1] < p + 1 + 0.3, (p, errors[p], measured[p])
    assert 3.3 < measured[3][-1] < 4.6 and errors[3][-1] < errors[2][-1] / 20, errors[3]
    assert errors[2][-1] < errors["dpmpp_2m"][-1] / 10


def test_unipc_through_sample_first_steps_guidance_and_options():
    """Through `sample`, classifier-guided: on 2 steps UniPC is DDIM (a first-order step, then
    the data prediction: a correction of the last point changes nothing returned), from 3 on
    it differs from DDIM and from 2M; eta refused; its log-SNR grid is DPM-Solver++'s; it is in
    every sampler Literal; per-row seeds give a row the same bits alone or in a batch."""
    base, model, noise, run = guided_runs()
    torch.testing.assert_close(run("unipc", "ddim2"), run("ddim", "ddim2"), rtol=0, atol=1e-5)
    assert (run("unipc", "ddim3") - run("dpmpp_2m", "ddim3")).abs().max() > 1e-4
    assert (run("unipc", 10) - run("dpmpp_2m", 10)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="eta=0.5: unipc is a deterministic ODE solver"):
        sample(model, base, noise.shape, sampler="unipc", steps=5, eta=0.5)
    with pytest.raises(ValueError, match="UniPC order 4"):
        _unipc_coefs(np.cumprod(1 - base.base_betas)[::100], 4)
    assert "unipc" in get_args(SamplerName)
    assert sampling_diffusion(base, "unipc", 10).timestep_map == logsnr_timesteps(
        np.cumprod(1 - base.base_betas), 10)
    seeds = [11, 12, 13]
    batch = sample(model, base, (3, 1, 4, 4), sampler="unipc", steps=7, seeds=seeds)
    alone = sample(model, base, (1, 1, 4, 4), sampler="unipc", steps=7, seeds=seeds[1:2])
    assert torch.equal(batch[1:2], alone)
