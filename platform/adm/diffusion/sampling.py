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
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
import torch.nn as nn

from ..guidance import classifier_cond_fn
from .gaussian import GaussianDiffusion
from .respace import respace


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
    if steps is not None:
        spec = steps if isinstance(steps, str) else (f"ddim{steps}" if sampler == "ddim"
                                                     else str(int(steps)))
        diffusion = _respaced(diffusion, spec)
    shape = tuple(int(s) for s in shape)
    device = _device_of(model, noise, generator, device)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match shape {shape}")
        x = noise.to(device=device, dtype=torch.float32)
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
            out = SAMPLERS[sampler](diffusion, _model_fn(model, pass_y), x, cond_fn=cond_fn,
                                    model_kwargs=model_kwargs, clip_denoised=clip_denoised,
                                    eta=eta, generator=generator, progress=progress)
    finally:
        for p in restore:
            p.requires_grad_(True)
    return out.clamp(-1, 1).contiguous()
