"""DPM-Solver++(2M) (`sampler="dpmpp_2m"`) against the exact solution of the probability-flow
ODE for Gaussian data, where the optimal ε is known in closed form; its time grids; guidance,
learned Σ, clipping and per-row seeds through `sample`.

The exact solution. For data N(μ, s²I), x_t = α·x_0 + σ·ε (α² = ᾱ_t, σ² = 1 − ᾱ_t) has the
marginal N(αμ, (α²s² + σ²)I), and the optimal noise prediction is linear in x_t:
ε*(x_t) = σ·(x_t − αμ)/(α²s² + σ²). The probability-flow ODE moves each coordinate
monotonically from one of these Gaussians to the next, so it keeps z = (x − αμ)/√(α²s² + σ²)
constant. Written in λ = log(α/σ) the ODE has no schedule left in it (for a VP chain
α² = sigmoid(2λ)), so its solution between two of the chain's steps depends on their ᾱ's alone,
not on how ᾱ is interpolated between the chain's discrete steps: whatever (monotone)
interpolation in t one picks, the ODE from x_T at the chain's last step (index T−1) to its first
(index 0) gives x at index 0 = α_0μ + √(α_0²s² + σ_0²)·z_T. The samplers' last step (index 0 to
ᾱ = 1, as in the reference's DDIM) returns the data prediction there, x_0*(x) = μ + α_0s²(x −
α_0μ)/(α_0²s² + σ_0²), which is part of both solvers alike; the exact answer they converge to is
that prediction of the exact x at index 0. Every respacing below keeps both ends of the chain,
so one exact answer holds for every step count.

Measured (float64, 256 values of x_T, max |error|, a chain uniform in λ ∈ [−5, 5] with 1281
steps, so the log-SNR grids land on its steps and halve exactly; on ADM's 1000-step chains the
grids stop halving past ~30 steps, because near t = 0 (λ ~ −log t) the chain itself is coarser
in λ than the grid and duplicate timesteps are dropped: there, linear schedule, 40/80/160 asked
steps give 39/76/144 calls and orders 1.92, 1.90, then 1.30 as the chain's last steps dominate):

    intervals      20        40        80        160
    DPM-Solver++  1.24e-2   3.37e-3   8.57e-4   2.15e-4    orders 1.88, 1.98, 1.99
    DDIM          1.04e-1   5.36e-2   2.72e-2   1.37e-2    orders 0.96, 0.98, 0.99

At 10 steps on the ADM chains (1000 steps, the same log-SNR grid for both, from λ = −5.1,
float32 through `sample`): linear DPM-Solver++ 2.5e-2 vs DDIM 2.4e-1; cosine 2.9e-2 vs 2.5e-1.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from adm.compat import openai
from adm.diffusion import (SAMPLERS, GaussianDiffusion, LossType, ModelMeanType, ModelVarType,
                           create_gaussian_diffusion, ddim, dpmpp_2m, index_seeds,
                           LOGSNR_MIN, logsnr_timesteps, sample, sampling_diffusion)
from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS

MU, S = 0.1, 0.25  # the data: N(MU, S²) per coordinate (within [-1, 1] up to 3.6 σ)


class GaussianDenoiser(nn.Module):
    """The exact ε of data N(MU, S²I) on a chain of original ᾱ's [T]: called with the original
    chain's timesteps t [N] (as a respaced diffusion calls its model), it looks up ᾱ_t.
    `learn_sigma` appends C channels of v (a learned-range variance) that the ODE must ignore.
    Unconditional (num_classes None): `sample` gives labels to a classifier only."""

    num_classes = None

    def __init__(self, alphas_cumprod: np.ndarray, learn_sigma: bool = False):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.from_numpy(np.asarray(alphas_cumprod)))
        self.learn_sigma = learn_sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S * S + 1 - a)
        return torch.cat([eps, torch.full_like(x, 0.7)], 1) if self.learn_sigma else eps


def exact_solution(diffusion: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's solution from x_T at `diffusion`'s index T−1 to index 0,
    followed by the exact data prediction there (see the module docstring)."""
    a_T, a_0 = diffusion.alphas_cumprod[-1], diffusion.alphas_cumprod[0]
    z = (x_T - math.sqrt(a_T) * MU) / math.sqrt(a_T * S * S + 1 - a_T)
    x = math.sqrt(a_0) * MU + math.sqrt(a_0 * S * S + 1 - a_0) * z
    return MU + math.sqrt(a_0) * S * S * (x - math.sqrt(a_0) * MU) / (a_0 * S * S + 1 - a_0)


