"""The Gaussian diffusion of Ho et al. (2020) with the improvements ADM uses (Nichol & Dhariwal
2021; Dhariwal & Nichol 2021): learned variances, the hybrid loss, DDIM, classifier guidance.

Notation (the papers'): x_0 is a clean image, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε the image after t+1
forward steps (index t = 0 is one step), β_t the variance step t adds, α_t = 1 − β_t and
ᾱ_t = ∏_{s≤t} α_s. The model sees x_t and the timestep and predicts ε (or x_0, or x_{t−1}) and,
with a learned variance, a value v ∈ [-1, 1] per element that interpolates log Σ between the
posterior variance β̃_t and β_t.

Every method takes `t` as a [N] int64 tensor of indices *into this diffusion* (0..T−1; for a
respaced diffusion, indices of the kept steps). The model and the guidance function receive
`model_timesteps(t)`: the original chain's timesteps, not the indices (the model was trained on
that chain alone; a respaced diffusion's index 3 may be its timestep 750), as float on a 1000
scale when `rescale_timesteps`. All per-step arrays are float64 numpy with the reference's
names; on a device they are cached once as float32 (float64 for float64 inputs), so a sampling
step gathers its coefficients on the device: no host copies, no host-device syncs.

Noise: the methods draw their noise as the reference does, with `torch.randn_like(x)` on the
global generator after the model call; every method that draws also takes `generator=` (a
`torch.Generator` on x's device) to draw from it instead. The sampling steps and loops also take
`noise_fn=` (e.g. `sampling.RowNoise`, a generator per row), called for each draw a step needs.
"""
from __future__ import annotations

import enum
import functools
import math
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..progress import progress_bar
from .interval import guidance_at
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., torch.Tensor]  # model(x [N,C,H,W], t [N], **model_kwargs) -> [N,C or 2C,H,W]
CondFn = Callable[..., torch.Tensor]  # cond_fn(x, t, **model_kwargs) -> ∇_x log p(y|x_t), x's shape
# noise_fn() -> z ~ N(0, I) of x's shape [N, C, H, W], or None: no noise term.
NoiseFn = Callable[[], torch.Tensor | None]

ARRAY_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # ε


class ModelVarType(enum.Enum):
    """The reverse step's variance: fixed, or learned from the model's last C channels."""

    LEARNED = enum.auto()  # the channels are log Σ
    FIXED_SMALL = enum.auto()  # β̃_t, the posterior variance
    FIXED_LARGE = enum.auto()  # β_t (β̃_1 at t = 0, for a better decoder likelihood)
    LEARNED_RANGE = enum.auto()  # v ∈ [-1, 1]: log Σ = (v+1)/2·log β_t + (1−v)/2·log β̃_t


