"""Beta schedules, every per-step array, respacing and its errors against the reference
(fixtures/schedules.pt), and which timesteps the model and the guidance function see."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adm.compat import openai
from adm.diffusion import (
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    respace,
    space_timesteps,
)
from adm.diffusion.gaussian import ARRAY_NAMES
from helpers import assert_within, load_fixture

SCHEDULE = (1e-15, 1e-9)
FX = load_fixture("schedules.pt")


@pytest.mark.parametrize("key", sorted(FX["betas"]))
def test_named_beta_schedules(key):
    name, steps = key.split("_")
    got = get_named_beta_schedule(name, int(steps))
    assert got.dtype == np.float64
    assert_within(torch.from_numpy(got), FX["betas"][key], *SCHEDULE, f"betas {key}")


@pytest.mark.parametrize("group", ["derived", "spaced"])
def test_every_per_step_array(group):
    for entry in FX[group]:
        d = openai.create_diffusion(entry["diffusion_flags"])
        flags = entry["diffusion_flags"]
        what = f"{group} {flags['noise_schedule']} {flags['timestep_respacing']!r}"
        assert d.num_timesteps == entry["num_timesteps"], what
        if "timestep_map" in entry:
            assert d.timestep_map == entry["timestep_map"], what
        for name in ARRAY_NAMES:
            arr = getattr(d, name)
            assert isinstance(arr, np.ndarray) and arr.dtype == np.float64, f"{what} {name}"
            assert_within(torch.from_numpy(arr), entry[name], *SCHEDULE, f"{what} {name}")


def test_space_timesteps():
    for entry in FX["space_timesteps"]:
        got = space_timesteps(entry["num_timesteps"], entry["section_counts"])
        assert sorted(got) == entry["timesteps"], entry["section_counts"]


def test_space_timesteps_accepts_a_list_of_counts():
    assert space_timesteps(1000, [10, 10, 10]) == space_timesteps(1000, "10,10,10")
    assert space_timesteps(7, [7]) == set(range(7))


def test_respacing_errors_name_the_respacing():
    for entry in FX["space_timesteps_errors"]:
        spec, steps = entry["section_counts"], entry["num_timesteps"]
        with pytest.raises(ValueError, match=repr(spec)):
            space_timesteps(steps, spec)
        with pytest.raises(ValueError, match=repr(spec)):  # and when the diffusion is created
            create_gaussian_diffusion(steps=steps, noise_schedule="cosine", timestep_respacing=spec)
    # Respacings that cannot be made (more steps than the chain has, not numbers, empty,
    # zero or negative), through the flag interface: a FlagError (a ValueError) naming them.
    for spec in ("ddim999", "abc", "2000", "10,2000", "ddim", "ddimx", "1,,2", "-5", "0"):
        with pytest.raises(openai.FlagError, match=repr(spec)):
            openai.create_diffusion({"timestep_respacing": spec})


def test_schedule_errors():
    with pytest.raises(openai.FlagError, match="quadratic"):
        openai.create_diffusion({"noise_schedule": "quadratic"})
    with pytest.raises(openai.FlagError, match="above 1"):
        openai.create_diffusion({"noise_schedule": "linear", "diffusion_steps": 10})
    with pytest.raises(ValueError, match="diffusion_steps=0"):
        get_named_beta_schedule("cosine", 0)


def test_reference_defaults():
    d = openai.create_diffusion({})
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 1000
    assert d.timestep_map == list(range(1000)) and d.model_var_type == ModelVarType.FIXED_LARGE
    assert create_gaussian_diffusion(sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL


class Recorder(torch.nn.Module):
    """A 'model' that records the timesteps it is called with and predicts ε = 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels, self.seen = channels, []

    def forward(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return torch.zeros(x.shape[0], self.channels, *x.shape[2:])


@pytest.mark.parametrize("rescale", [False, True])
def test_model_and_guidance_see_original_timesteps(rescale):
    """For respaced index i the model, the training loss and cond_fn all get timestep_map[i]
    (as a 0..1000 float with rescale_timesteps)."""
    for entry in FX["space_timesteps"]:
        steps, spec = entry["num_timesteps"], entry["section_counts"]
        if steps < 20:  # the linear schedule needs 20 steps; the cosine one any number
            continue
        d = openai.create_diffusion({"diffusion_steps": steps, "noise_schedule": "cosine",
                                     "timestep_respacing": spec, "learn_sigma": True,
                                     "rescale_timesteps": rescale})
        want = torch.tensor(entry["timesteps"])
        if rescale:
            want = want.float() * (1000.0 / steps)
        n = d.num_timesteps
        t = torch.arange(n)
        x = torch.zeros(n, 3, 2, 2)
        model, guided = Recorder(6), []
        out = d.p_mean_variance(model, x, t)
        d.condition_mean(lambda x, ts, **kw: guided.append(ts) or torch.zeros_like(x), out, x, t)
        d.condition_score(lambda x, ts, **kw: guided.append(ts) or torch.zeros_like(x), out, x, t)
        d.training_losses(model, x, t, noise=torch.zeros_like(x))
        for seen in model.seen + guided:
            assert seen.dtype == (torch.float32 if rescale else torch.int64), spec
            assert torch.equal(seen, want), f"{spec}: {seen[:5]} != {want[:5]}"


def test_respaced_diffusion_keeps_the_marginals():
    """A respaced chain's ᾱ at index i equals the base chain's ᾱ at timestep_map[i]."""
    base = create_gaussian_diffusion(steps=4000, noise_schedule="cosine")
    for spec in ("ddim50", "10,10,10", "27"):
        d = respace(base, spec)
        assert d.original_num_steps == 4000
        assert_within(torch.from_numpy(d.alphas_cumprod),
                      torch.from_numpy(base.alphas_cumprod[d.timestep_map]), *SCHEDULE, spec)
