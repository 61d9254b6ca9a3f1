"""The diffusion core: beta schedules (`schedules`), the Gaussian diffusion (`gaussian`: training
losses, DDPM and DDIM steps, guidance hooks, the bits/dim bound), respacing (`respace`), timestep
samplers for training (`resample`), and sampling: the entry point `sample` (`sampling`), the
samplers DDPM, DDIM, DPM-Solver++(2M) and (3M) (`samplers`), which timesteps they visit
(`spacing`), classifier-free guidance (`cfg`) and per-sample noise streams (`seeds`). Plain
PyTorch and numpy; nothing here knows about Ray or the networks' internals."""
from typing import Literal

from .cfg import classifier_free_guidance
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
from .samplers import SAMPLERS, ddim, ddpm, dpmpp_2m, dpmpp_3m, unipc
from .sampling import sample
from .schedules import betas_for_alpha_bar, get_named_beta_schedule
from .seeds import STREAMS, RowNoise, index_seeds
from .spacing import LOGSNR_MIN, TIMESTEP_SPACINGS, logsnr_timesteps, sampling_diffusion

__all__ = [
    "GaussianDiffusion", "SpacedDiffusion", "ModelMeanType", "ModelVarType", "LossType",
    "get_named_beta_schedule", "betas_for_alpha_bar", "space_timesteps", "respace",
    "create_gaussian_diffusion", "create_named_schedule_sampler", "ScheduleSampler",
    "UniformSampler", "LossAwareSampler", "LossSecondMomentResampler", "sample", "ddim", "ddpm",
    "dpmpp_2m", "dpmpp_3m", "unipc", "SAMPLERS", "TIMESTEP_SPACINGS", "sampling_diffusion", "LOGSNR_MIN",
    "logsnr_timesteps", "SamplerName", "SpacingName",
    "classifier_free_guidance", "index_seeds", "RowNoise", "STREAMS", "normal_kl",
    "discretized_gaussian_log_likelihood", "mean_flat",
]

# The sampler and timestep-spacing names, as types for the configs that name them.
SamplerName = Literal[tuple(sorted(SAMPLERS))]
SpacingName = Literal[TIMESTEP_SPACINGS]
