"""The sampling entry point later stages call: model (+ classifier) in, images in [-1, 1] out.

`sample(model, diffusion, shape, ...)` sets one call up and runs one of the samplers
(`adm.diffusion.samplers`): it picks the steps (`adm.diffusion.spacing`), draws x_T (from
per-row noise streams with `seeds`: `adm.diffusion.seeds`), wraps the model for classifier-free
guidance (`adm.diffusion.cfg`), builds the classifier guidance (`adm.guidance`), and applies
bf16/fp16 autocast, channels-last tensors and `torch.compile` of the networks. The samplers run
on the diffusion's device-cached coefficients: per step they launch the model (and the
classifier's forward and backward when guided) and a fixed handful of elementwise kernels; the
timesteps and coefficients are gathered on the device, so there is no host-device sync and no
Python work that grows with the batch inside the loop.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn

from ..guidance import classifier_cond_fn
from .cfg import check_cfg, classifier_free_guidance
from .deepcache import DeepCache, check_cache_interval
from .gaussian import GaussianDiffusion, sampling_device
from .interval import limited
from .samplers import SAMPLERS, check_eta
from .seeds import RowNoise
from .spacing import sampling_diffusion

__all__ = ["sample"]


def _model_fn(model, pass_y: bool):
    """model(x, t, **kwargs) with y dropped for an unconditional model (guidance still gets y, as
    the reference's `classifier_sample.py` does) and the output in float32."""

    def model_fn(x, t, y=None, **kwargs):
        if pass_y and y is not None:
            kwargs["y"] = y
        return model(x, t, **kwargs).float()

    return model_fn


def _check_arguments(sampler: str, eta: float, classifier, y, seeds, generator,
                     guidance_interval) -> None:
    """`sample`'s checks of its own arguments (`sampling_diffusion` and `check_cfg` check the
    spacing and the classifier-free guidance; `RowNoise` the number of seeds)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    check_eta(sampler, eta)
    if seeds is not None and generator is not None:
        raise ValueError("seeds and generator exclude each other: seeds gives each row its own")
    if classifier is not None and y is None:
        raise ValueError("classifier guidance needs labels y")
    if guidance_interval is not None and classifier is None:
        raise ValueError("guidance_interval is where a classifier guides: pass a classifier")


def _starting_noise(shape: tuple, device: torch.device, noise: torch.Tensor | None,
                    row_noise: RowNoise | None, generator: torch.Generator | None,
                    channels_last: bool) -> torch.Tensor:
    """x_T [N, C, H, W] float32 on `device`: `noise` itself, else the per-row streams' first
    draw, else a draw from `generator` (or the global generator); channels-last if asked."""
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match shape {shape}")
        x = noise.to(device=device, dtype=torch.float32)
    elif row_noise is not None:
        x = row_noise()
    else:
        x = torch.randn(shape, generator=generator, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _compile_options(compile: bool | dict) -> dict | None:
    """`torch.compile` keyword arguments for `sample`'s `compile` (None: off). Shapes are static
    by default: a stage's model calls all have the same shape, and a dynamic-shape graph would
    be both slower and recompiled once more on the second call."""
    if not compile:
        return None
    return {"dynamic": False, **(compile if isinstance(compile, dict) else {})}


def _prepared(model: nn.Module, classifier: nn.Module | None, channels_last: bool,
              compile: dict | None) -> nn.Module:
    """The model for one `sample` call: converted to channels-last in place (the classifier
    too) and/or wrapped by `torch.compile(**compile)`."""
    if channels_last:
        for module in (model, classifier):
            if isinstance(module, nn.Module):
                module.to(memory_format=torch.channels_last)
    return torch.compile(model, **compile) if compile is not None else model


# Over 80 lines for its docstring, which documents every parameter.
def sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape,
    *,
    sampler: str = "ddim",
    steps: int | str | None = None,
    timesteps: str | None = None,
    lambda_min: float | None = None,
    lambda_max: float | None = None,
    classifier: nn.Module | None = None,
    classifier_scale: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    cfg_scale: float = 1.0,
    cache_interval: int = 1,
    cache_depth: int | None = None,
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
    """Generate a batch of images, optionally classifier-guided and/or classifier-free guided.

    :param model: the denoiser, ``model(x, t, y=None, **model_kwargs)`` (a U-Net or the
        upsampler); put it in eval mode first.
    :param diffusion: the diffusion it was trained with (possibly already respaced).
    :param shape: (N, C, H, W).
    :param sampler: "ddim", "ddpm" (ancestral), "dpmpp_2m", "dpmpp_3m" (DPM-Solver++(2M),
        (3M)) or "unipc" (UniPC-2; η = 0 only); the names are `SAMPLERS`' keys.
    :param steps: respace the diffusion's original chain for this call: an int N is N model
        calls at timesteps spaced as `timesteps` says; a string is any respacing ("250",
        "10,10,10", "ddim25"); a sequence is the original chain's timesteps to keep (e.g.
        `logsnr_timesteps(..., lambda_min=...)`). None samples `diffusion` as it is.
    :param timesteps: how an int `steps` is spaced: "uniform" (evenly strided in t, first and
        last step kept: the respacing "N"), "logsnr" (the chain's timesteps nearest to uniform
        in log-SNR from λ = −5.1 (`LOGSNR_MIN`); duplicates dropped, so possibly fewer calls
        than N: see `logsnr_timesteps`), or None: the sampler's default, "ddimN" for DDIM
        (the DDIM paper's stride, the README's DDIM-25), "uniform" for DDPM, "logsnr" for
        DPM-Solver++.
    :param lambda_min: where a "logsnr" grid starts, as a half log-SNR λ = log(α/σ) =
        ½·log(ᾱ/(1−ᾱ)) (DPM-Solver's λ; σ_EDM = e^−λ): the
        noisiest step with λ ≥ lambda_min (None: −5.1, `LOGSNR_MIN`; −inf: the chain's last
        step). Only with a "logsnr" spacing.
    :param lambda_max: where a "logsnr" grid ends (the same λ): its cleanest step with
        λ ≤ lambda_max, whose data prediction is the sample (None: step 0). The calls a grid
        to step 0 spends where the image no longer changes go to the middle instead (on the
        quickstart models UniPC-4 to λ = 1.9 gives UniPC-6's FID: docs/benchmarks.md). Only
        with a "logsnr" spacing.
    :param classifier: a noisy-image classifier ``classifier(x, t)`` for guidance, with
        `classifier_scale` the paper's s; needs `y`.
    :param guidance_interval: (lo, hi): apply the classifier's guidance only at the steps whose
        noise level σ = √((1 − ᾱ_t)/ᾱ_t) is in (lo, hi] (Kynkäänniemi et al. 2024); the other
        steps make the unguided update and do not call the classifier. None: every step.
    :param cfg_scale: classifier-free guidance weight w (1 = off: the model is called as is).
        Otherwise each model call is one call on the doubled batch (labels y, then the null
        class) and ε = ε_null + w·(ε_cond − ε_null), Σ from the conditional half (see
        `classifier_free_guidance`). Needs `y` and a model trained with label dropout
        (`class_dropout_prob` > 0: it has a null-class embedding, `model.null_label`).
    :param cache_interval: deep-feature reuse (DeepCache; `adm.diffusion.deepcache`): k > 1
        runs the full U-Net at model calls 0, k, 2k, ... and in between only its shallow
        blocks on the deep features of the last full call (1 = off: the plain network). Every
        row of the batch is at the same call, so each row's result is its own.
    :param cache_depth: encoder blocks (and as many decoder blocks) the shallow calls run
        (None: the model's full-resolution level, `UNet.cache_depth`).
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
        ``generator=torch.Generator().manual_seed(s)`` gives it. (DPM-Solver++ draws x_T only.)
    :param eta: DDIM's η (0 = deterministic); DPM-Solver++ takes 0 only.
    :param clip_denoised: clamp each x_0 prediction to [-1, 1].
    :param autocast_dtype: e.g. torch.bfloat16: run the networks under autocast (the diffusion
        arithmetic and the guidance gradient stay float32).
    :param channels_last: move x, the model and the classifier to channels-last memory format
        (the modules are converted in place).
    :param compile: `torch.compile` the model and the classifier's gradient (True, or a dict
        of torch.compile keyword arguments; shapes static unless it says `dynamic`). The first
        call compiles; later calls with the same shapes and networks reuse it (and inductor's
        on-disk cache makes a new process's compile shorter).
    :param progress: show a progress bar.
    :return: [N, C, H, W] float32 samples in [-1, 1] (clamped), contiguous.
    """
    _check_arguments(sampler, eta, classifier, y, seeds, generator, guidance_interval)
    cache_interval = check_cache_interval(cache_interval)
    if cache_depth is not None and cache_interval == 1:
        raise ValueError("cache_depth is where cache_interval > 1 splits the U-Net")
    diffusion = sampling_diffusion(diffusion, sampler, steps, timesteps, lambda_min, lambda_max)
    null_label = check_cfg(model, cfg_scale, y)
    shape = tuple(int(s) for s in shape)
    device = sampling_device(model, noise, generator, device)
    row_noise = RowNoise(seeds, shape, device) if seeds is not None else None
    x = _starting_noise(shape, device, noise, row_noise, generator, channels_last)
    model_kwargs = dict(model_kwargs or {})
    if y is not None:
        model_kwargs["y"] = y.to(device)
    pass_y = getattr(model, "num_classes", True) is not None
    precision = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    options = _compile_options(compile)
    model = _prepared(model, classifier, channels_last, options)
    if cache_interval > 1:
        model = DeepCache(model, cache_interval, cache_depth)
    with precision:
        model_fn = _model_fn(model, pass_y)
        if null_label is not None:
            model_fn = classifier_free_guidance(model_fn, cfg_scale, null_label)
        cond_fn = None if classifier is None else limited(classifier_cond_fn(
            classifier, classifier_scale, compile=options or False), guidance_interval)
        out = SAMPLERS[sampler](diffusion, model_fn, x, cond_fn=cond_fn, model_kwargs=model_kwargs,
                                clip_denoised=clip_denoised, eta=eta, generator=generator,
                                noise_fn=row_noise, progress=progress)
    return out.clamp(-1, 1).contiguous()
