"""The likelihood terms of the variational bound (Ho et al. 2020, section 3.3), in nats.

Both broadcast their arguments elementwise; callers average over non-batch dimensions
(`mean_flat`) and divide by ln 2 for bits.
"""
from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python number (e.g. the standard normal prior: 0.0, 0.0); at least one
    must be a tensor, whose dtype and device the numbers take."""
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl: at least one argument must be a tensor")
    logvar1, logvar2 = (a if isinstance(a, torch.Tensor) else torch.tensor(a).to(ref)
                        for a in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation 0.5·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as the
    reference computes it (so decoder likelihoods match it)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats, elementwise, of a Gaussian N(means, exp(log_scales)²) discretised to the
    256 bins of 8-bit images rescaled to [-1, 1] (bin width 2/255); the first and last bins take
    the tails.

    :param x: [N, ...] target images, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, x's shape.
    :param log_scales: log standard deviations, x's shape.
    :return: x's shape, log-probabilities (≤ 0).
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
