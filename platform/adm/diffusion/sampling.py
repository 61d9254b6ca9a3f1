"""The sampling entry point later stages call: model (+ classifier) in, images in [-1, 1] out.

`sample(model, diffusion, shape, ...)` runs one of the samplers below on the diffusion's
device-cached coefficients: per step it launches the model (and the classifier's forward and
backward when guided) and a fixed handful of elementwise kernels; the timesteps and coefficients
are gathered on the device, so there is no host-device sync and no Python work that grows with
the batch inside the loop. Options: bf16/fp16 autocast, channels-last tensors, `torch.compile` of
the networks.

The samplers are plain functions with one signature (k-diffusion's style):
``sampler(diffusion, model, x_T, *, cond_fn, model_kwargs, clip_denoised, eta, generator,
progress) -> x_0``.

Per-sample noise streams (``sample(..., seeds=[...])``): row i draws its x_T and every step's
noise from its own `torch.Generator` seeded with seeds[i], so a sample depends on its seed alone,
not on the batch it was drawn in, its position there, or the batch size (given kernels that are
themselves batch-invariant; see `RowNoise`). `index_seeds(seed, indices)` derives such seeds
from a run's seed and the samples' indices, which is what large-scale generation uses.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..guidance import classifier_cond_fn
from .gaussian import GaussianDiffusion, _progress
from .respace import respace

# Stream names for `index_seeds`: one independent stream per use of a sample's randomness.
STREAMS = {"base": 0, "upsampler": 1, "label": 2}


def index_seeds(seed: int, indices, stream: str | int = "base") -> list[int]:
    """Per-sample 64-bit generator seeds: sample `indices[k]` of a run seeded with `seed` gets
    `SeedSequence([seed, stream, index])`'s first word, so streams of neighbouring indices (and
    of one index's stages) are statistically independent, not just offset by one.

    :param indices: [N] non-negative ints (a list, numpy array or int tensor).
    :param stream: a name in STREAMS (or its number): keeps e.g. the base model's and the
        upsampler's noise of one sample apart.
    """
    stream = STREAMS[stream] if isinstance(stream, str) else int(stream)
    return [int(np.random.SeedSequence([int(seed), stream, int(i)]).generate_state(1, np.uint64)[0])
            for i in np.asarray(indices, dtype=np.int64).reshape(-1)]


class RowNoise:
    """Standard normal noise with one `torch.Generator` per batch row.

    Row i of every draw comes from generator i (seeded with seeds[i]) alone, so it is the same
    whatever else is in the batch. Each draw is one `normal_` launch per row into a batch-sized
    buffer (no host-device sync; measured cost in benchmarks/generate.py). Floating-point
    identity of whole samples across batch sizes also needs batch-invariant network kernels:
    CPU MKL sgemm, for one, rounds rows differently for very small batches (< ~6 rows).
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, shape, device: torch.device):
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if len(seeds) != shape[0]:
            raise ValueError(f"seeds: {len(seeds)} seeds for a batch of {shape[0]}")
        self.shape, self.device = tuple(shape), torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __call__(self) -> torch.Tensor:
        """One draw: [N, C, H, W] float32, row i from generator i."""
        out = torch.empty(self.shape, device=self.device)
        for row, g in zip(out, self.generators):
            row.normal_(generator=g)
        return out


def _row_noise_loop(diffusion: GaussianDiffusion, model, x: torch.Tensor, noise: RowNoise, *,
                    ddim: bool, cond_fn, model_kwargs, clip_denoised: bool, eta: float,
                    progress: bool) -> torch.Tensor:
    """The ancestral (ddim=False) or DDIM loop of `diffusion` from x = x_T [N, C, H, W], with
    each step's noise from `noise` (its per-row streams) instead of one generator. Each step
    is GaussianDiffusion.p_sample / ddim_sample with the noise passed in; a test holds the two
    equal for a single row."""
    diffusion._preload(x.device, x.dtype)
    n = x.shape[0]
    for i in _progress(list(range(diffusion.num_timesteps))[::-1], progress):
        t = torch.full((n,), i, device=x.device, dtype=torch.int64)
        with torch.no_grad():
            out = diffusion.p_mean_variance(model, x, t, clip_denoised, None, model_kwargs)
            if ddim:
                x_next = _ddim_step(diffusion, out, x, t, cond_fn, model_kwargs, eta)
                scale = None if eta == 0.0 else _ddim_sigma(diffusion, x, t, eta)
            else:
                if cond_fn is not None:
                    out["mean"] = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs)
                x_next, scale = out["mean"], torch.exp(0.5 * out["log_variance"])
            # The last step (i = 0) adds no noise; every other one adds Σ^½·z (DDPM) or σ·z
            # (DDIM, η > 0), in the reference's order of operations.
            if i > 0 and scale is not None:
                x_next = x_next + scale * noise()
        x = x_next
    return x