def lambda_uniform_chain(intervals: int = 1280) -> GaussianDiffusion:
    """A chain whose steps are uniform in λ from 5 (index 0) to −5: log-SNR grids of
    intervals/2^k steps land on its steps exactly, so they are exactly uniform and halve."""
    lam = np.linspace(5.0, -5.0, intervals + 1)
    alphas_cumprod = 1 / (1 + np.exp(-2 * lam))
    betas = 1 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE)


def x_T(n: int = 256, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)


def orders(errors: list[float]) -> list[float]:
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_dpm_solver_converges_at_second_order_ddim_at_first():
    base = lambda_uniform_chain()
    model = GaussianDenoiser(base.alphas_cumprod)
    noise = x_T()
    errors = {"dpmpp_2m": [], "ddim": []}
    for intervals in (20, 40, 80, 160):
        d = sampling_diffusion(base, "dpmpp_2m", intervals + 1, "logsnr")
        assert d.num_timesteps == intervals + 1  # the grid lands on the chain's steps
        lam = 0.5 * np.log(d.alphas_cumprod / (1 - d.alphas_cumprod))
        np.testing.assert_allclose(np.diff(lam), -10 / intervals, rtol=1e-9)  # uniform in λ
        want = exact_solution(d, noise)
        for name, solver in (("dpmpp_2m", dpmpp_2m), ("ddim", ddim)):
            got = solver(d, model, noise.clone(), clip_denoised=False)
            assert got.dtype == torch.float64
            errors[name].append((got - want).abs().max().item())
    dpm, first = orders(errors["dpmpp_2m"]), orders(errors["ddim"])
    print("errors", errors, "orders dpmpp_2m", dpm, "ddim", first)
    assert all(1.8 < p < 2.2 for p in dpm), (errors, dpm)
    assert all(0.9 < p < 1.1 for p in first), (errors, first)
    assert errors["dpmpp_2m"][-1] < 3e-4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_at_ten_steps_dpm_solver_beats_ddim_on_adm_chains(schedule):
    """Through `sample` (float32), on the 1000-step chains the ADM models are trained on, both
    solvers on the same 10-step log-SNR grid."""
    base = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
    model = GaussianDenoiser(np.cumprod(1 - base.base_betas))
    noise = x_T(dtype=torch.float32)
    d = sampling_diffusion(base, "dpmpp_2m", 10, "logsnr")
    assert d.timestep_map[0] == 0 and d.num_timesteps == 10
    want = exact_solution(d, noise.double()).float().clamp(-1, 1)
    err = {}
    for sampler in ("dpmpp_2m", "ddim"):
        got = sample(model, base, noise.shape, sampler=sampler, steps=10, timesteps="logsnr",
                     noise=noise, clip_denoised=False)
        err[sampler] = (got - want).abs().max().item()
    print(schedule, err)
    assert err["dpmpp_2m"] < 0.05 and err["ddim"] > 4 * err["dpmpp_2m"], err


