"""The samplers: plain functions with one signature (k-diffusion's style),
``sampler(diffusion, model, x_T, *, cond_fn, model_kwargs, clip_denoised, eta, generator,
noise_fn, progress) -> x_0``. Each runs over every step of the diffusion it is given (one model
call per step; `sample` picks those steps by respacing the original chain) on the diffusion's
device-cached coefficients.

- "ddpm": ancestral sampling (the reference's `p_sample_loop`);
- "ddim": DDIM (the reference's `ddim_sample_loop`), η = `eta`;
- "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022, algorithm 2): the probability-flow ODE solved
  in log-SNR with the multistep second-order data-prediction update, deterministic (η = 0);
- "dpmpp_3m": DPM-Solver++(3M), its third-order multistep sibling (the data prediction
  interpolated through the last three, integrated exactly in λ), deterministic (η = 0).
- "unipc": UniPC (Zhao et al. 2023), the bh2 variant on the data prediction, order 2: the
  multistep predictor UniP, and after each model call the corrector UniC, which reuses that
  call's output to correct the point it was made at (no extra calls), deterministic (η = 0).

`cond_fn` is classifier guidance (`adm.guidance.classifier_cond_fn`), applied at every step, or
only at the steps whose noise level is in its interval (`adm.diffusion.interval.limited`: the
others make the unguided update); classifier-free guidance wraps `model` instead
(`adm.diffusion.cfg`). `noise_fn` draws each step's noise (per-row
streams: `adm.diffusion.seeds.RowNoise`), else `generator` does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .gaussian import GaussianDiffusion, NoiseFn, step_indices
from .interval import guidance_at
from .spacing import log_snr

# model(x [N, C, H, W], t [N], **model_kwargs) -> its output; cond_fn(x, t, **model_kwargs) ->
# the guidance gradient, x's shape (`adm.guidance.classifier_cond_fn`).
Model = Callable[..., torch.Tensor]
CondFn = Callable[..., torch.Tensor]


def check_eta(sampler: str, eta: float) -> None:
    """Only DDIM has an η: the other samplers refuse one rather than silently ignore it."""
    if eta == 0.0 or sampler == "ddim":
        return
    if sampler == "ddpm":
        raise ValueError(f"eta={eta} is a DDIM parameter; the ddpm sampler takes none")
    raise ValueError(f"eta={eta}: {sampler} is a deterministic ODE solver (eta must be 0)")


def ddpm(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, *,
         cond_fn: CondFn | None = None, model_kwargs: dict | None = None,
         clip_denoised: bool = True, eta: float = 0.0, generator: torch.Generator | None = None,
         noise_fn: NoiseFn | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al.) over every step of `diffusion` from x = x_T [N, C, H, W];
    classifier guidance shifts each mean by Σ·g. `eta` must be 0 (a DDIM parameter). Each
    step's noise comes from `noise_fn` (e.g. a `RowNoise`; not called for the last step, which
    adds none) when given, else from `generator`, else from the global generator."""
    check_eta("ddpm", eta)
    return diffusion.p_sample_loop(model, tuple(x.shape), noise=x, clip_denoised=clip_denoised,
                                   cond_fn=cond_fn, model_kwargs=model_kwargs, device=x.device,
                                   progress=progress, generator=generator, noise_fn=noise_fn)


def ddim(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, *,
         cond_fn: CondFn | None = None, model_kwargs: dict | None = None,
         clip_denoised: bool = True, eta: float = 0.0, generator: torch.Generator | None = None,
         noise_fn: NoiseFn | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al.) with η = eta over every step of `diffusion` from x = x_T; classifier
    guidance corrects each ε by −√(1−ᾱ_t)·g. The noise (η > 0 only) as `ddpm`'s."""
    return diffusion.ddim_sample_loop(model, tuple(x.shape), noise=x, clip_denoised=clip_denoised,
                                      cond_fn=cond_fn, model_kwargs=model_kwargs, device=x.device,
                                      progress=progress, eta=eta, generator=generator,
                                      noise_fn=noise_fn)


