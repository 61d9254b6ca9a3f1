"""The diffusion core: beta schedules, the Gaussian diffusion (training losses, DDPM and DDIM
steps, guidance hooks, the bits/dim bound), respacing, timestep samplers, and the fast sampling
entry point (DDPM, DDIM, DPM-Solver++(2M) and (3M); classifier and classifier-free guidance;
per-sample noise streams). Plain PyTorch and numpy; nothing here knows about Ray or the
networks' internals."""
from typing import Literal

from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from .respace import SpacedDiffusion, create_gaussian_diffusion, respace, space_timesteps
from .sampling import (
    SAMPLERS,
    STREAMS,
    TIMESTEP_SPACINGS,
    RowNoise,
    classifier_free_guidance,
    ddim,
    ddpm,
    dpmpp_2m,
    dpmpp_3m,
    index_seeds,
    LOGSNR_MIN,
    logsnr_timesteps,
    sample,
    sampling_diffusion,
)
from .schedules import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "GaussianDiffusion", "SpacedDiffusion", "ModelMeanType", "ModelVarType", "LossType",
    "get_named_beta_schedule", "betas_for_alpha_bar", "space_timesteps", "respace",
    "create_gaussian_diffusion", "create_named_schedule_sampler", "ScheduleSampler",
    "UniformSampler", "LossAwareSampler", "LossSecondMomentResampler", "sample", "ddim", "ddpm",
    "dpmpp_2m", "dpmpp_3m", "SAMPLERS", "TIMESTEP_SPACINGS", "sampling_diffusion", "LOGSNR_MIN",
    "logsnr_timesteps", "SamplerName", "SpacingName",
    "classifier_free_guidance", "index_seeds", "RowNoise", "STREAMS", "normal_kl",
    "discretized_gaussian_log_likelihood", "mean_flat",
]

# The sampler and timestep-spacing names, as types for the configs that name them.
SamplerName = Literal[tuple(sorted(SAMPLERS))]
SpacingName = Literal[TIMESTEP_SPACINGS]
