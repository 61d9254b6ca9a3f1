"""Classifier guidance (Dhariwal & Nichol 2021, section 4): steer a diffusion model towards a
class y with the gradient of a noisy-image classifier, s·∇_x log p_φ(y | x_t, t).

The diffusion applies it: `GaussianDiffusion.condition_mean` shifts the ancestral step's mean by
Σ·g (algorithm 1), `condition_score` shifts DDIM's ε by −√(1−ᾱ_t)·g (algorithm 2). The function
here only computes g, which the diffusion calls with the timesteps the classifier was trained on
(the original chain's, even for a respaced diffusion) and the model's keyword inputs.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn


def classifier_cond_fn(classifier: nn.Module, scale: float, *, autocast: bool = True
                       ) -> Callable[..., torch.Tensor]:
    """The guidance function of `classifier` at strength `scale` (the paper's s).

    Returns ``cond_fn(x, t, y=None, **kwargs)`` -> ``scale · ∇_x Σ_i log softmax(classifier(x,
    t))[i, y_i]``: a tensor of x's shape (at least float32), detached, with no graph kept.

    - x [N, C, H, W] is x_t; t [N] the classifier's timesteps; y [N] int64 the target classes
      (required); other keyword arguments (the upsampler's `low_res`, ...) are ignored.
    - The gradient is taken with respect to a float32 copy of x, and the log-softmax is computed
      in float32, also under autocast. With ``autocast=True`` the classifier's forward (and so its
      backward) runs under whatever autocast the caller opened (as the reference runs its fp16
      classifier); ``autocast=False`` turns autocast off for it: float32 throughout.
    - Parameter gradients are neither computed nor accumulated (`torch.autograd.grad` with
      respect to x only), whatever `requires_grad` the classifier's parameters have.
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs
                ) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs the target labels: pass y=[N] int64 "
                             "(in model_kwargs)")
        dtype = torch.promote_types(x.dtype, torch.float32)
        precision = contextlib.nullcontext() if autocast else torch.autocast(
            x.device.type, enabled=False)
        # The backward runs inside `precision` too: on CPU autograd runs in this thread, where
        # an open autocast would otherwise also recast the backward's matmuls.
        with torch.enable_grad(), precision:
            x_in = x.detach().to(dtype).requires_grad_(True)
            logits = classifier(x_in, t)
            with torch.autocast(x.device.type, enabled=False):
                log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
                selected = log_probs.gather(1, y.view(-1, 1).to(log_probs.device)).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return grad.detach() * scale

    return cond_fn