def dpmpp_2m(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, *,
             cond_fn: CondFn | None = None, model_kwargs: dict | None = None,
             clip_denoised: bool = True, eta: float = 0.0,
             generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) over every step of `diffusion` from x = x_T
    [N, C, H, W]: one model call per step, deterministic (`generator`, `noise_fn` unused).

    It integrates the probability-flow ODE in λ = log(α/σ) from index T−1 down to index 0 with
    the multistep second-order update on the data prediction x_0 (see `_dpmpp_2m_coefs`; its
    first step is first order, i.e. DDIM's), on the chain's own ᾱ's, so the model sees only the
    chain's discrete timesteps; the last step, from index 0 to ᾱ = 1 (σ = 0), returns index 0's
    data prediction, as DDIM's last step does. x_0 comes from `_data_prediction` (ε half of a
    learned Σ, clip_denoised, classifier guidance on ε as the reference's DDIM). `eta` must be
    0: this is the ODE solver (the SDE variant is not implemented)."""
    check_eta("dpmpp_2m", eta)
    return _multistep(diffusion, model, x, _dpmpp_2m_coefs(diffusion.alphas_cumprod), cond_fn,
                      model_kwargs, clip_denoised, progress)


def dpmpp_3m(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, *,
             cond_fn: CondFn | None = None, model_kwargs: dict | None = None,
             clip_denoised: bool = True, eta: float = 0.0,
             generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M) over every step of `diffusion` from x = x_T [N, C, H, W]: `dpmpp_2m`
    with the third-order multistep update (`_dpmpp_3m_coefs`: the last three data predictions'
    quadratic in λ, integrated exactly), so one model call per step buys a global error O(h³)
    instead of O(h²). Its first step is DDIM's, its second 2M's; the data prediction, guidance,
    clipping, last step and `eta` (0 only) are `dpmpp_2m`'s. Classifier-guided (scale 2, the
    quickstart models) it is the worse sampler: no step count from 20 down matches DDIM-25's FID,
    where 2M does at 8 (benchmarks/sampling.py's quality table, docs/benchmarks.md)."""
    check_eta("dpmpp_3m", eta)
    return _multistep(diffusion, model, x, _dpmpp_3m_coefs(diffusion.alphas_cumprod), cond_fn,
                      model_kwargs, clip_denoised, progress)


UNIPC_ORDER = 2  # `SAMPLERS["unipc"]`'s predictor order (the UniPC paper's for guided sampling)


def unipc(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, *,
          cond_fn: CondFn | None = None, model_kwargs: dict | None = None,
          clip_denoised: bool = True, eta: float = 0.0, generator: torch.Generator | None = None,
          noise_fn: NoiseFn | None = None, progress: bool = False,
          order: int = UNIPC_ORDER) -> torch.Tensor:
    """UniPC (Zhao et al. 2023: bh2, data prediction) over every step of `diffusion` from
    x = x_T [N, C, H, W], one model call per step, deterministic (η = 0; `generator`,
    `noise_fn` unused). `order` (1-3; `SAMPLERS["unipc"]` is 2, the paper's choice for guided
    sampling) is the predictor's: each step from index i to i − 1 is UniP-p on the last p data
    predictions (fewer at the start), and after the model call at i − 1 UniC-p corrects x_{i−1}
    with that call's own data prediction (`_unipc_coefs`), so the next step starts from the
    corrected point with the prediction the call already made: order p + 1 for one call per
    step. The data prediction, guidance, clipping, step grid (log-SNR, as DPM-Solver++'s) and
    last step (index 0 returns its data prediction) are `dpmpp_2m`'s."""
    check_eta("unipc", eta)
    predictors, correctors = _unipc_coefs(diffusion.alphas_cumprod, order)
    return _multistep(diffusion, model, x, predictors, cond_fn, model_kwargs, clip_denoised,
                      progress, correctors)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim,
                                                     "dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m,
                                                     "unipc": unipc}


# DPM-Solver++: the data prediction, the multistep loop and its per-step coefficients.