def test_logsnr_grid_and_step_options():
    base = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    ac = np.cumprod(1 - base.base_betas)
    kept = logsnr_timesteps(ac, 10)
    assert kept[0] == 0 and kept == sorted(set(kept))
    # Near-uniform in λ where the chain is fine enough; the chain's steep ends dedupe.
    assert len(kept) <= 10 and len(logsnr_timesteps(ac, 200)) < 200
    assert sampling_diffusion(base, "dpmpp_2m", 10).timestep_map == kept  # the default grid
    assert sampling_diffusion(base, "dpmpp_2m", 10, "uniform").timestep_map == \
        sampling_diffusion(base, "ddpm", 10).timestep_map == sorted(
            openai.create_diffusion({"noise_schedule": "cosine",
                                     "timestep_respacing": "10"}).timestep_map)
    assert sampling_diffusion(base, "ddim", 10).timestep_map == list(range(0, 1000, 100))
    assert sampling_diffusion(base, "dpmpp_2m", "ddim5").timestep_map == [0, 200, 400, 600, 800]
    assert sampling_diffusion(base, "dpmpp_2m", None) is base
    # Its noisy end is the noisiest step with λ ≥ −5.1: the clipped cosine tail (λ = −6.5,
    # −9.9) is skipped and all 10 calls are spent above it; −inf keeps the whole chain (9
    # calls). A linear chain ends at λ = −5.06, inside.
    lam = 0.5 * np.log(ac / (1 - ac))
    start = kept[-1]
    assert lam[start] >= LOGSNR_MIN > lam[start + 1] and start < 999, kept
    assert len(kept) == 10
    gaps = np.diff(lam[kept])  # near-uniform in λ (the chain's steps near t = 0 are ~0.4 apart)
    assert np.ptp(gaps) < 0.15 * abs(gaps.mean()), lam[kept]
    whole = logsnr_timesteps(ac, 10, lambda_min=-np.inf)
    assert whole[-1] == 999 and len(whole) == 9 and sum(lam[whole] < -3) == 4, whole
    # sample()'s lambda_min moves the start (the jobs, configs and the Serve API pass it on).
    assert sampling_diffusion(base, "dpmpp_2m", 10, lambda_min=-np.inf).timestep_map == whole
    later = sampling_diffusion(base, "dpmpp_2m", 10, "logsnr", lambda_min=-3.0).timestep_map
    assert lam[later[-1]] >= -3.0 > lam[later[-1] + 1] and later[-1] < start, later
    assert sampling_diffusion(base, "dpmpp_2m", 10, lambda_min=LOGSNR_MIN).timestep_map == kept
    for sampler, timesteps in (("ddim", None), ("dpmpp_2m", "uniform")):
        with pytest.raises(ValueError, match="lambda_min=-3.0 sets where a log-SNR grid starts"):
            sampling_diffusion(base, sampler, 10, timesteps, lambda_min=-3.0)
    with pytest.raises(ValueError, match="lambda_min=nan"):
        sampling_diffusion(base, "dpmpp_2m", 10, lambda_min=float("nan"))
    linear = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    assert sampling_diffusion(linear, "dpmpp_2m", 10).timestep_map[-1] == 999
    # lambda_max ends the grid early, at the cleanest step with λ <= it: the calls a grid to
    # step 0 spends at the clean end go to the middle (4 points from t = 960 to λ = 1.9 are,
    # to a few timesteps, the noisiest four of the 6-point grid to step 0: the same spacing).
    six = logsnr_timesteps(ac, 6, lambda_min=-2.8)
    four = logsnr_timesteps(ac, 4, lambda_min=-2.8, lambda_max=1.9)
    end = int(np.flatnonzero(lam <= 1.9).min())
    start = int(np.flatnonzero(lam >= -2.8).max())
    grid = np.linspace(lam[start], lam[end], 4)
    assert four == sorted(int(np.abs(lam - g).argmin()) for g in grid), four
    assert four[0] == end and four[-1] == start == 960 and lam[end] <= 1.9 < lam[end - 1]
    assert six[0] == 0 and np.abs(np.array(four) - six[2:]).max() <= 4, (six, four)
    assert sampling_diffusion(base, "unipc", 4, lambda_min=-2.8, lambda_max=1.9).timestep_map \
        == four
    noise = x_T(4, torch.float32)  # sample() spaces it so: the same as those timesteps given
    torch.testing.assert_close(
        sample(GaussianDenoiser(ac), base, noise.shape, sampler="unipc", steps=4, noise=noise,
               lambda_min=-2.8, lambda_max=1.9),
        sample(GaussianDenoiser(ac), base, noise.shape, sampler="unipc", steps=four, noise=noise),
        rtol=0, atol=0)
    with pytest.raises(ValueError, match="lambda_max=-3.0: the grid's clean end must be above"):
        logsnr_timesteps(ac, 4, lambda_min=-2.8, lambda_max=-3.0)
    with pytest.raises(ValueError, match="lambda_max=1.0 sets where a log-SNR grid ends"):
        sampling_diffusion(base, "ddim", 10, lambda_max=1.0)
    # Explicit timesteps of the original chain (any order, duplicates once).
    assert sampling_diffusion(base, "dpmpp_2m", [960, 0, 500, 0]).timestep_map == [0, 500, 960]
    with pytest.raises(ValueError, match="not within the chain's 0..999"):
        sampling_diffusion(base, "dpmpp_2m", [0, 1000])
    with pytest.raises(ValueError, match="timesteps='karras'"):
        sampling_diffusion(base, "dpmpp_2m", 10, "karras")
    with pytest.raises(ValueError, match="int number of steps"):
        sampling_diffusion(base, "dpmpp_2m", "ddim10", "logsnr")
    with pytest.raises(ValueError, match="eta=0.5"):
        sample(GaussianDenoiser(ac), base, (1, 1, 2, 2), sampler="dpmpp_2m", steps=5, eta=0.5)


