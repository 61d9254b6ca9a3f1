"""The five numbers of the paper, with the ADM evaluator's definitions.

Plain functions over numpy arrays, usable without any network:

* ``frechet_distance(mu1, sigma1, mu2, sigma2)``: FID (on Inception pool features) and sFID (on
  the spatial features) are this distance between two Gaussians fitted with
  ``fid_statistics`` (mean and the unbiased covariance, ``np.cov(rowvar=False)``);
* ``inception_score(probs, split_size=5000)``: splits of ``split_size`` rows in order, the last
  one possibly shorter (fewer than 5000 rows: one split), score = mean over splits of
  ``exp(mean_rows KL(p || mean p))``;
* ``precision_recall(real, fake, k=3)``: k-NN manifolds (improved precision and recall).

All statistics are float64: covariances of 2048-d features lose digits in float32.
"""
from __future__ import annotations

import numpy as np
import torch

# The evaluator's pairwise-distance blocks (ManifoldEstimator row/col batch sizes): memory is
# bounded by one [ROWS, COLS] distance block (400 MB in float32) and its boolean masks,
# whatever N.
ROW_BATCH = 10000
COL_BATCH = 10000


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (float64);
    eigenvalues below zero (rounding) count as zero."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 @ sigma2) for covariance matrices.

    The evaluator takes scipy's ``sqrtm`` of the (non-symmetric) product and keeps the real
    part. For positive semi-definite inputs the product's eigenvalues are those of the
    symmetric PSD matrix s1 @ sigma2 @ s1 (s1 = sqrt(sigma1)), so the trace of the principal
    root is the sum of their square roots: two symmetric eigendecompositions, no complex
    arithmetic, and rank-deficient covariances (fewer samples than dimensions) need no
    diagonal offset."""
    s1 = _sqrt_psd(sigma1)
    m = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr sigma1 + tr sigma2 - 2 tr sqrt(sigma1 sigma2), in float64.

    :param mu1, mu2: means [D]. :param sigma1, sigma2: covariances [D, D]."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


def split_sizes(n: int, split_size: int = 5000) -> list[int]:
    """Rows in each Inception Score split: in order, the last one possibly shorter."""
    return [min(split_size, n - s) for s in range(0, n, split_size)]


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of class probabilities [N, C] (softmax outputs), as the evaluator
    computes it: splits of ``split_size`` rows in order (the last may be shorter), each scored
    exp(mean_rows KL(p || mean p)), the scores averaged. float64."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probabilities must be [N >= 1, C], got shape {probs.shape}")
    scores = []
    for s in range(0, len(probs), split_size):
        part = probs[s:s + split_size]
        # p log p is 0 at p = 0 (a softmax that underflowed): xlogy keeps it finite.
        kl = (torch.special.xlogy(torch.from_numpy(part), torch.from_numpy(part)).numpy()
              - part * np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax [N, C] in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)] as the evaluator writes them:
    max(|u|^2 - 2 u.v + |v|^2, 0). One [len(u), len(v)] tensor is allocated (addmm, then in
    place): written as an expression, its temporaries made a block cost four times its size."""
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1)[None]
    return torch.addmm(nv, u, v.T, alpha=-2).add_(nu).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, rows: int = ROW_BATCH,
                   cols: int = COL_BATCH) -> torch.Tensor:
    """Each point's squared distance to its k-th nearest neighbour [N], the point itself being
    the 0th (so a set needs at least k + 1 points). Rows in blocks of ``rows``, each against
    all points in blocks of ``cols``, keeping only each row's k + 1 smallest distances so far:
    memory is one [rows, cols] block whatever N (the k-th smallest of a row is the k-th
    smallest of its blocks' k + 1 smallest)."""
    n = len(features)
    if n < k + 1:
        raise ValueError(f"k-NN radii with k={k} need at least {k + 1} points, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r in range(0, n, rows):
        best = None
        for c in range(0, n, cols):
            d = _distances(features[r:r + rows], features[c:c + cols])
            d = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            if best is not None:  # merged after the block's own top-k: no block-sized copy
                d = torch.cat([best, d], dim=1)
                d = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = d
        radii[r:r + rows] = best.kthvalue(k + 1, dim=1).values
    return radii


def _in_manifolds(a: torch.Tensor, radii_a: torch.Tensor, b: torch.Tensor,
                  radii_b: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_in [len(a)]: a point of a lies in some ball of b; b_in [len(b)]: the other way),
    a ball being a point with its radius, boundary included (``<=``), as the evaluator."""
    a_in = torch.zeros(len(a), dtype=torch.bool, device=a.device)
    b_in = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    for r in range(0, len(a), rows):
        for c in range(0, len(b), cols):
            d = _distances(a[r:r + rows], b[c:c + cols])
            a_in[r:r + rows] |= (d <= radii_b[None, c:c + cols]).any(dim=1)
            b_in[c:c + cols] |= (d <= radii_a[r:r + rows, None]).any(dim=0)
            del d  # else the next block is computed while this one is still held
    return a_in, b_in


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, *,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     rows: int = ROW_BATCH, cols: int = COL_BATCH) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes
    them: precision = fraction of fake points inside the real manifold (the union of balls
    around real points reaching their k-th neighbour), recall = fraction of real points inside
    the fake manifold.

    :param real_features: [N1, D]; :param fake_features: [N2, D]; N1, N2 >= k + 1.
    The evaluator computes distances in float16 (falling back to float32 on overflow) as a
    speed measure; float32 (default) or float64 here. ``device`` may be a GPU."""
    real = torch.as_tensor(np.asarray(real_features), device=device).to(dtype)
    fake = torch.as_tensor(np.asarray(fake_features), device=device).to(dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    radii_real = manifold_radii(real, k, rows, cols)
    radii_fake = manifold_radii(fake, k, rows, cols)
    real_in, fake_in = _in_manifolds(real, radii_real, fake, radii_fake, rows, cols)
    return float(fake_in.double().mean()), float(real_in.double().mean())
