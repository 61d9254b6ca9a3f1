"""Evaluation: FID, sFID, Inception Score, precision and recall with the ADM evaluator's
definitions (as its `evaluator.py` computes them), on features computed by a Ray Data job.

The metrics (``metrics``) are plain numpy functions and import no network or Ray:
``frechet_distance(mu1, sigma1, mu2, sigma2)``, ``inception_score(probs, split_size=5000)``,
``precision_recall(real_features, fake_features, k=3)`` and ``fid_statistics(features)``.
The feature networks are in ``inception`` (the FID Inception-v3 in pytorch-fid's layout) and
``networks`` (``--features`` parsing, classifier features); inputs in ``sources``; the Ray job
and its cache in ``features``; the whole comparison in ``evaluation``.
"""
from __future__ import annotations

from .metrics import fid_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["fid_statistics", "frechet_distance", "inception_score", "precision_recall"]