def _data_prediction(diffusion: GaussianDiffusion, model, x, t, cond_fn, model_kwargs,
                     clip_denoised: bool) -> torch.Tensor:
    """The model's x_0 at x = x_t, indices t [N]: from the ε half of a learned-Σ output, clamped
    to [-1, 1] when clip_denoised, then classifier-guided on the score exactly as the reference
    guides DDIM (condition_score: ε' = ε − √(1−ᾱ_t)·g, x_0 recomputed from ε'), and clamped
    again when clip_denoised. x's shape.

    The second clamp is where this differs from DDIM, on purpose: the guided x_0 carries
    σ_t²·s·g/α_t, which is huge at high noise, and the second-order step extrapolates from two
    x_0's, so unbounded guided data predictions blow up (on the quickstart models, scale 2,
    10 steps: judge-feature FID 12.6 without it; benchmarks/sampling.py's quality table).
    DDIM's first-order update uses x_0 and ε' together and stays exact without it."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised, None, model_kwargs)
    if cond_fn is None:
        return out["pred_xstart"]
    x0 = diffusion.condition_score(cond_fn, out, x, t, model_kwargs)["pred_xstart"]
    return x0.clamp(-1, 1) if clip_denoised else x0


def _multistep(diffusion: GaussianDiffusion, model, x: torch.Tensor, coefs: list[tuple],
               cond_fn, model_kwargs, clip_denoised: bool, progress: bool,
               correctors: list[tuple | None] | None = None) -> torch.Tensor:
    """The loop of the multistep data-prediction solvers over every step of `diffusion` from
    x = x_T [N, C, H, W]: at index i, one model call gives x0_i (`_data_prediction`), and with
    coefs[i] = (a, b, w_0, w_1, ...) the step to index i − 1 is
    x ← a·x + b·(w_0·x0_i + w_1·x0_{i+1} + ...), the older predictions being the previous
    steps' (kept, newest first, as many as there are weights less one). Index 0 returns x0_0,
    as DDIM's last step does (to ᾱ = 1, σ = 0).

    With `correctors` (UniPC), correctors[i] = (a, b, w_0, w_1, ...) corrects x_i once x0_i is
    known, before the step from i: x_i ← a·x_{i+1} + b·(w_0·x0_i + w_1·x0_{i+1} + ...), from
    the (corrected) point the step to i started at; x0_i stays the prediction made at the
    uncorrected x_i."""
    diffusion._preload(x.device, x.dtype)
    n, history, previous = x.shape[0], [], None
    for i in step_indices(list(range(diffusion.num_timesteps))[::-1], progress):
        t = torch.full((n,), i, device=x.device, dtype=torch.int64)
        with torch.no_grad():
            x0 = _data_prediction(diffusion, model, x, t,
                                  guidance_at(cond_fn, diffusion.alphas_cumprod[i]),
                                  model_kwargs, clip_denoised)
        if i == 0:
            return x0
        if correctors is not None and correctors[i] is not None:
            a, b, *weights = correctors[i]
            x = multistep_update(previous, x0, history, a, b, weights)
        a, b, *weights = coefs[i]
        previous = x
        x, history = multistep_update(x, x0, history, a, b, weights), [x0, *history][:len(weights) - 1]
    raise AssertionError("unreachable: index 0 returns")


def multistep_update(x: torch.Tensor, x0: torch.Tensor, history: list[torch.Tensor], a, b,
                     weights) -> torch.Tensor:
    """The multistep solvers' step: a·x + b·(w_0·x0 + w_1·history[0] + ...), with x = x_i and
    x0 its data prediction [N, C, H, W], history the older data predictions (newest first).

    a, b and the weights are floats (one step for every row: `_multistep`) or [N, 1, 1, 1]
    tensors (each row its own step: `adm.diffusion.rows`). Floats skip zero terms, and a
    first-order step (all older weights 0) uses x0 unscaled; tensors cannot skip, but their
    0·older adds a zero and their 1·x0 is x0, so each row gets the same bits either way (the
    history rows a row does not have yet must be zeros, not garbage that could be inf)."""
    if isinstance(a, torch.Tensor):
        data = weights[0] * x0
        for w, older in zip(weights[1:], history):
            data = data + w * older
        return a * x + b * data
    data = x0
    if any(w != 0.0 for w in weights[1:]):
        data = weights[0] * x0
        for w, older in zip(weights[1:], history):
            if w != 0.0:
                data = data + w * older
    return a * x + b * data


def _dpmpp_2m_coefs(alphas_cumprod: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Per index i ≥ 1 of a (respaced) chain, DPM-Solver++(2M)'s step from index i to i − 1 as
    x_{i−1} = a·x_i + b·(c·x0_i + d·x0_{i+1}), float64 (so the loop needs no device data):

    a = σ_{i−1}/σ_i, b = −α_{i−1}·expm1(−h_i), h_i = λ_{i−1} − λ_i; the multistep data
    prediction D = (1 + 1/(2r))·x0_i − 1/(2r)·x0_{i+1} with r = h_{i+1}/h_i (the previous step's
    h over this one's). Index T−1 (the first step) has no previous data prediction: first order
    (c, d) = (1, 0), which is DDIM's step. (Entry 0 is unused: the last step is x0_0 itself.)"""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    alpha, sigma, lam = np.sqrt(ac), np.sqrt(1.0 - ac), log_snr(ac)
    coefs = [(0.0, 0.0, 1.0, 0.0)]
    for i in range(1, len(ac)):
        h = lam[i - 1] - lam[i]
        a, b = sigma[i - 1] / sigma[i], -alpha[i - 1] * np.expm1(-h)
        if i == len(ac) - 1:
            c, d = 1.0, 0.0
        else:
            r = (lam[i] - lam[i + 1]) / h
            c, d = 1.0 + 0.5 / r, -0.5 / r
        coefs.append((float(a), float(b), float(c), float(d)))
    return coefs


