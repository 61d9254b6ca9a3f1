"""One step of every diffusion method against the reference (fixtures/diffusion_steps.pt):
q_sample, the posterior, p_mean_variance, both guidance rules, the training losses, p_sample,
ddim_sample and ddim_reverse_sample, on plain and respaced diffusions, fixed and learned
variances, classifier and analytic guidance."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from adm.compat import openai
from adm.diffusion import (
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
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


# -- small t with clipping (fixtures/adm_reference_extra/one_step_small_t.pt) -------------------
#
# At t = 0, 1 the conversions divide by √(1/ᾱ − 1) ≈ 0.01 and clipping makes the re-derived ε
# large, so the reference's float32 order of operations is what the numbers follow. A tiny
# closed-form model (see the fixture's README) stands in for a network, on a wild x_t.

SMALL_T = Path(__file__).parent / "fixtures" / "adm_reference_extra" / "one_step_small_t.pt"


@functools.lru_cache(maxsize=None)
def small_t_fixture() -> dict:
    return torch.load(SMALL_T, map_location="cpu", weights_only=True)


def tiny_model(learned: bool):
    """model(x [N,C,H,W], t [N]) -> [N, C or 2C, H, W]: 1.5·tanh(2x + 0.5·roll(x, 1, -1)) +
    t/1000, then (learned variance) v = tanh(0.8x − t/1000); t as the diffusion passes it."""

    def model(x, t, **kwargs):
        s = t.to(torch.float32).view(-1, 1, 1, 1) / 1000.0
        out = 1.5 * torch.tanh(2.0 * x + 0.5 * torch.roll(x, 1, dims=-1)) + s
        return torch.cat([out, torch.tanh(0.8 * x - s)], dim=1) if learned else out

    return model


def strong_cond_fn(x, t, **kwargs):
    """An analytic guidance gradient of order 1 (scale 2), timestep-dependent."""
    return -2.0 * x * (1 + t.view(-1, *[1] * (x.ndim - 1)) / 1000)


def small_t_diffusion(config: dict, **extra) -> SpacedDiffusion:
    """The fixture case's diffusion: `create_gaussian_diffusion` keyword arguments, or a
    SpacedDiffusion built directly (for the x_{t-1}-predicting model no flag gives)."""
    if "kwargs" in config:
        return create_gaussian_diffusion(**{**config["kwargs"], **extra})
    s = config["spaced"]
    return SpacedDiffusion(
        space_timesteps(s["steps"], s["respacing"]),
        betas=get_named_beta_schedule(s["schedule"], s["steps"]),
        model_mean_type=ModelMeanType[s["model_mean_type"]],
        model_var_type=ModelVarType[s["model_var_type"]],
        loss_type=LossType[s["loss_type"]], rescale_timesteps=s["rescale_timesteps"])


def _pmv(out: dict) -> dict:
    return {k: out[k] for k in ("mean", "variance", "log_variance", "pred_xstart")}


def _seeded(seed: int, step):
    torch.manual_seed(seed)  # the reference draws its step noise from the global generator
    return dict(step())


def small_t_results(method: str, d, case: dict, inp: dict):
    """This project's value of `method` on the fixture's inputs, shaped as the fixture's entry."""
    model = tiny_model(case["learned_sigma"])
    x, t, seed = inp["x"], inp["t"], inp["seed"]
    clipped = lambda: d.p_mean_variance(model, x, t, clip_denoised=True)  # noqa: E731
    if method == "q_sample":
        return d.q_sample(inp["x_start"], t, noise=inp["noise"])
    if method in ("q_mean_variance", "q_posterior_mean_variance"):
        m, v, lv = (d.q_mean_variance(inp["x_start"], t) if method == "q_mean_variance"
                    else d.q_posterior_mean_variance(inp["x_start"], x, t))
        return {"mean": m, "variance": v, "log_variance": lv}
    if method == "predict_xstart_from_eps":
        return d._predict_xstart_from_eps(x, t, inp["aux"])
    if method == "predict_eps_from_xstart":
        return d._predict_eps_from_xstart(x, t, inp["aux"].clamp(-1, 1))
    if method == "predict_xstart_from_xprev":
        return d._predict_xstart_from_xprev(x, t, inp["aux"])
    if method == "p_mean_variance":
        return {k: _pmv(d.p_mean_variance(model, x, t, clip_denoised=k == "clip"))
                for k in ("clip", "noclip")}
    if method == "condition_mean":
        return d.condition_mean(strong_cond_fn, clipped(), x, t)
    if method == "condition_score":
        return _pmv(d.condition_score(strong_cond_fn, clipped(), x, t))
    if method == "p_sample":
        return {k: _seeded(seed, lambda: d.p_sample(model, x, t, clip_denoised=True, cond_fn=cf))
                for k, cf in (("unguided", None), ("guided", strong_cond_fn))}
    if method == "ddim_sample":
        return {k: {"eta": e["eta"], "guided": e["guided"], "out": _seeded(seed, lambda: d.ddim_sample(
                    model, x, t, clip_denoised=True, eta=e["eta"],
                    cond_fn=strong_cond_fn if e["guided"] else None))}
                for k, e in case["ddim_sample"].items()}
    if method == "ddim_reverse_sample":
        return {k: dict(d.ddim_reverse_sample(model, x, t, clip_denoised=k == "clip"))
                for k in ("clip", "noclip")}
    if method == "training_losses":
        return {k: {"extra_kwargs": e["extra_kwargs"], "terms": small_t_diffusion(
                    case["config"], **e["extra_kwargs"]).training_losses(
                    model, inp["x_start"], t, noise=inp["noise"])}
                for k, e in case["training_losses"].items()}
    raise KeyError(method)


