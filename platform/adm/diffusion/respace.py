"""Timestep respacing: sampling (or training) a T-step diffusion with fewer steps.

Keeping a subset S of the original steps gives a new Markov chain with the same marginals at the
kept steps: its betas are recomputed from the kept ᾱ's, β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}}. Index i
of the respaced chain is original timestep `timestep_map[i]`, which is what the model and the
guidance function see (they were trained on the original chain).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .schedules import get_named_beta_schedule


def _bad(section_counts, num_timesteps: int, why: str) -> ValueError:
    return ValueError(f"timestep_respacing {section_counts!r} on a {num_timesteps}-step "
                      f"diffusion: {why}")


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """Which original timesteps (0..num_timesteps−1) to keep.

    :param section_counts: ``"250"`` or ``"10,15,20"``: the chain is cut into that many
        equal sections (the first ones one step longer when it does not divide) and each keeps
        that many evenly strided steps, first and last included; a list of ints means the same.
        ``"ddimN"``: the DDIM paper's fixed stride, range(0, T, k) for the smallest integer k
        that gives exactly N steps.
    :return: the set of kept timesteps (as the reference returns it).
    :raises ValueError: naming the respacing, when it cannot be parsed, when a section would
        need more steps than it has, or when no stride gives exactly N steps for ``ddimN``.
    """
    spec = section_counts
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise _bad(spec, num_timesteps, "expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise _bad(spec, num_timesteps, f"no integer stride gives exactly {desired} steps")
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise _bad(spec, num_timesteps, "expected a step count, comma-separated counts per "
                       "section ('10,10,10') or 'ddimN'") from None
    else:
        counts = [int(c) for c in spec]
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise _bad(spec, num_timesteps, "step counts must be non-negative and keep at least one "
                   "step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise _bad(spec, num_timesteps, f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulated float positions rounded half to even: exactly the reference's steps.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of a base diffusion's steps.

    :param use_timesteps: the original timesteps to keep (e.g. from `space_timesteps`).
    :param kwargs: the base diffusion's arguments (`betas` of the original chain, ...).

    `timestep_map[i]` is the original timestep of index i; `original_num_steps` is the base
    chain's length (the scale of `rescale_timesteps`); `base_betas` its betas.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        base_betas = np.array(kwargs["betas"], dtype=np.float64)
        keep = sorted(set(int(s) for s in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= len(base_betas):
            raise ValueError(f"use_timesteps must be within 0..{len(base_betas) - 1}, "
                             f"got {keep[:3]}...{keep[-3:]}")
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        kept = base_alphas_cumprod[keep]
        kwargs["betas"] = 1.0 - kept / np.append(1.0, kept[:-1])
        super().__init__(**kwargs)
        self.use_timesteps = set(keep)
        self.timestep_map = keep
        self.original_num_steps = len(base_betas)
        self.base_betas = base_betas


def respace(diffusion: GaussianDiffusion, section_counts) -> SpacedDiffusion:
    """`diffusion`'s base chain (all its original steps) respaced by `section_counts`, with the
    same mean, variance and loss types and timestep rescaling."""
    base = diffusion.base_betas
    return SpacedDiffusion(
        space_timesteps(len(base), section_counts), betas=base,
        model_mean_type=diffusion.model_mean_type, model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type, rescale_timesteps=diffusion.rescale_timesteps)


def create_gaussian_diffusion(*, steps: int = 1000, learn_sigma: bool = False,
                              sigma_small: bool = False, noise_schedule: str = "linear",
                              use_kl: bool = False, predict_xstart: bool = False,
                              rescale_timesteps: bool = False, rescale_learned_sigmas: bool = False,
                              timestep_respacing: str = "") -> SpacedDiffusion:
    """The diffusion of guided-diffusion's flags (its `create_gaussian_diffusion`, same defaults).

    ε-prediction (x_0 with `predict_xstart`); variance fixed large (small with `sigma_small`) or
    learned in range with `learn_sigma`; loss MSE, the hybrid L_simple + L_vlb·T/1000 with
    `rescale_learned_sigmas`, or the rescaled bound with `use_kl`; respaced by
    `timestep_respacing` ("" keeps every step). Always a SpacedDiffusion, as the reference's.

    :raises ValueError: naming a bad schedule, step count or respacing string.
    """
    betas = get_named_beta_schedule(noise_schedule, steps)
    if betas.max() > 1:
        raise ValueError(f"noise_schedule {noise_schedule!r} with diffusion_steps={steps} gives "
                         f"betas up to {betas.max():.3g}, above 1 (the linear schedule needs at "
                         "least 20 steps)")
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        space_timesteps(steps, timestep_respacing or [steps]), betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type, loss_type=loss_type, rescale_timesteps=rescale_timesteps)
