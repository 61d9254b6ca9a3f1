"""Classifier guidance in a limited interval of noise levels (`adm.diffusion.interval`): at a step
outside the interval every sampler makes exactly its unguided update and never calls the
classifier; inside, exactly today's guided update; the classifier's calls are the steps whose
σ = √((1 − ᾱ)/ᾱ) lies in (lo, hi], counted from the schedule independently."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, randomized
from adm import factory
from adm.compat import openai
from adm.diffusion import sample
from adm.diffusion.interval import check_interval, in_interval, limited, sigma
from adm.diffusion.seeds import index_seeds
from adm.diffusion.spacing import sampling_diffusion
from adm.guidance import classifier_cond_fn

SAMPLERS = ["ddim", "ddpm", "dpmpp_2m", "dpmpp_3m"]
N, STEPS = 4, 12


class Counting(torch.nn.Module):
    """The classifier, counting its forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


@pytest.fixture(scope="module")
def nets():
    model = randomized(openai.create_model(TINY_UNET_FLAGS), 1)
    classifier = randomized(openai.create_classifier(TINY_CLASSIFIER_FLAGS), 2)
    diffusion = factory.create_diffusion({**TINY_UNET_FLAGS, "timestep_respacing": ""})
    return model, classifier, diffusion


def chain_sigmas(sampler: str) -> np.ndarray:
    """σ of each step `sample` makes (noisiest first), from the cosine schedule written out."""
    T = TINY_UNET_FLAGS["diffusion_steps"]
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    betas = np.minimum(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0.999)
    abar = np.cumprod(1 - betas)
    chain = sampling_diffusion(factory.create_diffusion(
        {**TINY_UNET_FLAGS, "timestep_respacing": ""}), sampler, STEPS, None, None)
    kept = np.asarray(chain.timestep_map)[::-1]
    return np.sqrt((1 - abar[kept]) / abar[kept])


def run(nets, sampler: str, interval, scale: float = 3.0, classifier=True):
    model, clf, diffusion = nets
    counting = Counting(clf)
    out = sample(model, diffusion, (N, 3, 8, 8), sampler=sampler, steps=STEPS,
                 classifier=counting if classifier else None, classifier_scale=scale,
                 guidance_interval=interval, y=torch.arange(N), seeds=index_seeds(3, range(N)))
    return out, counting.calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_interval_of_every_step_is_todays_guidance_and_of_none_is_no_guidance(nets, sampler):
    guided, calls = run(nets, sampler, None)
    assert calls == STEPS
    everywhere, calls = run(nets, sampler, (0.0, float("inf")))
    assert torch.equal(everywhere, guided) and calls == STEPS
    unguided, _ = run(nets, sampler, None, classifier=False)
    assert not torch.equal(unguided, guided)
    nowhere, calls = run(nets, sampler, (1e6, 1e7))
    assert torch.equal(nowhere, unguided) and calls == 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_classifier_is_called_at_the_steps_inside_the_interval(nets, sampler):
    sig = chain_sigmas(sampler)
    lo, hi = float(np.sort(sig)[2]), float(np.sort(sig)[-3])  # leaves 3 steps out at each end
    inside = (sig > lo) & (sig <= hi)
    _, calls = run(nets, sampler, (lo, hi))
    assert calls == inside.sum() == STEPS - 5


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_each_step_is_the_guided_or_the_unguided_update_by_its_noise_level(nets, sampler):
    """Step by step along a limited run: from the x_t it reached, its next x is exactly the
    guided step's inside the interval and exactly the unguided step's outside (the same noise
    for DDPM)."""
    model, clf, diffusion = nets
    sig = chain_sigmas(sampler)
    lo, hi = float(np.sort(sig)[3]), float(np.sort(sig)[-4])
    chain = sampling_diffusion(diffusion, sampler, STEPS, None, None)
    cond = classifier_cond_fn(clf, 3.0)
    kw = {"y": torch.arange(N)}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 8, 8, generator=gen)
    zs = [torch.randn(N, 3, 8, 8, generator=gen) for _ in range(STEPS)]
    drawn = iter(zs)
    if sampler == "ddpm":
        step, loop = chain.p_sample, chain.p_sample_loop_progressive
    else:
        step, loop = chain.ddim_sample, chain.ddim_sample_loop_progressive
    seen = set()
    outs = loop(model, (N, 3, 8, 8), noise=x, cond_fn=limited(cond, (lo, hi)), model_kwargs=kw,
                noise_fn=lambda: next(drawn))
    for k, out in enumerate(outs):
        i = STEPS - 1 - k
        t = torch.full((N,), i)
        inside = in_interval((lo, hi), chain.alphas_cumprod[i])
        assert inside == (lo < sig[k] <= hi)
        z = (lambda: zs[k]) if i > 0 else (lambda: None)
        want = step(model, x, t, True, None, cond if inside else None, kw, noise_fn=z)
        other = step(model, x, t, True, None, None if inside else cond, kw, noise_fn=z)
        assert torch.equal(out["sample"], want["sample"])
        assert not torch.equal(out["sample"], other["sample"])
        seen.add(inside)
        x = out["sample"]
    assert seen == {True, False}


def test_intervals_are_checked():
    assert check_interval(None) is None
    assert check_interval([0.28, 5.42]) == (0.28, 5.42)
    assert check_interval((0, float("inf"))) == (0.0, float("inf"))
    for bad in ([1.0], [2.0, 1.0], [-1.0, 1.0], [float("nan"), 1.0], [1.0, 1.0]):
        with pytest.raises(ValueError, match="guidance_interval"):
            check_interval(bad)
    assert sigma(0.5) == 1.0 and in_interval((0.5, 1.0), 0.5) and not in_interval((1.0, 2.0), 0.5)


def test_the_serving_rows_call_the_classifier_only_at_steps_inside_their_interval(nets):
    """The step engine's rows (`RowStepper`): one row limited to an interval, alone: the
    classifier runs at exactly the steps `sample` calls it at, and the image is `sample`'s."""
    from adm.diffusion.rows import RowSpec, RowStepper

    model, clf, diffusion = nets
    counting = Counting(clf)
    stepper = RowStepper(model, diffusion, slots=N, image_size=8, classifier=counting)
    sig = chain_sigmas("ddim")
    lo, hi = float(np.sort(sig)[2]), float(np.sort(sig)[-3])
    spec = RowSpec("ddim", STEPS, classifier_scale=3.0, guidance_interval=(lo, hi))
    seeds = index_seeds(3, range(N))
    row = stepper.start(spec, 0, seeds[0])
    while not row.done:
        stepper.step([row])
    assert counting.calls == STEPS - 5
    counting.calls = 0
    want = sample(model, diffusion, (N, 3, 8, 8), sampler="ddim", steps=STEPS,
                  classifier=counting, classifier_scale=3.0, guidance_interval=(lo, hi),
                  y=torch.zeros(N, dtype=torch.int64), seeds=[seeds[0]] * N)
    assert counting.calls == STEPS - 5 and torch.equal(row.result, want[0])
    with pytest.raises(ValueError, match="guidance_interval"):
        stepper.chain(RowSpec("ddim", STEPS, guidance_interval=(lo, hi)))