def test_learned_sigma_clipping_and_start_x_models():
    """The solver uses the ε half of a learned-Σ output (the v half changes nothing), clamps
    each x_0 to [-1, 1] with clip_denoised, and solves an x_0-predicting model's chain alike."""
    base = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    ac = np.cumprod(1 - base.base_betas)
    learned = create_gaussian_diffusion(steps=1000, noise_schedule="linear", learn_sigma=True)
    noise = x_T(16, torch.float32)
    kw = dict(sampler="dpmpp_2m", steps=10, noise=noise)
    plain = sample(GaussianDenoiser(ac), base, noise.shape, **kw)
    torch.testing.assert_close(
        sample(GaussianDenoiser(ac, learn_sigma=True), learned, noise.shape, **kw), plain,
        rtol=0, atol=1e-6)

    class ScaledUp(GaussianDenoiser):  # x_0 predictions far outside [-1, 1] at high noise
        def forward(self, x, t):
            return 4 * super().forward(x, t)

    clipped = sample(ScaledUp(ac), base, noise.shape, clip_denoised=True, **kw)
    unclipped = sample(ScaledUp(ac), base, noise.shape, clip_denoised=False, **kw)
    assert (clipped - unclipped).abs().max() > 0.05

    class PredictsStart(GaussianDenoiser):  # the same denoiser, as x_0
        def forward(self, x, t):
            a = self.alphas_cumprod[t.long()].to(x.dtype).view(-1, 1, 1, 1)
            return (x - (1 - a).sqrt() * super().forward(x, t)) / a.sqrt()

    start_x = create_gaussian_diffusion(steps=1000, noise_schedule="linear", predict_xstart=True)
    torch.testing.assert_close(sample(PredictsStart(ac), start_x, noise.shape, **kw), plain,
                               rtol=0, atol=1e-5)