def _ddim_step(diffusion: GaussianDiffusion, out: dict, x, t, cond_fn, model_kwargs, eta):
    """DDIM's deterministic part x_0·√ᾱ_{t-1} + √(1−ᾱ_{t-1}−σ²)·ε (the σ·z term is added by the
    caller), guided on the score as GaussianDiffusion.ddim_sample."""
    if cond_fn is not None:
        out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs)
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    x0_coef, eps_coef, _ = diffusion._ddim_coefs(
        diffusion._extract("alphas_cumprod", t, x), diffusion._extract("alphas_cumprod_prev", t, x),
        eta)
    return out["pred_xstart"] * x0_coef + eps_coef * eps


def _ddim_sigma(diffusion: GaussianDiffusion, x, t, eta: float) -> torch.Tensor:
    """DDIM's σ_t for η = eta at indices t [N], shaped [N, 1, 1, 1]."""
    return diffusion._ddim_coefs(diffusion._extract("alphas_cumprod", t, x),
                                 diffusion._extract("alphas_cumprod_prev", t, x), eta)[2]


def ddpm(diffusion: GaussianDiffusion, model, x: torch.Tensor, *, cond_fn=None, model_kwargs=None,
         clip_denoised: bool = True, eta: float = 0.0, generator=None, progress: bool = False
         ) -> torch.Tensor:
    """Ancestral sampling (Ho et al.) over every step of `diffusion` from x = x_T [N, C, H, W];
    classifier guidance shifts each mean by Σ·g. `eta` must be 0 (a DDIM parameter)."""
    if eta != 0.0:
        raise ValueError(f"eta={eta} is a DDIM parameter; the ddpm sampler takes none")
    return diffusion.p_sample_loop(model, tuple(x.shape), noise=x, clip_denoised=clip_denoised,
                                   cond_fn=cond_fn, model_kwargs=model_kwargs, device=x.device,
                                   progress=progress, generator=generator)


def ddim(diffusion: GaussianDiffusion, model, x: torch.Tensor, *, cond_fn=None, model_kwargs=None,
         clip_denoised: bool = True, eta: float = 0.0, generator=None, progress: bool = False
         ) -> torch.Tensor:
    """DDIM (Song et al.) with η = eta over every step of `diffusion` from x = x_T; classifier
    guidance corrects each ε by −√(1−ᾱ_t)·g."""
    return diffusion.ddim_sample_loop(model, tuple(x.shape), noise=x, clip_denoised=clip_denoised,
                                      cond_fn=cond_fn, model_kwargs=model_kwargs, device=x.device,
                                      progress=progress, eta=eta, generator=generator)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim}


@functools.lru_cache(maxsize=32)
def _respaced(diffusion: GaussianDiffusion, spec: str) -> GaussianDiffusion:
    return respace(diffusion, spec)