def _dpmpp_3m_coefs(alphas_cumprod: np.ndarray) -> list[tuple[float, ...]]:
    """Per index i ≥ 1 of a (respaced) chain, DPM-Solver++(3M)'s step from index i to i − 1 as
    x_{i−1} = a·x_i + b·(c·x0_i + d·x0_{i+1} + e·x0_{i+2}), float64; a and b as in
    `_dpmpp_2m_coefs`.

    The exact solution of the data-prediction ODE over h = λ_{i−1} − λ_i is
    x_{i−1} = a·x_i + α_{i−1}·∫₀ʰ e^{u−h}·x0(λ_i + u) du. Here x0 is the quadratic through the
    last three data predictions (at λ_i, λ_{i+1}, λ_{i+2}; Newton's divided differences give
    its first and second derivative at λ_i) and the integral is taken exactly:
    ∫₀ʰ e^{u−h}·uᵏ/k! du is φ = 1 − e^{−h}, ψ₁ = h − φ and ψ₂ = h²/2 − ψ₁ for k = 0, 1, 2. So
    the step is exact for a quadratic x0(λ) (local error O(h⁴), global O(h³); the first-order
    first step adds an O(h²) term, small since x0 hardly moves in λ at the grid's noisy end);
    c + d + e = 1.
    The first two steps have fewer predictions behind them and are `_dpmpp_2m_coefs`' steps
    (e = 0): DDIM's first order, then 2M's second order, as the paper starts its multistep
    solvers."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = log_snr(ac)
    coefs = [(a, b, c, d, 0.0) for a, b, c, d in _dpmpp_2m_coefs(ac)]
    for i in range(1, len(ac) - 2):
        h, h1, h2 = lam[i - 1] - lam[i], lam[i] - lam[i + 1], lam[i + 1] - lam[i + 2]
        phi = -np.expm1(-h)
        psi1 = h - phi
        psi2 = 0.5 * h * h - psi1
        # Weights on (x0_i, x0_{i+1}, x0_{i+2}) of the divided differences and derivatives.
        slope0 = np.array([1.0, -1.0, 0.0]) / h1  # x0[λ_i, λ_{i+1}]
        slope1 = np.array([0.0, 1.0, -1.0]) / h2  # x0[λ_{i+1}, λ_{i+2}]
        half_second = (slope0 - slope1) / (h1 + h2)  # x0[λ_i, λ_{i+1}, λ_{i+2}] = x0''/2
        first = slope0 + h1 * half_second  # the quadratic's x0' at λ_i
        weights = (phi * np.array([1.0, 0.0, 0.0]) + psi1 * first + 2.0 * psi2 * half_second) / phi
        a, b = coefs[i][:2]
        coefs[i] = (a, b, *(float(w) for w in weights))
    return coefs


def _unipc_weights(ac: np.ndarray, lam: np.ndarray, s0: int, p: int, corrector: bool) -> tuple:
    """One UniPC bh2 update (data prediction) from index s0 to index t = s0 − 1 of a chain with
    cumulative ᾱ's `ac` and log-SNRs `lam`, on the data predictions at s0, s0 + 1, ...,
    s0 + p − 1 (m_0, m_1, ...; the older ones noisier), and for the corrector also the one at t
    (m_t): (a, b, *weights) of x_t = a·x_{s0} + b·Σ weights·m, the weights on [m_0, m_1, ...]
    (predictor) or [m_t, m_0, m_1, ...] (corrector).

    With h = λ_t − λ_{s0} and r_k = (λ_{s0+k} − λ_{s0})/h (negative: older points are
    noisier), UniP-p is x_t = (σ_t/σ_{s0})·x_{s0} + α_t(1 − e^{−h})·(m_0 + Σ_{k<p} ρ_k·D_k),
    D_k = (m_k − m_0)/r_k, and UniC-p adds the new prediction at r = 1, + ρ_p·(m_t − m_0).
    The ρ solve the order conditions Σ_k ρ_k·r_k^(j−1) = g_j (over the predictor's r_k for
    UniP, with r = 1 too for UniC), g_j = j!·ψ_j/B(h), with the paper's recursion
    ψ_1 = (e^{−h} − 1)/(−h) − 1, ψ_{j+1} = ψ_j/(−h) − 1/(j+1)!, and bh2's B(h) = e^{−h} − 1
    (which makes the α_t·B(h) factor of the corrections equal the first-order term's);
    UniP-2 and UniC-1 use the paper's ρ = 1/2 (the small-h limit of g_1)."""
    t = s0 - 1
    h = lam[t] - lam[s0]
    rks = [(lam[s0 + k] - lam[s0]) / h for k in range(1, p)] + [1.0]
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)  # bh2
    psi, factorial = h_phi_1 / hh - 1.0, 1.0
    rows, g = [], []
    for j in range(1, p + 1):
        rows.append([r ** (j - 1) for r in rks])
        g.append(psi * factorial / b_h)
        factorial *= j + 1
        psi = psi / hh - 1.0 / factorial
    R, g = np.array(rows), np.array(g)
    if corrector:
        rho = np.array([0.5]) if p == 1 else np.linalg.solve(R, g)
        older = rho[:-1] / np.array(rks[:-1])
        weights = (rho[-1], 1.0 - older.sum() - rho[-1], *older)
    else:
        rho = np.array([]) if p == 1 else np.array([0.5]) if p == 2 else np.linalg.solve(
            R[:-1, :-1], g[:-1])
        older = rho / np.array(rks[:-1])
        weights = (1.0 - older.sum(), *older)
    a = np.sqrt((1.0 - ac[t]) / (1.0 - ac[s0]))
    b = -np.sqrt(ac[t]) * h_phi_1
    return float(a), float(b), *(float(w) for w in weights)


def _unipc_coefs(alphas_cumprod: np.ndarray, order: int) -> tuple[list, list]:
    """UniPC's per-index coefficients on a (respaced) chain, float64 (`_multistep`'s form):
    predictors[i] (i ≥ 1) steps from index i to i − 1 with UniP of order p_i = min(order,
    T − i) (the predictions made so far), zero-padded to order + 1 weights; correctors[i]
    (i ≤ T − 2) corrects x_i with UniC of the order p_{i+1} of the step that reached it (None at
    T − 1, which no step reached; entry 0 of predictors is unused)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order {order}: 1, 2 or 3")
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = log_snr(ac)
    T = len(ac)
    predictors: list = [(0.0, 0.0, 1.0) + (0.0,) * order]
    correctors: list = [None] * T
    for i in range(1, T):
        p = min(order, T - i)
        a, b, *w = _unipc_weights(ac, lam, i, p, corrector=False)
        predictors.append((a, b, *w, *[0.0] * (order + 1 - len(w))))
        a, b, *w = _unipc_weights(ac, lam, i, p, corrector=True)
        correctors[i - 1] = (a, b, *w, *[0.0] * (order + 1 - len(w)))
    return predictors, correctors
