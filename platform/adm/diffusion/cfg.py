"""Classifier-free guidance (Ho & Salimans 2022): `sample(..., cfg_scale=w)` wraps the model, so
it composes with every sampler and with classifier guidance. It needs a class-conditional model
trained with label dropout, which has a null-class label embedding (`model.null_label`)."""
from __future__ import annotations

from typing import Callable

import torch


def classifier_free_guidance(model_fn: Callable[..., torch.Tensor], scale: float,
                             null_label: int) -> Callable[..., torch.Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022) around `model_fn(x, t, y=..., **kwargs)`.

    The returned function calls the model once on the doubled batch [x; x] with labels
    [y; null_label] (other batch-sized inputs, e.g. `low_res`, doubled too) and returns, in the
    model's output layout [N, C or 2C, H, W]:

    - first C channels (ε): ε_null + scale·(ε_cond − ε_null); for an x_0- (or x_{t−1}-)
      predicting model the same affine combination of its prediction is the same guidance,
      since ε is affine in it at fixed x_t with weights summing to 1;
    - last C channels (the learned variance's v, if any): the conditional half's.

    `y` is required ([N] int64). The caller's y is left alone for classifier guidance.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs the labels y")
        n, channels = x.shape[0], x.shape[1]

        def doubled(v):
            is_batch = isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n
            return torch.cat([v, v]) if is_batch else v

        labels = torch.cat([y, torch.full_like(y, null_label)])
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), y=labels,
                       **{k: doubled(v) for k, v in kwargs.items()})
        cond, null = out[:n], out[n:]
        eps = null[:, :channels] + scale * (cond[:, :channels] - null[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided


def check_cfg(model: torch.nn.Module, cfg_scale: float, y: torch.Tensor | None) -> int | None:
    """The null label to guide with, or None when cfg_scale is 1 (off); a clear error when the
    model has no null class (trained without label dropout) or there are no labels."""
    if cfg_scale == 1.0:
        return None
    null_label = getattr(model, "null_label", None)
    if null_label is None:
        raise ValueError(
            f"cfg_scale={cfg_scale}: classifier-free guidance needs a class-conditional model "
            "trained with label dropout (flag class_dropout_prob > 0), which has a null-class "
            "label embedding; this model has none (model.null_label is None)")
    if y is None:
        raise ValueError(f"cfg_scale={cfg_scale}: classifier-free guidance needs labels y")
    return int(null_label)