def _device_of(model, noise, generator, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if generator is not None:
        return generator.device
    if isinstance(model, nn.Module):
        return next(model.parameters()).device
    return torch.device("cpu")


def _model_fn(model, pass_y: bool):
    """model(x, t, **kwargs) with y dropped for an unconditional model (guidance still gets y, as
    the reference's `classifier_sample.py` does) and the output in float32."""

    def model_fn(x, t, y=None, **kwargs):
        if pass_y and y is not None:
            kwargs["y"] = y
        return model(x, t, **kwargs).float()

    return model_fn


def sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape,
    *,
    sampler: str = "ddim",
    steps: int | str | None = None,
    classifier: nn.Module | None = None,
    classifier_scale: float = 1.0,
    y: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    seeds: Sequence[int] | torch.Tensor | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool | dict = False,
    progress: bool = False,
    device=None,
) -> torch.Tensor:
    """Generate a batch of images, optionally classifier-guided.

    :param model: the denoiser, ``model(x, t, y=None, **model_kwargs)`` (a U-Net or the
        upsampler); put it in eval mode first.
    :param diffusion: the diffusion it was trained with (possibly already respaced).
    :param shape: (N, C, H, W).
    :param sampler: "ddim" or "ddpm" (ancestral).
    :param steps: respace the diffusion's original chain for this call: an int N means "ddimN"
        for DDIM (the DDIM paper's stride; the README's DDIM-25) and "N" for DDPM; a string is
        any respacing ("250", "10,10,10", "ddim25"). None samples `diffusion` as it is.
    :param classifier: a noisy-image classifier ``classifier(x, t)`` for guidance, with
        `classifier_scale` the paper's s; needs `y`.
    :param y: [N] int64 class labels, for a class-conditional model and/or the classifier
        (an unconditional model is called without them).
    :param model_kwargs: further model inputs, e.g. ``{"low_res": [N, C, h, w]}``.
    :param generator: a `torch.Generator` on the sampling device: x_T (unless `noise` is given)
        and every step's noise are drawn from it, so a seed reproduces the batch. Without one,
        the global generator is used.
    :param noise: x_T, [N, C, H, W] per-sample starting noise. With DDIM at eta = 0 it alone
        determines each sample, whatever else is in the batch or in which order.
    :param seeds: [N] per-sample generator seeds (ints up to 2**64 − 1, e.g. from
        `index_seeds`): row i draws x_T (unless `noise` is given) and every step's noise from
        its own generator seeded with seeds[i], so it does not depend on the rest of the batch
        (see `RowNoise`). Excludes `generator`. A single row seeded with s gives exactly what
        ``generator=torch.Generator().manual_seed(s)`` gives it.
    :param eta: DDIM's η (0 = deterministic).
    :param clip_denoised: clamp each x_0 prediction to [-1, 1].
    :param autocast_dtype: e.g. torch.bfloat16: run the networks under autocast (the diffusion
        arithmetic and the guidance gradient stay float32).
    :param channels_last: move x, the model and the classifier to channels-last memory format
        (the modules are converted in place).
    :param compile: `torch.compile` the model and the classifier (True, or a dict of
        torch.compile keyword arguments). The first call compiles; later ones reuse it.
    :param progress: show a progress bar.
    :return: [N, C, H, W] float32 samples in [-1, 1] (clamped), contiguous.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    if sampler == "ddpm" and eta != 0.0:  # (the per-row loop would otherwise ignore it)
        raise ValueError(f"eta={eta} is a DDIM parameter; the ddpm sampler takes none")
    if steps is not None:
        spec = steps if isinstance(steps, str) else (f"ddim{steps}" if sampler == "ddim"
                                                     else str(int(steps)))
        diffusion = _respaced(diffusion, spec)
    shape = tuple(int(s) for s in shape)
    device = _device_of(model, noise, generator, device)
    if seeds is not None and generator is not None:
        raise ValueError("seeds and generator exclude each other: seeds gives each row its own")
    row_noise = RowNoise(seeds, shape, device) if seeds is not None else None
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match shape {shape}")
        x = noise.to(device=device, dtype=torch.float32)
    elif row_noise is not None:
        x = row_noise()
    else:
        x = torch.randn(shape, generator=generator, device=device)
    if classifier is not None and y is None:
        raise ValueError("classifier guidance needs labels y")

    model_kwargs = dict(model_kwargs or {})
    if y is not None:
        model_kwargs["y"] = y.to(device)
    pass_y = getattr(model, "num_classes", True) is not None

    restore = []
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for module in (model, classifier):
            if isinstance(module, nn.Module):
                module.to(memory_format=torch.channels_last)
    if compile:
        options = compile if isinstance(compile, dict) else {}
        model = torch.compile(model, **options)
        if classifier is not None:
            # A compiled backward computes every input's gradient: keep the weights out of it.
            restore = [p for p in classifier.parameters() if p.requires_grad]
            for p in restore:
                p.requires_grad_(False)
            classifier = torch.compile(classifier, **options)

    cond_fn = None
    if classifier is not None:
        cond_fn = classifier_cond_fn(classifier, classifier_scale)
    precision = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    try:
        with precision:
            if row_noise is not None:
                out = _row_noise_loop(diffusion, _model_fn(model, pass_y), x, row_noise,
                                      ddim=sampler == "ddim", cond_fn=cond_fn,
                                      model_kwargs=model_kwargs, clip_denoised=clip_denoised,
                                      eta=eta, progress=progress)
            else:
                out = SAMPLERS[sampler](diffusion, _model_fn(model, pass_y), x, cond_fn=cond_fn,
                                        model_kwargs=model_kwargs, clip_denoised=clip_denoised,
                                        eta=eta, generator=generator, progress=progress)
    finally:
        for p in restore:
            p.requires_grad_(True)
    return out.clamp(-1, 1).contiguous()