class LossType(enum.Enum):
    MSE = enum.auto()  # ‖target − prediction‖² (+ the VLB for a learned variance: L_hybrid)
    RESCALED_MSE = enum.auto()  # same, the VLB term scaled by T/1000 (L_simple + λ·L_vlb)
    KL = enum.auto()  # the variational bound term of step t
    RESCALED_KL = enum.auto()  # same ×T, an estimate of the whole bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def sampling_device(model, noise: torch.Tensor | None, generator: torch.Generator | None,
                    device: torch.device | str | None) -> torch.device:
    """Where to sample: `device`, else noise's, the generator's, the model's, or the CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if generator is not None:
        return generator.device
    if isinstance(model, torch.nn.Module):  # (a parameter-free module: its buffers, or the CPU)
        tensor = next(model.parameters(), None)
        tensor = next(model.buffers(), None) if tensor is None else tensor
        if tensor is not None:
            return tensor.device
    return torch.device("cpu")


def step_indices(indices: list[int], enabled: bool) -> Iterable[int]:
    """The indices, wrapped in a tqdm progress bar (on stderr) when `enabled`."""
    return progress_bar(indices) if enabled else indices


def concatenated(chains: tuple["GaussianDiffusion", ...]) -> tuple["GaussianDiffusion", list[int]]:
    """One diffusion whose per-step arrays are those of `chains` laid end to end, and where each
    chain starts in it: chain k's index i is index offsets[k] + i. A batch whose rows run
    different chains (steps, spacings), each at its own step, goes through this diffusion's
    methods in one call, each row gathering its own chain's coefficients and its model seeing its
    own chain's original timesteps. The chains must come from one original chain (same mean and
    variance types, timestep rescaling, length); cached per tuple of chains.

    One rule does not carry over: `_add_noise` adds no noise where the index is 0, which is the
    last step of the first chain only. A caller that steps a row of another chain to its end
    passes a zero noise row for it (sample + 0 is the sample, bit for bit)."""
    return _concatenated(tuple(chains))


@functools.lru_cache(maxsize=64)
def _concatenated(chains: tuple) -> tuple["GaussianDiffusion", list[int]]:
    first = chains[0]
    for chain in chains[1:]:
        same = (chain.model_mean_type, chain.model_var_type, chain.rescale_timesteps,
                chain.original_num_steps) == (first.model_mean_type, first.model_var_type,
                                              first.rescale_timesteps, first.original_num_steps)
        if not same or not np.array_equal(chain.base_betas, first.base_betas):
            raise ValueError("concatenated: the chains must respace one original chain")
    if len(chains) == 1:
        return first, [0]
    out = GaussianDiffusion.__new__(GaussianDiffusion)
    out.__dict__.update({k: first.__dict__[k] for k in (
        "model_mean_type", "model_var_type", "loss_type", "rescale_timesteps",
        "original_num_steps", "base_betas")})
    for name in ARRAY_NAMES:
        setattr(out, name, np.concatenate([getattr(c, name) for c in chains]))
    out._extra = {k: np.concatenate([c._extra[k] for c in chains]) for k in first._extra}
    out.timestep_map = [int(t) for c in chains for t in c.timestep_map]
    out.num_timesteps = len(out.timestep_map)
    out._tables = {}
    offsets = np.cumsum([0] + [c.num_timesteps for c in chains[:-1]]).tolist()
    return out, offsets


class GaussianDiffusion:
    """Training and sampling utilities for one diffusion process.

    :param betas: [T] forward-process variances, each in (0, 1].
    :param model_mean_type: a ModelMeanType. :param model_var_type: a ModelVarType.
    :param loss_type: a LossType (for `training_losses`).
    :param rescale_timesteps: pass float timesteps scaled to 0..1000 to the model and cond_fn,
        whatever the number of steps (as the original paper's models expect).
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, rescale_timesteps: bool = False):
        self.model_mean_type, self.model_var_type = model_mean_type, model_var_type
        self.loss_type, self.rescale_timesteps = loss_type, rescale_timesteps
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1]; got min {betas.min()}, max {betas.max()}")
        self.betas = betas
        self.num_timesteps = T = int(betas.shape[0])
        # Which original timestep each index is; SpacedDiffusion replaces these.
        self.timestep_map, self.original_num_steps, self.base_betas = list(range(T)), T, betas

        alphas = 1.0 - betas
        ac = self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # ᾱ = 0 when a beta is exactly 1
            self.sqrt_alphas_cumprod = np.sqrt(ac)
            self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
            self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
            # q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t)
            self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - ac)
            # β̃_0 = 0: its log is clipped to log β̃_1.
            pv_clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:]) \
                if T > 1 else self.posterior_variance
            self.posterior_log_variance_clipped = np.log(pv_clipped)
            self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - ac)
            self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - ac)
            fixed_large = np.append(pv_clipped[0], betas[1:])
            # Further per-step arrays the methods gather (float64, cast once per device), each
            # one the reference also computes in float64 numpy before its cast. The roots the
            # DDIM steps and condition_score take are not here: the reference takes them in the
            # step, of float32 ᾱ's, which differs where 1 − ᾱ is small (see `_ddim_coefs`).
            self._extra = {
                "one_minus_alphas_cumprod": 1.0 - ac,
                "log_betas": np.log(betas),
                "fixed_large_variance": fixed_large,
                "fixed_large_log_variance": np.log(fixed_large),
                "recip_posterior_mean_coef1": 1.0 / self.posterior_mean_coef1,
                "posterior_mean_coef2_over_coef1":
                    self.posterior_mean_coef2 / self.posterior_mean_coef1,
            }
        self._tables: dict = {}

    # -- per-step coefficients on the device ------------------------------------------------

    def __getstate__(self):  # pickled to Ray workers without device caches
        state = self.__dict__.copy()
        state["_tables"] = {}
        return state

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        table = self._tables.get(key)
        if table is None:
            if name == "timestep_map":
                table = torch.tensor(self.timestep_map, dtype=torch.int64, device=device)
            else:
                arr = self._extra[name] if name in self._extra else getattr(self, name)
                table = torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)
            self._tables[key] = table
        return table

    def _preload(self, device: torch.device, dtype: torch.dtype) -> None:
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in (*ARRAY_NAMES, *self._extra):
            self._table(name, device, dtype)
        self._table("timestep_map", device, torch.int64)

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The per-step array `name` at indices t [N], shaped [N, 1, ...] to broadcast against
        x; float32 (float64 when x is float64)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self._table(name, t.device, dtype)[t].view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the model and cond_fn are called with for indices t [N]: the original chain's
        timesteps (int64), or float32 0..1000 when `rescale_timesteps`."""
        mapped = self._table("timestep_map", t.device, torch.int64)[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    # -- the forward process -----------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) for x_0 [N, ...]: (mean, variance, log_variance), each x_start's shape."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """A draw of x_t ~ q(x_t | x_0) = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, x_start's shape.

        :param noise: ε, x_start's shape; drawn with randn_like when not given."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {tuple(noise.shape)} != x_start {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The forward posterior q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t):
        (mean, variance, log_variance clipped at t = 0), each x_t's shape."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} != x_t {tuple(x_t.shape)}")
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand(x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    # -- conversions between x_0, ε and x_{t-1} --------------------------------------------------

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """x_0 = (x_{t-1} − coef2·x_t)/coef1 (the posterior mean solved for x_0)."""
        return (self._extract("recip_posterior_mean_coef1", t, x_t) * xprev
                - self._extract("posterior_mean_coef2_over_coef1", t, x_t) * x_t)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """ε = (x_t/√ᾱ_t − x_0)/√(1/ᾱ_t − 1)."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # -- the reverse process -----------------------------------------------------------------

    def p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True, denoised_fn=None, model_kwargs=None) -> dict:
        """One model call: p(x_{t-1} | x_t) and the model's x_0.

        :param model: model(x, model_timesteps(t), **model_kwargs) -> [N, C, ...], or
            [N, 2C, ...] with a learned variance.
        :param x: [N, C, ...] x_t. :param t: [N] indices.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction first (before clipping).
        :param model_kwargs: extra model inputs (`y`, `low_res`).
        :return: {"mean", "variance", "log_variance", "pred_xstart"}, each x's shape.
        """
        model_kwargs = model_kwargs or {}
        C = x.shape[1]
        out = model(x, self.model_timesteps(t), **model_kwargs).to(x.dtype)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if out.shape[1] != 2 * C:
                raise ValueError(f"a learned-variance diffusion needs {2 * C} model output "
                                 f"channels (ε and v), got {out.shape[1]} (learn_sigma mismatch?)")
            out, var_values = torch.split(out, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                frac = (var_values + 1) / 2
                log_variance = (frac * self._extract("log_betas", t, x)
                                + (1 - frac) * self._extract("posterior_log_variance_clipped", t, x))
            variance = torch.exp(log_variance)
        else:
            if out.shape[1] != C:
                raise ValueError(f"a fixed-variance diffusion needs {C} model output channels, "
                                 f"got {out.shape[1]} (learn_sigma mismatch?)")
            names = {ModelVarType.FIXED_LARGE: ("fixed_large_variance", "fixed_large_log_variance"),
                     ModelVarType.FIXED_SMALL: ("posterior_variance",
                                                "posterior_log_variance_clipped")}[self.model_var_type]
            variance = self._extract(names[0], t, x).expand(x.shape)
            log_variance = self._extract(names[1], t, x).expand(x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, out))
            mean = out
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(out)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, out))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def condition_mean(self, cond_fn: CondFn, p_mean_var: dict, x: torch.Tensor, t: torch.Tensor,
                       model_kwargs=None) -> torch.Tensor:
        """Classifier guidance for ancestral sampling (Sohl-Dickstein et al. 2015; ADM
        algorithm 1): the mean shifted by Σ·g, g = cond_fn(x, model_timesteps(t), **model_kwargs)
        = s·∇_x log p(y | x_t). Returns the new mean, x's shape (at least float32)."""
        gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        dtype = torch.promote_types(p_mean_var["mean"].dtype, torch.float32)
        return p_mean_var["mean"].to(dtype) + p_mean_var["variance"] * gradient.to(dtype)

    def condition_score(self, cond_fn: CondFn, p_mean_var: dict, x: torch.Tensor, t: torch.Tensor,
                        model_kwargs=None) -> dict:
        """Classifier guidance on the score (Song et al. 2020; ADM algorithm 2), for DDIM:
        ε' = ε − √(1−ᾱ_t)·g with g as in condition_mean. Returns p_mean_var with `pred_xstart`
        (not clipped again) and `mean` recomputed from ε'."""
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        # √(1−ᾱ_t) of the gathered ᾱ_t, as the reference takes it (not its float64 table).
        eps = eps - (1 - self._extract("alphas_cumprod", t, x)).sqrt() * gradient
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    @staticmethod
    def _noise_like(x: torch.Tensor, generator: torch.Generator | None,
                    noise_fn: NoiseFn | None = None) -> torch.Tensor | None:
        """A step's z: noise_fn's if given, else a draw from generator or the global one."""
        if noise_fn is not None:
            return noise_fn()
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    @staticmethod
    def _add_noise(sample: torch.Tensor, scale: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor | None) -> torch.Tensor:
        """sample + scale·z where t ≠ 0 (the last step adds nothing); no term for noise None."""
        if noise is None:
            return sample
        nonzero = (t != 0).to(noise.dtype).view(-1, *([1] * (sample.ndim - 1)))
        return sample + nonzero * scale * noise

    def p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 denoised_fn=None, cond_fn: CondFn | None = None, model_kwargs=None, *,
                 generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None) -> dict:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise where t = 0), guided by
        cond_fn when given. Returns {"sample": x_{t-1}, "pred_xstart": x_0}, x's shape.

        :param noise_fn: the step's z (x's shape; None: no noise term) instead of a draw from
            `generator` or the global generator."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = self._noise_like(x, generator, noise_fn)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        sample = self._add_noise(out["mean"], torch.exp(0.5 * out["log_variance"]), t, noise)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                    denoised_fn=None, cond_fn: CondFn | None = None, model_kwargs=None,
                    eta: float = 0.0, *, generator: torch.Generator | None = None,
                    noise_fn: NoiseFn | None = None) -> dict:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12): x_0·√ᾱ_{t-1} +
        √(1−ᾱ_{t-1}−σ²)·ε + σ·z with σ = η·√((1−ᾱ_{t-1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t-1});
        deterministic for η = 0 (then no noise is drawn). Guided by cond_fn on the score.
        Returns {"sample": x_{t-1}, "pred_xstart": x_0}, x's shape. `noise_fn` as p_sample's."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        x0_coef, eps_coef, sigma = self._ddim_coefs(
            self._extract("alphas_cumprod", t, x), self._extract("alphas_cumprod_prev", t, x), eta)
        sample = out["pred_xstart"] * x0_coef + eps_coef * eps
        if eta != 0.0:  # (σ = 0: the step is deterministic and draws nothing)
            sample = self._add_noise(sample, sigma, t, self._noise_like(x, generator, noise_fn))
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @staticmethod
    def _ddim_coefs(alpha_bar: torch.Tensor, alpha_bar_to: torch.Tensor, eta: float):
        """DDIM's coefficients for a step from ᾱ = alpha_bar to ᾱ' = alpha_bar_to ([N, 1, ...]
        each): (√ᾱ', √(1 − ᾱ' − σ²), σ) with σ = η·√((1−ᾱ')/(1−ᾱ))·√(1 − ᾱ/ᾱ').

        Computed here, in x's precision, from the gathered ᾱ's and in the reference's order:
        near t = 0, 1 − ᾱ' is a difference of nearly equal numbers and the ε it multiplies is
        large ((x/√ᾱ − x_0)/√(1/ᾱ − 1) after clipping), so the float32 rounding of ᾱ' shows in
        the sample; roots of float64 ᾱ' land up to ~10 times the fixtures' tolerance away."""
        if eta == 0.0:
            sigma = torch.zeros_like(alpha_bar)
        else:
            sigma = (eta * torch.sqrt((1 - alpha_bar_to) / (1 - alpha_bar))
                     * torch.sqrt(1 - alpha_bar / alpha_bar_to))
        return torch.sqrt(alpha_bar_to), torch.sqrt(1 - alpha_bar_to - sigma ** 2), sigma

    def ddim_reverse_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor,
                            clip_denoised: bool = True, denoised_fn=None, model_kwargs=None,
                            eta: float = 0.0) -> dict:
        """One step of the DDIM ODE forwards, x_t -> x_{t+1} (deterministic encoding).
        Returns {"sample": x_{t+1}, "pred_xstart": x_0}, x's shape."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is the deterministic ODE: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        # Roots of the gathered ᾱ_{t+1} (η = 0), as the reference takes them: see _ddim_coefs.
        x0_coef, eps_coef, _ = self._ddim_coefs(
            self._extract("alphas_cumprod", t, x), self._extract("alphas_cumprod_next", t, x), 0.0)
        return {"sample": out["pred_xstart"] * x0_coef + eps_coef * eps,
                "pred_xstart": out["pred_xstart"]}

    # -- whole loops -------------------------------------------------------------------------

    def _loop(self, step, model, shape, noise, device, progress, generator, noise_fn,
              **step_kwargs) -> Iterator[dict]:
        """`step`'s dicts from x_T = noise (else a draw from noise_fn, generator or the global
        generator) down to t = 0."""
        device = sampling_device(model, noise, generator, device)
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if noise is not None:
            img = noise
        elif noise_fn is not None:
            img = noise_fn()
        elif generator is not None:
            img = torch.randn(*shape, generator=generator, device=device)
        else:
            img = torch.randn(*shape, device=device)
        self._preload(img.device, img.dtype)  # every host-to-device copy before the loop
        cond_fn = step_kwargs.pop("cond_fn", None)
        for i in step_indices(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.int64)
            # The last step's noise is multiplied by 0: a generator still draws it (the reference's
            # draws, so a seed gives its samples); a noise_fn is not called (a launch per row).
            step_noise = noise_fn if noise_fn is None or i > 0 else (lambda: None)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, noise_fn=step_noise,
                           cond_fn=guidance_at(cond_fn, self.alphas_cumprod[i]), **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(self, model: Model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                  progress=False, *, generator=None, noise_fn=None
                                  ) -> Iterator[dict]:
        """Ancestral sampling from x_T to x_0, yielding p_sample's dict at every step (t = T−1
        first). Arguments as p_sample_loop."""
        return self._loop(self.p_sample, model, shape, noise, device, progress, generator,
                          noise_fn, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                          cond_fn=cond_fn, model_kwargs=model_kwargs)

    def p_sample_loop(self, model: Model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False, *,
                      generator=None, noise_fn: NoiseFn | None = None) -> torch.Tensor:
        """Samples [N, C, ...] by ancestral sampling.

        :param shape: (N, C, H, W). :param noise: x_T of that shape (else drawn).
        :param cond_fn: guidance gradient function (see condition_mean), or None.
        :param device: where to sample; default: noise's, the generator's, or the model's.
        :param progress: show a progress bar.
        :param generator: draw x_T and the per-step noise from it instead of the global one.
        :param noise_fn: draw x_T (unless `noise` is given) and the per-step noise from it
            instead (e.g. a `sampling.RowNoise`); not called for the last step, which adds none.
        """
        final = None
        for final in self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device,
                progress, generator=generator, noise_fn=noise_fn):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model: Model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None,
                                     device=None, progress=False, eta=0.0, *, generator=None,
                                     noise_fn=None) -> Iterator[dict]:
        """DDIM sampling, yielding ddim_sample's dict at every step. Arguments as p_sample_loop."""
        return self._loop(self.ddim_sample, model, shape, noise, device, progress, generator,
                          noise_fn, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                          cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)

    def ddim_sample_loop(self, model: Model, shape, noise=None, clip_denoised=True,
                         denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                         progress=False, eta=0.0, *, generator=None,
                         noise_fn: NoiseFn | None = None) -> torch.Tensor:
        """Samples [N, C, ...] by DDIM with η = eta. Arguments as p_sample_loop."""
        final = None
        for final in self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device,
                progress, eta, generator=generator, noise_fn=noise_fn):
            pass
        return final["sample"]

    # -- training and likelihood -------------------------------------------------------------

    def _vb_terms_bpd(self, model: Model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The bound's term at step t, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) ‖
        p(x_{t-1}|x_t)), or at t = 0 the decoder's −log p(x_0|x_1).
        Returns {"output": [N], "pred_xstart": x_start's shape}."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll)
        output = torch.where(t == 0, decoder_nll, kl) / math.log(2.0)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs=None, noise: torch.Tensor | None = None) -> dict:
        """The loss terms at indices t [N] for clean images x_start [N, C, ...].

        :param noise: the ε of x_t (x_start's shape); drawn when not given.
        :return: {"loss": [N]} and, for the MSE losses, "mse" [N] (‖target − prediction‖²
            averaged over pixels) and, with a learned variance, "vb" [N] (the bound's term in bits
            per dimension, through Σ only: the mean's output is detached for it; ×T/1000 for
            RESCALED_MSE). loss = mse + vb (L_hybrid), or the bound's term for the KL losses (×T
            for RESCALED_KL).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        out = model(x_t, self.model_timesteps(t), **model_kwargs).to(x_start.dtype)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[1]
            if out.shape[1] != 2 * C:
                raise ValueError(f"a learned-variance diffusion needs {2 * C} model output "
                                 f"channels, got {out.shape[1]}")
            out, var_values = torch.split(out, C, dim=1)
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_, **__: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if out.shape != target.shape:
            raise ValueError(f"model output {tuple(out.shape)} != target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) ‖ N(0, I)) in bits per dimension, [N]."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device,
                       dtype=torch.int64)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model: Model, x_start: torch.Tensor, clip_denoised: bool = True,
                      model_kwargs=None, *, generator: torch.Generator | None = None,
                      progress: bool = False) -> dict:
        """The whole variational bound of x_start [N, C, ...] in bits per dimension (NLL), one
        model call per step from T−1 down to 0, each on a fresh draw of x_t.

        :return: {"total_bpd": [N], "prior_bpd": [N], "vb": [N, T], "xstart_mse": [N, T],
            "mse": [N, T]}; column j of the [N, T] ones is step T−1−j (the last is the decoder).
        """
        n = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in step_indices(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((n,), i, device=x_start.device, dtype=torch.int64)
            noise = self._noise_like(x_start, generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}