SMALL_T_METHODS = (
    "q_sample", "q_mean_variance", "q_posterior_mean_variance", "predict_xstart_from_eps",
    "predict_eps_from_xstart", "predict_xstart_from_xprev", "p_mean_variance", "condition_mean",
    "condition_score", "p_sample", "ddim_sample", "ddim_reverse_sample", "training_losses",
)


def small_t_tolerance(path: str) -> tuple[float, float]:
    """The README's tolerance for the fixture entry at `path` ("ddim_sample/eta0/out/sample")."""
    if path.startswith("training_losses"):
        return LOSS
    return (XSTART, 0.0) if path.split("/")[-1].startswith("predict_xstart") \
        or path.endswith("pred_xstart") else (STEP, 0.0)


def small_t_pairs(got, want, path: str):
    """(path, got, want) for every tensor of a fixture entry, recursively."""
    if isinstance(want, dict):
        for key, value in want.items():
            if isinstance(value, (torch.Tensor, dict)):
                yield from small_t_pairs(got[key], value, f"{path}/{key}")
    else:
        yield path, got, want


def small_t_cases():
    return sorted(small_t_fixture()["cases"])


def test_small_t_fixture_covers_plain_and_respaced_chains_at_t_0_and_1():
    fx = small_t_fixture()
    assert fx["inputs"]["t"].tolist() == [0, 1, 0, 1]
    spaced = [len(c["timestep_map"]) < 1000 for c in fx["cases"].values()]
    assert any(spaced) and not all(spaced)


@pytest.mark.parametrize("method", SMALL_T_METHODS)
@pytest.mark.parametrize("name", small_t_cases())
def test_one_step_at_small_t_matches_the_reference(name, method):
    fx = small_t_fixture()
    case, inp = fx["cases"][name], fx["inputs"]
    d = small_t_diffusion(case["config"])
    assert d.timestep_map == case["timestep_map"]
    with torch.no_grad():
        got = small_t_results(method, d, case, inp)
    for path, g, w in small_t_pairs(got, case[method], method):
        assert_within(g, w, *small_t_tolerance(path), f"{name} {path}")
