"""Whole loops against the reference (fixtures/ddim_loop.pt): DDIM-10 unguided and
classifier-guided, ancestral sampling respaced to 10 steps, and the bits/dim bound."""
from __future__ import annotations

import functools

import torch

from adm.compat import openai
from adm.guidance import classifier_cond_fn
from helpers import assert_within, float_state_dict, load_fixture

LOOP = 1e-3
FX = load_fixture("ddim_loop.pt")


@functools.lru_cache(maxsize=None)
def network(name: str):
    entry = load_fixture("models.pt")["models"][name]
    build = openai.create_classifier if entry["kind"] == "classifier" else openai.create_model
    model = build(entry["flags"])
    model.load_state_dict(float_state_dict(entry), strict=True)
    return model.eval()


def test_ddim_loop_unguided_and_guided():
    c = FX["ddim_sample_loop"]
    d = openai.create_diffusion(c["diffusion_flags"])
    assert d.timestep_map == c["timestep_map"]
    model = network(FX["model"])
    got = d.ddim_sample_loop(model, c["shape"], noise=c["noise"], clip_denoised=c["clip_denoised"],
                             model_kwargs=c["model_kwargs"], eta=c["eta"])
    assert_within(got, c["unguided"], LOOP, 0.0, "ddim_sample_loop unguided")
    cond_fn = classifier_cond_fn(network(FX["classifier"]), c["guided"]["classifier_scale"])
    steps = list(d.ddim_sample_loop_progressive(
        model, c["shape"], noise=c["noise"], clip_denoised=c["clip_denoised"], cond_fn=cond_fn,
        model_kwargs=c["model_kwargs"], eta=c["eta"]))
    assert len(steps) == d.num_timesteps
    assert all(set(s) == {"sample", "pred_xstart"} for s in steps)
    assert torch.is_grad_enabled()  # the generator does not leak no_grad to its consumer
    assert_within(steps[-1]["sample"], c["guided"]["sample"], LOOP, 0.0, "ddim_sample_loop guided")
    # Guidance changed the result by much more than the tolerance.
    assert (c["guided"]["sample"] - c["unguided"]).abs().max() > 20 * LOOP


def test_ancestral_loop():
    c = FX["p_sample_loop"]
    d = openai.create_diffusion(c["diffusion_flags"])
    assert d.timestep_map == c["timestep_map"]
    torch.manual_seed(c["seed"])
    got = d.p_sample_loop(network(FX["model"]), c["shape"], noise=c["noise"],
                          clip_denoised=c["clip_denoised"], model_kwargs=c["model_kwargs"])
    assert_within(got, c["sample"], LOOP, 0.0, "p_sample_loop")


def test_calc_bpd_loop():
    c = FX["calc_bpd_loop"]
    d = openai.create_diffusion(c["diffusion_flags"])
    torch.manual_seed(c["seed"])
    got = d.calc_bpd_loop(network(FX["model"]), c["x_start"], clip_denoised=c["clip_denoised"],
                          model_kwargs=c["model_kwargs"])
    assert got["vb"].shape == (2, d.num_timesteps)
    assert_within(got["vb"][:, :-1], c["vb"][:, :-1], 1e-5, 1e-3, "vb (t > 0)")
    assert_within(got["vb"][:, -1], c["vb"][:, -1], 1e-5, 1e-2, "vb (t = 0, decoder)")
    for key in ("xstart_mse", "mse"):
        assert_within(got[key], c[key], 1e-5, 1e-3, key)
    assert_within(got["total_bpd"], c["total_bpd"], 1e-5, 1e-2, "total_bpd")
    assert_within(got["prior_bpd"], c["prior_bpd"], 1e-9, 1e-3, "prior_bpd")


def test_progress_bar_is_tqdm(capsys):
    """progress=True shows tqdm's bar (on stderr) over the loop's steps; off by default."""
    d = openai.create_diffusion({"diffusion_steps": 20, "noise_schedule": "cosine",
                                 "timestep_respacing": "3"})
    model = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    d.ddim_sample_loop(model, (1, 3, 4, 4), progress=True)
    err = capsys.readouterr().err
    assert "100%|" in err and "3/3" in err
    d.ddim_sample_loop(model, (1, 3, 4, 4))
    assert capsys.readouterr().err == ""
