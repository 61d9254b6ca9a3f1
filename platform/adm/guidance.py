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


def classifier_cond_fn(classifier: nn.Module, scale: float, *, autocast: bool = True,
                       compile: bool | dict = False) -> Callable[..., torch.Tensor]:
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
    - ``compile`` (True, or a dict of `torch.compile` options): the whole gradient, forward and
      backward, is one compiled function (`torch.func.grad` of the selected log-probabilities,
      traced by `torch.compile` as a single graph), so inductor fuses across the backward
      and no autograd graph is built per step; same value to float rounding.
    """
    gradient = _autograd_log_prob
    if compile:
        options = compile if isinstance(compile, dict) else {}
        gradient = torch.compile(_func_grad_log_prob,
                                 **{"fullgraph": True, "dynamic": False, **options})

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
        with precision:
            grad = gradient(x.detach().to(dtype), t, y.to(x.device), classifier)
        return grad.detach() * scale

    return cond_fn


def _selected_log_prob(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       classifier: nn.Module) -> torch.Tensor:
    """Σ_i log softmax(classifier(x, t))[i, y_i] for x [N, C, H, W], t [N], y [N]: a scalar,
    the log-softmax in x's dtype (at least float32) whatever autocast is open."""
    logits = classifier(x, t)
    with torch.autocast(x.device.type, enabled=False):
        log_probs = torch.log_softmax(logits.to(x.dtype), dim=-1)
        return log_probs.gather(1, y.view(-1, 1)).sum()


def _autograd_log_prob(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       classifier: nn.Module) -> torch.Tensor:
    """∇_x of `_selected_log_prob` by autograd (eager), x's shape; no parameter gradients."""
    with torch.enable_grad():
        x_in = x.requires_grad_(True)
        (grad,) = torch.autograd.grad(_selected_log_prob(x_in, t, y, classifier), x_in)
    return grad


def _func_grad_log_prob(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        classifier: nn.Module) -> torch.Tensor:
    """∇_x of `_selected_log_prob` by `torch.func.grad`, which `torch.compile` traces into one
    graph with the forward (a function of our own, so its compiled entries stay apart)."""
    return torch.func.grad(_selected_log_prob)(x, t, y, classifier)