class SumClassifier(nn.Module):
    """Logits w_k·Σ_i x_i: class k's log-probability grows with the image's sum when w_k is the
    largest weight (here class 1: brighter images)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights

    def forward(self, x, t):
        return x.flatten(1).sum(1, keepdim=True) * self.weights[None]


def test_classifier_guidance_on_eps_as_the_reference_ddim():
    """On a 2-step grid DPM-Solver++ is guided DDIM (its first step is first order, its last
    the data prediction), so it guides ε as the reference's DDIM (ADM algorithm 2:
    ε' = ε − √(1−ᾱ_t)·g); from 3 steps on the second-order steps differ; and the guided 10-step
    solve moves each sample towards its class."""
    base = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = GaussianDenoiser(np.cumprod(1 - base.base_betas))
    classifier = SumClassifier(torch.tensor([-0.05, 0.05]))
    noise = x_T(8, torch.float32)
    y = torch.tensor([1, 0] * 4)
    kw = dict(noise=noise, y=y, classifier=classifier, classifier_scale=4.0)
    for spec in ("ddim2", "ddim3"):
        a = sample(model, base, noise.shape, sampler="dpmpp_2m", steps=spec, **kw)
        b = sample(model, base, noise.shape, sampler="ddim", steps=spec, **kw)
        if spec == "ddim2":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        else:
            assert (a - b).abs().max() > 1e-3
    plain = sample(model, base, noise.shape, sampler="dpmpp_2m", steps=10, noise=noise)
    guided = sample(model, base, noise.shape, sampler="dpmpp_2m", steps=10, **kw)
    shift = (guided - plain).mean(dim=(1, 2, 3))
    assert (shift[y == 1] > 0.01).all() and (shift[y == 0] < -0.01).all(), shift


def test_per_row_seeds_and_a_real_guided_network():
    """With `seeds` the solver is deterministic given x_T: a sample depends on its index alone,
    whatever the batch; a tiny ADM with a classifier runs through it end to end."""
    model = openai.create_model(TINY_UNET_FLAGS).eval()
    classifier = openai.create_classifier(TINY_CLASSIFIER_FLAGS).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero outputs (ADM zero-initialises its last layers)
        for p in list(model.parameters()) + list(classifier.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    d = openai.create_diffusion(TINY_UNET_FLAGS)
    labels = torch.arange(6) % 10
    kw = dict(sampler="dpmpp_2m", steps=4, classifier=classifier, classifier_scale=3.0)
    full = sample(model, d, (6, 3, 8, 8), seeds=index_seeds(3, range(6)), y=labels, **kw)
    part = sample(model, d, (3, 3, 8, 8), seeds=index_seeds(3, [5, 2, 0]),
                  y=labels[[5, 2, 0]], **kw)
    torch.testing.assert_close(part, full[[5, 2, 0]], rtol=0, atol=1e-5)
    assert (full[0] - full[1]).abs().max() > 0.1
    # A single row seeded with s gives exactly what a generator seeded with s gives.
    one = sample(model, d, (1, 3, 8, 8), seeds=[77], y=labels[:1], **kw)
    ref = sample(model, d, (1, 3, 8, 8), generator=torch.Generator().manual_seed(77),
                 y=labels[:1], **kw)
    assert torch.equal(one, ref) and one.abs().max() <= 1


def test_guided_data_prediction_is_thresholded():
    """With clip_denoised, the data prediction the solver extrapolates from is clamped after
    the guidance too (a guided x_0 carries σ²·s·g/α, huge at high noise; unclamped, the
    second-order step blows up: benchmarks/sampling.py's quality table); without it, not."""
    from adm.diffusion.samplers import _data_prediction
    from adm.guidance import classifier_cond_fn

    base = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    denoiser = GaussianDenoiser(np.cumprod(1 - base.base_betas))

    def model(x, t, y=None):  # (unconditional: the labels are the classifier's)
        return denoiser(x, t)

    cond = classifier_cond_fn(SumClassifier(torch.tensor([-0.05, 0.05])), 20.0)
    x = x_T(4, torch.float32)
    t = torch.full((4,), 900)
    kw = {"y": torch.tensor([1, 0, 1, 0])}
    clipped = _data_prediction(base, model, x, t, cond, kw, clip_denoised=True)
    free = _data_prediction(base, model, x, t, cond, kw, clip_denoised=False)
    assert free.abs().max() > 2 and clipped.abs().max() <= 1


# ------------------------------------------------------------------ DPM-Solver++(3M)


def test_3m_step_integrates_a_quadratic_data_prediction_exactly():
    """`_dpmpp_3m_coefs` against an independent quadrature of the exact step
    x_{i−1} = (σ_{i−1}/σ_i)·x_i + σ_{i−1}·∫ e^λ·x0(λ) dλ over [λ_i, λ_{i−1}] (64-point
    Gauss-Legendre), on an uneven chain: exact (1e-12) for x0 quadratic in λ, not for a cubic,
    whose local error falls as h⁴; the weights sum to 1; its first step is DDIM's (1, 0, 0),
    its second 2M's, and a, b are 2M's."""
    from adm.diffusion.samplers import _dpmpp_2m_coefs, _dpmpp_3m_coefs
    from adm.diffusion.spacing import log_snr

    rng = np.random.default_rng(0)

    def step_errors(lam: np.ndarray, poly: np.ndarray) -> np.ndarray:
        ac = 1 / (1 + np.exp(-2 * lam))  # ᾱ of log-SNR λ (VP)
        sigma = np.sqrt(1 - ac)
        coefs = _dpmpp_3m_coefs(ac)
        nodes, weights = np.polynomial.legendre.leggauss(64)
        x0 = np.polynomial.polynomial.polyval(lam, poly)
        out = []
        for i in range(1, len(lam) - 2):
            lo, hi = lam[i], lam[i - 1]
            u = lo + (hi - lo) * (nodes + 1) / 2
            integral = (hi - lo) / 2 * np.sum(weights * np.exp(u)
                                               * np.polynomial.polynomial.polyval(u, poly))
            x = 0.3  # any x_i: the step is affine in it with a = σ_{i−1}/σ_i
            want = sigma[i - 1] / sigma[i] * x + sigma[i - 1] * integral
            a, b, c, d, e = coefs[i]
            out.append(a * x + b * (c * x0[i] + d * x0[i + 1] + e * x0[i + 2]) - want)
        return np.abs(np.array(out))

    # Index 0 is the cleanest (λ largest): an uneven, decreasing grid from 4 down to −4.
    lam = np.sort(rng.uniform(-4, 4, 12))[::-1]
    assert step_errors(lam, np.array([0.2, -0.7, 0.3])).max() < 1e-12
    cubic = np.array([0.2, -0.7, 0.3, 0.05])
    assert step_errors(lam, cubic).max() > 1e-4
    # A cubic's local error is O(h⁴): steps scaled by 1/2 around λ = 0 err 16x less.
    assert 12 < step_errors(lam, cubic).max() / step_errors(lam / 2, cubic).max() < 20

    ac = np.cumprod(1 - create_gaussian_diffusion(steps=1000, noise_schedule="cosine").betas)
    kept = ac[logsnr_timesteps(ac, 12)]
    three, two = _dpmpp_3m_coefs(kept), _dpmpp_2m_coefs(kept)
    assert three[-1][2:] == (1.0, 0.0, 0.0) and three[-2][2:] == (*two[-2][2:], 0.0)
    for (a3, b3, *w3), (a2, b2, *_) in zip(three[1:], two[1:]):
        assert (a3, b3) == (a2, b2) and abs(sum(w3) - 1) < 1e-12
    assert all(w[4] != 0.0 for w in three[1:-2]) and np.all(np.diff(log_snr(kept)) < 0)


SIGMA_MIX, MUS_MIX = 0.15, (-0.5, 0.4)  # per coordinate: ½·N(−0.5, 0.15²) + ½·N(0.4, 0.15²)


def _mixture_x0(x: np.ndarray | torch.Tensor, lam):
    """The exact data prediction E[x_0 | x_t = x] of the two-Gaussian mixture at log-SNR λ."""
    lib = torch if isinstance(x, torch.Tensor) else np
    ac = 1 / (1 + lib.exp(-2 * lam))
    alpha, var = ac ** 0.5, ac * SIGMA_MIX ** 2 + 1 - ac
    means = [alpha * m for m in MUS_MIX]
    logits = [-(x - m) ** 2 / (2 * var) for m in means]
    w1 = 1 / (1 + lib.exp(logits[0] - logits[1]))  # P(second component | x)
    post = [mu + alpha * SIGMA_MIX ** 2 * (x - m) / var for mu, m in zip(MUS_MIX, means)]
    return (1 - w1) * post[0] + w1 * post[1]


class MixtureDenoiser(GaussianDenoiser):
    """The exact ε of the two-Gaussian mixture (from `_mixture_x0`), looked up by timestep."""

    def forward(self, x, t):
        a = self.alphas_cumprod[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        lam = 0.5 * torch.log(a / (1 - a))
        return (x - a.sqrt() * _mixture_x0(x, lam)) / (1 - a).sqrt()


def test_dpm_solver_3m_converges_at_third_order_2m_at_second():
    """On data whose x_0 predictor is not linear (a two-Gaussian mixture), against an
    independent solve of the ODE d(x/σ)/dλ = e^λ·x0(x, λ) by scipy's DOP853 (rtol 1e-12) from
    λ = −5 to 5, then the data prediction there: halving the step divides 3M's error by ~8 and
    2M's by ~4. (On Gaussian data 3M's error falls ~16x per halving: the O(h³) term of its
    global error is there the integral of a derivative, g·g''' with g the x0 slope, so it
    nearly cancels; the mixture has no such cancellation.)"""
    from scipy.integrate import solve_ivp

    base = lambda_uniform_chain()
    model = MixtureDenoiser(base.alphas_cumprod)
    noise = x_T(32)

    def rhs(lam, y):  # y = x/σ, x = σ·y
        sigma = (1 / (1 + np.exp(2 * lam))) ** 0.5
        return np.exp(lam) * _mixture_x0(sigma * y, lam)

    sigma = lambda lam: (1 / (1 + np.exp(2 * lam))) ** 0.5  # noqa: E731
    y = solve_ivp(rhs, (-5.0, 5.0), noise.numpy().ravel() / sigma(-5.0), method="DOP853",
                  rtol=1e-12, atol=1e-12).y[:, -1]
    want = torch.from_numpy(_mixture_x0(sigma(5.0) * y, 5.0).reshape(noise.shape))
    errors = {"dpmpp_3m": [], "dpmpp_2m": []}
    for intervals in (40, 80, 160, 320):  # (20 → 40: 3M's order 2.5, not yet asymptotic)
        d = sampling_diffusion(base, "dpmpp_3m", intervals + 1)
        assert d.num_timesteps == intervals + 1  # the default log-SNR grid, on the chain's steps
        for name in errors:
            got = SAMPLERS[name](d, model, noise.clone(), clip_denoised=False)
            errors[name].append((got - want).abs().max().item())
    third, second = orders(errors["dpmpp_3m"]), orders(errors["dpmpp_2m"])
    print("errors", errors, "orders dpmpp_3m", third, "dpmpp_2m", second)
    assert all(2.7 < p < 3.3 for p in third), (errors, third)
    # 2M: 1.78, 1.92, 1.97 (its 40 → 80 not yet asymptotic on this data)
    assert all(1.75 < p < 2.2 for p in second) and 1.9 < second[-1], (errors, second)
    assert errors["dpmpp_3m"][-1] < errors["dpmpp_2m"][-1] / 20


def guided_runs():
    """(base, model, noise, run): the exact Gaussian denoiser on ADM's linear 1000-step chain,
    8 float32 rows, classifier-guided (scale 4); run(sampler, steps) samples them."""
    base = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = GaussianDenoiser(np.cumprod(1 - base.base_betas))
    noise = x_T(8, torch.float32)
    kw = dict(noise=noise, y=torch.tensor([1, 0] * 4),
              classifier=SumClassifier(torch.tensor([-0.05, 0.05])), classifier_scale=4.0)

    def run(sampler: str, steps) -> torch.Tensor:
        return sample(model, base, noise.shape, sampler=sampler, steps=steps, **kw)

    return base, model, noise, run


def test_3m_guidance_and_starting_steps_through_sample():
    """Through `sample`, classifier-guided: on 2 steps 3M is DDIM, on 3 it is 2M (its first
    steps are theirs, its last the data prediction), from 4 on it differs; its options are
    2M's (eta refused, per-row seeds, names in every sampler Literal)."""
    from adm.diffusion import SamplerName, dpmpp_3m  # noqa: F401 (exported)
    from typing import get_args

    base, model, noise, run = guided_runs()
    torch.testing.assert_close(run("dpmpp_3m", "ddim2"), run("ddim", "ddim2"), rtol=0, atol=1e-5)
    torch.testing.assert_close(run("dpmpp_3m", "ddim3"), run("dpmpp_2m", "ddim3"), rtol=0,
                               atol=0)
    assert (run("dpmpp_3m", "ddim4") - run("dpmpp_2m", "ddim4")).abs().max() > 1e-4
    assert (run("dpmpp_3m", 10) - run("dpmpp_2m", 10)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="eta=0.5: dpmpp_3m is a deterministic ODE solver"):
        sample(model, base, noise.shape, sampler="dpmpp_3m", steps=5, eta=0.5)
    assert "dpmpp_3m" in get_args(SamplerName)
    assert sampling_diffusion(base, "dpmpp_3m", 10).timestep_map == logsnr_timesteps(
        np.cumprod(1 - base.base_betas), 10)


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc"])
def test_the_other_log_snr_solvers_are_a_choice_wherever_2m_is(name):
    """The job's --sampler, the sample config and a Serve request take dpmpp_3m and unipc as
    they take dpmpp_2m (a Serve request gets its log-SNR grid's default start, -5.1)."""
    from helpers import load_job

    from helpers import api_limits
    from adm.generate import load_sample_config
    from adm.serve.api import parse_generate

    assert load_job("sample").parse_args(["--sampler", name]).sampler == name
    assert load_sample_config(None, ["model=m.pt", f"sampler={name}"]).sampler == name
    lim = api_limits(samplers=("ddim", name))
    req = parse_generate(f'{{"class_id": 2, "sampler": "{name}", "steps": 7}}'.encode(), lim)
    assert req.sample_args() == {"classifier_scale": 0.0, "cfg_scale": 1.0,
                                 "sampler": name, "steps": 7, "lambda_min": LOGSNR_MIN,
                                 "lambda_max": None, "guidance_interval": None,
                                 "cache_interval": 1}
