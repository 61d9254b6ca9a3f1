"""The sampling entry point `adm.diffusion.sample`: the reference's DDIM-10 (guided and not) and
ancestral loops through it, respacing by `steps`, seeds and per-sample noise, channels-last,
autocast and torch.compile options, the upsampler's extra inputs under guidance (against a loop
written out here), and an unconditional model guided by a classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from adm.compat import openai
from adm.diffusion import index_seeds, respace, sample
from helpers import (TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, assert_within, fixture_network,
                     load_fixture, randomized)

LOOP = 1e-3
FX = load_fixture("ddim_loop.pt")


network = fixture_network  # fresh each call: some tests convert it to channels-last


@pytest.fixture(scope="module")
def nets():
    return {"model": network(FX["model"]), "classifier": network(FX["classifier"])}


def test_reference_guided_ddim_loop(nets):
    """The reference's classifier-guided DDIM-10, from the un-respaced diffusion respaced by
    `steps` (an int: "ddim10")."""
    c = FX["ddim_sample_loop"]
    base = openai.create_diffusion({**c["diffusion_flags"], "timestep_respacing": ""})
    got = sample(nets["model"], base, c["shape"], steps=10, y=c["model_kwargs"]["y"],
                 noise=c["noise"], classifier=nets["classifier"],
                 classifier_scale=c["guided"]["classifier_scale"])
    assert got.dtype == torch.float32 and got.shape == tuple(c["shape"])
    assert_within(got, c["guided"]["sample"], LOOP, 0.0, "sample ddim guided, steps=10")


def test_reference_ancestral_loop(nets):
    c = FX["p_sample_loop"]
    base = openai.create_diffusion({**c["diffusion_flags"], "timestep_respacing": ""})
    y = c["model_kwargs"]["y"]
    got = sample(nets["model"], base, c["shape"], sampler="ddpm", steps=10, y=y, noise=c["noise"],
                 generator=torch.Generator().manual_seed(c["seed"]))
    assert_within(got, c["sample"], LOOP, 0.0, "sample ddpm, generator")
    torch.manual_seed(c["seed"])  # without a generator: the global one, as the reference
    got = sample(nets["model"], base, c["shape"], sampler="ddpm", steps="10", y=y, noise=c["noise"])
    assert_within(got, c["sample"], LOOP, 0.0, "sample ddpm, global generator")


def test_channels_last_matches_the_reference():
    c = FX["ddim_sample_loop"]
    model, classifier = network(FX["model"]), network(FX["classifier"])
    got = sample(model, openai.create_diffusion(c["diffusion_flags"]), c["shape"],
                 y=c["model_kwargs"]["y"], noise=c["noise"], classifier=classifier,
                 classifier_scale=c["guided"]["classifier_scale"], channels_last=True)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert got.is_contiguous()
    assert_within(got, c["guided"]["sample"], LOOP, 0.0, "sample ddim guided, channels_last")


def small_setup():
    """The 32x32 unconditional U-Net, a 4-step DDIM diffusion, and a linear classifier on it."""
    model = network("unet_uncond")
    d = openai.create_diffusion({**load_fixture("models.pt")["models"]["unet_uncond"]["flags"],
                                 "timestep_respacing": "ddim4"})
    classifier = LinearClassifier((3, 32, 32))
    return model, d, classifier


class LinearClassifier(nn.Module):
    def __init__(self, shape, classes=10):
        super().__init__()
        self.linear = nn.Linear(int(np.prod(shape)), classes)
        with torch.no_grad():
            self.linear.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t):
        return self.linear(x.flatten(1))


def test_seeds_and_per_sample_noise():
    model, d, _ = small_setup()
    shape = (3, 3, 32, 32)
    a = sample(model, d, shape, generator=torch.Generator().manual_seed(1), eta=0.5)
    b = sample(model, d, shape, generator=torch.Generator().manual_seed(1), eta=0.5)
    c = sample(model, d, shape, generator=torch.Generator().manual_seed(2), eta=0.5)
    assert torch.equal(a, b) and (a - c).abs().max() > 0.1
    assert a.min() >= -1 and a.max() <= 1
    # Per-sample starting noise at eta = 0: each sample is its own, whatever the batch order.
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    full = sample(model, d, shape, noise=noise)
    perm = torch.tensor([2, 0, 1])
    permuted = sample(model, d, shape, noise=noise[perm])
    alone = sample(model, d, (1, 3, 32, 32), noise=noise[1:2])
    # (kernels may sum in another order for another batch size: float32 rounding only)
    torch.testing.assert_close(permuted, full[perm], rtol=0, atol=1e-4)
    torch.testing.assert_close(alone, full[1:2], rtol=0, atol=1e-4)


def test_unconditional_model_guided_by_a_classifier():
    """As the paper's unconditional 256x256 model: y goes to the classifier only (the U-Net
    refuses a y it has no embedding for)."""
    model, d, classifier = small_setup()
    shape, y = (2, 3, 32, 32), torch.tensor([1, 7])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    plain = sample(model, d, shape, noise=noise)
    guided = sample(model, d, shape, noise=noise, classifier=classifier, classifier_scale=20.0, y=y)
    assert (guided - plain).abs().max() > 0.05
    logits = lambda x: classifier(x, None).log_softmax(-1).gather(1, y[:, None]).sum()  # noqa: E731
    with torch.no_grad():
        assert logits(guided) > logits(plain)  # guidance raised log p(y | x_0)


def test_precision_and_compile_options():
    model, d, classifier = small_setup()
    shape, y = (2, 3, 32, 32), torch.tensor([1, 7])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    kw = dict(noise=noise, classifier=classifier, classifier_scale=5.0, y=y)
    want = sample(model, d, shape, **kw)
    bf16 = sample(model, d, shape, autocast_dtype=torch.bfloat16, **kw)
    assert bf16.dtype == torch.float32
    err = (bf16 - want).abs().mean()
    assert 0 < err < 0.05, err  # bf16's rounding, not a different computation
    compiled = sample(model, d, shape, compile={"backend": "aot_eager"}, **kw)
    torch.testing.assert_close(compiled, want, rtol=0, atol=1e-4)
    assert all(p.requires_grad for p in classifier.parameters())  # restored after compiling


def test_upsampler_with_guidance_against_a_written_out_loop():
    """DDIM-3 with the upsampler (low_res and y as model inputs) and classifier guidance, against
    the algorithm written out from the paper (ADM algorithm 2, η = 0)."""
    upsampler, classifier = network("upsampler"), network("classifier_attention")
    flags = load_fixture("models.pt")["models"]["upsampler"]["flags"]
    d = openai.create_diffusion({**flags, "timestep_respacing": "ddim3"})
    g = torch.Generator().manual_seed(6)
    shape, y = (2, 3, 64, 64), torch.tensor([3, 11])
    low_res = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    scale = 8.0
    got = sample(upsampler, d, shape, noise=noise, y=y, model_kwargs={"low_res": low_res},
                 classifier=classifier, classifier_scale=scale)

    abar = torch.from_numpy(d.alphas_cumprod).float()
    x = noise
    for i in reversed(range(d.num_timesteps)):
        t = torch.full((2,), d.timestep_map[i])
        with torch.no_grad():
            eps = upsampler(x, t, low_res=low_res, y=y)[:, :3]
        x0 = ((x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()).clamp(-1, 1)
        eps = (x - abar[i].sqrt() * x0) / (1 - abar[i]).sqrt()
        x_in = x.detach().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x_in, t), -1)[torch.arange(2), y].sum()
        grad = torch.autograd.grad(log_p, x_in)[0]
        eps = eps - (1 - abar[i]).sqrt() * scale * grad
        x0 = (x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
        abar_prev = abar[i - 1] if i > 0 else torch.tensor(1.0)
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    assert (x.clamp(-1, 1) - sample(upsampler, d, shape, noise=noise, y=y,
                                   model_kwargs={"low_res": low_res})).abs().max() > 0.01
    assert_within(got, x.clamp(-1, 1), LOOP, 0.0, "upsampler, guided DDIM-3")


def test_argument_errors():
    model, d, classifier = small_setup()
    shape = (2, 3, 32, 32)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, d, shape, sampler="euler")
    with pytest.raises(ValueError, match="labels"):
        sample(model, d, shape, classifier=classifier)
    with pytest.raises(ValueError, match="noise"):
        sample(model, d, shape, noise=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="eta"):
        sample(model, d, shape, sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="'ddim999'"):
        sample(model, d, shape, steps="ddim999")
    with pytest.raises(ValueError, match="seeds and generator"):
        sample(model, d, shape, seeds=[1, 2], generator=torch.Generator())
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sample(model, d, shape, seeds=[1, 2, 3])


# -- per-sample noise streams -----------------------------------------------------------------

TINY = TINY_UNET_FLAGS
TINY_CLASSIFIER = TINY_CLASSIFIER_FLAGS


@pytest.fixture(scope="module")
def tiny():
    return {"model": randomized(openai.create_model(TINY)),
            "classifier": randomized(openai.create_classifier(TINY_CLASSIFIER), seed=2),
            "diffusion": openai.create_diffusion(TINY)}


def test_index_seeds_are_per_index_and_per_stream():
    a = index_seeds(5, [0, 1, 2])
    assert a == index_seeds(5, np.array([0, 1, 2])) == index_seeds(5, torch.tensor([0, 1, 2]))
    assert a[1:] == index_seeds(5, [1, 2])  # a sample's seed is its own, not its position's
    assert len(set(a)) == 3 and all(0 <= s < 2**64 for s in a)
    assert set(a).isdisjoint(index_seeds(6, [0, 1, 2]))
    assert set(a).isdisjoint(index_seeds(5, [0, 1, 2], "upsampler"))


@pytest.mark.parametrize("loop,eta", [("p_sample_loop", None), ("ddim_sample_loop", 0.5),
                                      ("ddim_sample_loop", 0.0)])
def test_noise_fn_replaces_the_generator_in_the_steps(tiny, loop, eta):
    """The loops' (and so the steps') `noise_fn` is called where they would draw from a
    generator, in the same order, except for the last step's noise (multiplied by 0), which it
    is not asked for; DDIM at eta = 0 asks for x_T alone."""
    diffusion = respace(tiny["diffusion"], "4")
    shape, kw = (2, 3, 8, 8), dict(model_kwargs={"y": torch.tensor([1, 7])})
    if eta is not None:
        kw["eta"] = eta
    run = getattr(diffusion, loop)
    want = run(tiny["model"], shape, generator=torch.Generator().manual_seed(3), **kw)
    replay, calls = torch.Generator().manual_seed(3), []

    def noise_fn() -> torch.Tensor:
        calls.append(len(calls))
        return torch.randn(shape, generator=replay)

    assert torch.equal(run(tiny["model"], shape, noise_fn=noise_fn, **kw), want)
    assert len(calls) == (1 if eta == 0.0 else 4)  # x_T, then steps 3, 2, 1 (not step 0)
    other = run(tiny["model"], shape, generator=torch.Generator().manual_seed(4), **kw)
    assert (other - want).abs().max() > 0.1


@pytest.mark.parametrize("sampler,eta,guided", [("ddpm", 0.0, False), ("ddpm", 0.0, True),
                                                ("ddim", 0.5, True)])
def test_one_seeded_row_is_the_generator_loop(tiny, sampler, eta, guided):
    """A single row seeded with s draws exactly what a generator seeded with s draws in the
    diffusion's own loop (the per-row streams are the loop's noise_fn)."""
    kw = dict(sampler=sampler, eta=eta, steps=5, y=torch.tensor([4]),
              classifier=tiny["classifier"] if guided else None, classifier_scale=3.0)
    got = sample(tiny["model"], tiny["diffusion"], (1, 3, 8, 8), seeds=[123], **kw)
    want = sample(tiny["model"], tiny["diffusion"], (1, 3, 8, 8),
                  generator=torch.Generator().manual_seed(123), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
@pytest.mark.parametrize("guided", [False, True])
def test_a_sample_depends_on_its_index_alone(tiny, sampler, eta, guided):
    """15 indices sampled in batches of 3 in order and in batches of 5 in a shuffled order give
    the same sample per index (x_T and every step's noise from (seed, index) alone: a row
    given another row's noise is off by O(1)). Up to rounding: the network's kernels are not
    batch-invariant on every CPU (MKL's sgemm on an AVX-512 EPYC rounds a row by its position
    and by the call's row count), so 1e-4; bit for bit where each index keeps its row in
    equal-size calls, as the generation pipeline calls the model (tests/test_generate.py)."""
    n, seed = 15, 11
    labels = torch.arange(n) % 10
    kw = dict(sampler=sampler, eta=eta, steps=4, classifier_scale=3.0,
              classifier=tiny["classifier"] if guided else None)

    def run(order: torch.Tensor, batch: int) -> torch.Tensor:
        out = torch.empty(n, 3, 8, 8)
        for idx in order.split(batch):
            out[idx] = sample(tiny["model"], tiny["diffusion"], (len(idx), 3, 8, 8),
                              seeds=index_seeds(seed, idx), y=labels[idx], **kw)
        return out

    in_threes = run(torch.arange(n), 3)
    shuffled_fives = run(torch.randperm(n, generator=torch.Generator().manual_seed(0)), 5)
    torch.testing.assert_close(in_threes, shuffled_fives, rtol=0, atol=1e-4)
    # Not trivially equal: the samples differ from each other and from another seed's.
    assert (in_threes[0] - in_threes[1]).abs().max() > 0.1
    other = sample(tiny["model"], tiny["diffusion"], (3, 3, 8, 8),
                   seeds=index_seeds(seed + 1, [0, 1, 2]), y=labels[:3], **kw)
    assert (other - in_threes[:3]).abs().max() > 0.1
