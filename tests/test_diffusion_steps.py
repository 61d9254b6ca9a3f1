"""One step of every diffusion method against the reference (fixtures/diffusion_steps.pt):
q_sample, the posterior, p_mean_variance, both guidance rules, the training losses, p_sample,
ddim_sample and ddim_reverse_sample, on plain and respaced diffusions, fixed and learned
variances, classifier and analytic guidance."""
from __future__ import annotations

import functools

import pytest
import torch

from adm.compat import openai
from adm.guidance import classifier_cond_fn
from helpers import assert_within, fixture_network, load_fixture

STEP, XSTART, LOSS = 5e-5, 5e-3, (1e-5, 1e-2)  # the README's tolerances
CASES = sorted(load_fixture("diffusion_steps.pt")["cases"])


network = functools.lru_cache(maxsize=None)(fixture_network)  # shared across the cases


def analytic_cond_fn(x, t, **kwargs):
    """The fixtures' analytic guidance: it shows which timesteps the diffusion passes."""
    return -0.1 * x * (1 + t.view(-1, *[1] * (x.ndim - 1)) / 1000)


def cond_fn_of(case):
    if case["cond_fn"] == "classifier":
        return classifier_cond_fn(network(case["classifier"]), case["classifier_scale"])
    return analytic_cond_fn


def check_out(got: dict, want: dict, what: str):
    for key, value in want.items():
        tol = XSTART if key == "pred_xstart" else STEP
        assert_within(got[key], value, tol, 0.0, f"{what}[{key}]")


@pytest.fixture(params=CASES)
def case(request):
    return request.param, load_fixture("diffusion_steps.pt")["cases"][request.param]


def test_forward_process_and_posterior(case):
    name, c = case
    d = openai.create_diffusion(c["diffusion_flags"])
    assert d.timestep_map == c["timestep_map"]
    x_t = d.q_sample(c["x_start"], c["t"], noise=c["noise"])
    assert_within(x_t, c["q_sample"], STEP, 0.0, f"{name} q_sample")
    mean, var, log_var = d.q_posterior_mean_variance(c["x_start"], c["q_sample"], c["t"])
    check_out({"mean": mean, "variance": var, "log_variance": log_var},
              c["q_posterior_mean_variance"], f"{name} q_posterior_mean_variance")


@torch.no_grad()
def test_p_mean_variance_and_guidance(case):
    name, c = case
    d, model, kw = openai.create_diffusion(c["diffusion_flags"]), network(c["model"]), c["model_kwargs"]
    x_t = c["q_sample"]
    for clip in ("clip", "noclip"):
        out = d.p_mean_variance(model, x_t, c["t"], clip_denoised=clip == "clip", model_kwargs=kw)
        check_out(out, c["p_mean_variance"][clip], f"{name} p_mean_variance[{clip}]")
    pmv = d.p_mean_variance(model, x_t, c["t"], clip_denoised=True, model_kwargs=kw)
    cond_fn = cond_fn_of(c)
    assert_within(d.condition_mean(cond_fn, pmv, x_t, c["t"], model_kwargs=kw),
                  c["condition_mean"], STEP, 0.0, f"{name} condition_mean")
    check_out(d.condition_score(cond_fn, pmv, x_t, c["t"], model_kwargs=kw),
              c["condition_score"], f"{name} condition_score")


@torch.no_grad()
def test_training_losses(case):
    name, c = case
    model = network(c["model"])
    for kind, entry in c["training_losses"].items():
        d = openai.create_diffusion(entry["diffusion_flags"])
        terms = d.training_losses(model, c["x_start"], c["t"], model_kwargs=c["model_kwargs"],
                                  noise=c["noise"])
        assert sorted(terms) == sorted(entry["terms"]), f"{name} {kind}: keys {sorted(terms)}"
        for key, want in entry["terms"].items():
            assert_within(terms[key], want, *LOSS, f"{name} training_losses[{kind}][{key}]")


@torch.no_grad()
def test_sampling_steps(case):
    name, c = case
    d, model, kw = openai.create_diffusion(c["diffusion_flags"]), network(c["model"]), c["model_kwargs"]
    x_t, t = c["q_sample"], c["t"]
    torch.manual_seed(c["seed"])
    assert torch.equal(torch.randn_like(x_t), c["noise_drawn"])
    for kind, want in c["p_sample"].items():
        torch.manual_seed(c["seed"])
        got = d.p_sample(model, x_t, t, clip_denoised=True, model_kwargs=kw,
                         cond_fn=cond_fn_of(c) if kind == "guided" else None)
        check_out(got, want, f"{name} p_sample[{kind}]")
    for kind, entry in c["ddim_sample"].items():
        torch.manual_seed(c["seed"])
        got = d.ddim_sample(model, x_t, t, clip_denoised=True, model_kwargs=kw, eta=entry["eta"],
                            cond_fn=cond_fn_of(c) if entry["guided"] else None)
        check_out(got, entry["out"], f"{name} ddim_sample[{kind}]")
    for kind, want in c["ddim_reverse_sample"].items():
        got = d.ddim_reverse_sample(model, x_t, t, clip_denoised=kind == "clip", model_kwargs=kw)
        check_out(got, want, f"{name} ddim_reverse_sample[{kind}]")


@torch.no_grad()
def test_sampling_steps_with_explicit_generator(case):
    """`generator=` draws the same noise a seeded global generator would: the fast sampler's
    path equals the reference's."""
    name, c = case
    d, model, kw = openai.create_diffusion(c["diffusion_flags"]), network(c["model"]), c["model_kwargs"]
    g = torch.Generator().manual_seed(c["seed"])
    got = d.p_sample(model, c["q_sample"], c["t"], clip_denoised=True, model_kwargs=kw, generator=g)
    check_out(got, c["p_sample"]["unguided"], f"{name} p_sample(generator)")
    g = torch.Generator().manual_seed(c["seed"])
    entry = c["ddim_sample"]["eta0.5"]
    got = d.ddim_sample(model, c["q_sample"], c["t"], clip_denoised=True, model_kwargs=kw,
                        eta=entry["eta"], generator=g)
    check_out(got, entry["out"], f"{name} ddim_sample(generator)")
