"""Deep-feature reuse (DeepCache, `cache_interval`): the split U-Net is the U-Net bit for bit,
a shallow call on a call's own deep features is that call, k = 1 is today's sampling, the full
calls of a cached loop are an uncached run's until the first reuse, the classifier is not
cached, the shallow call's cost against the full call's, and every input is checked. (The step
engine's rows: tests/test_engine.py, whose bit-for-bit test has rows with `cache_interval`.)"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, randomized
from adm import factory
from adm.compat import openai
from adm.diffusion import sample
from adm.diffusion.deepcache import DeepCache, check_cache_interval
from adm.diffusion.samplers import SAMPLERS
from adm.diffusion.seeds import index_seeds

# Three resolution levels (8, 4, 2), so that there is a deep part under the default depth.
DEEP = {**TINY_UNET_FLAGS, "channel_mult": "1,2,2"}
UPSAMPLER = {**{k: v for k, v in DEEP.items() if k != "image_size"},
             "large_size": 16, "small_size": 8}
N, STEPS = 4, 7


@pytest.fixture(scope="module")
def nets():
    model = randomized(openai.create_model(DEEP), 1).eval()
    classifier = randomized(openai.create_classifier(TINY_CLASSIFIER_FLAGS), 2).eval()
    diffusion = factory.create_diffusion({**DEEP, "timestep_respacing": ""})
    return model, classifier, diffusion


def inputs(size: int = 8, n: int = 3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, size, size, generator=g), torch.tensor([3, 40, 97][:n]),
            torch.tensor([1, 5, 9][:n]))


@torch.no_grad()
def test_the_split_network_is_the_network_and_a_shallow_call_on_its_own_features_is_it(nets):
    model = nets[0]
    x, t, y = inputs()
    plain = model(x, t, y)
    assert model.cache_depth == 1 + DEEP["num_res_blocks"]  # the full-resolution level
    for depth in range(1, len(model.input_blocks) + 1):
        out, deep = model(x, t, y, cache_depth=depth)
        assert torch.equal(out, plain), depth
        again, kept = model(x, t, y, cache_depth=depth, deep=deep)
        assert torch.equal(again, plain) and kept is deep, depth
        # Features from another input change the output: the shallow call does use them.
        other, _ = model(x.flip(0), t.flip(0), y.flip(0), cache_depth=depth)
        assert not torch.equal(model(x, t, y, cache_depth=depth, deep=_)[0], plain), depth


@torch.no_grad()
def test_refresh_gives_each_row_the_full_call_or_the_shallow_call(nets):
    model = nets[0]
    x, t, y = inputs()
    _, stale = model(x.flip(0), t, y, cache_depth=2)
    full, fresh = model(x, t, y, cache_depth=2)
    shallow, _ = model(x, t, y, cache_depth=2, deep=stale)
    mixed, used = model(x, t, y, cache_depth=2, deep=stale, refresh=torch.tensor([True, False, True]))
    assert torch.equal(mixed[[0, 2]], full[[0, 2]]) and torch.equal(mixed[1], shallow[1])
    assert torch.equal(used[[0, 2]], fresh[[0, 2]]) and torch.equal(used[1], stale[1])


@torch.no_grad()
def test_the_upsampler_splits_the_same_way():
    net = randomized(openai.create_superres_model(UPSAMPLER), 3).eval()
    x, t, y = inputs(16)
    low = torch.rand(3, 3, 8, 8) * 2 - 1
    plain = net(x, t, low_res=low, y=y)
    out, deep = net(x, t, low_res=low, y=y, cache_depth=net.cache_depth)
    assert torch.equal(out, plain)
    assert torch.equal(net(x, t, low_res=low, y=y, cache_depth=net.cache_depth, deep=deep)[0],
                       plain)


def run(nets, sampler: str, k: int, record: list | None = None, classifier=None, **kw):
    model, clf, diffusion = nets
    handle = None
    if record is not None:  # each model call's output, and whether it was a full one
        handle = model.register_forward_hook(
            lambda m, args, kwargs, out: record.append(
                (kwargs.get("deep") is None, (out[0] if isinstance(out, tuple) else out).clone())),
            with_kwargs=True)
    try:
        return sample(model, diffusion, (N, 3, 8, 8), sampler=sampler, steps=STEPS,
                      y=torch.arange(N), seeds=index_seeds(4, range(N)), cache_interval=k,
                      classifier=classifier, classifier_scale=2.0, **kw)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_k1_is_todays_sampling_and_the_full_calls_match_until_the_first_reuse(nets, sampler):
    plain, cached = [], []
    base = run(nets, sampler, 1, plain)
    assert torch.equal(run(nets, sampler, 1), base)
    assert all(full for full, _ in plain) and len(plain) == STEPS
    k = 3
    out = run(nets, sampler, k, cached)
    assert [full for full, _ in cached] == [i % k == 0 for i in range(STEPS)]
    # Up to the first reuse (call 1) the call is the uncached run's; the reuse differs from it.
    assert torch.equal(cached[0][1], plain[0][1])
    assert (cached[1][1] - plain[1][1]).abs().max() > 1e-3
    assert not torch.equal(out, base)


def test_a_reused_call_is_the_shallow_blocks_on_the_last_full_calls_features(nets):
    """Call 1 of a k = 2 loop, recomputed independently: the network split by hand at the
    default depth, with the deep features of call 0's inputs."""
    model = nets[0]
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].clone(), args[1].clone(),
                                             kwargs["y"].clone())), with_kwargs=True)
    calls = []
    try:
        run(nets, "ddim", 2, calls)
    finally:
        handle.remove()
    with torch.no_grad():
        (x0, t0, y0), (x1, t1, y1) = seen[:2]
        _, deep = model(x0, t0, y0, cache_depth=model.cache_depth)
        want, _ = model(x1, t1, y1, cache_depth=model.cache_depth, deep=deep)
    assert torch.equal(calls[1][1], want)


def test_the_classifier_gradient_is_not_cached(nets):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            calls.append(1)
            return self.net(x, t)

    run(nets, "unipc", 3, classifier=Counting(nets[1]))
    assert len(calls) == STEPS


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def test_a_shallow_call_costs_the_full_call_less_its_deep_part(nets):
    """Measured in FLOPs (FlopCounterMode, exact and machine-independent): the shallow call
    plus the deep part alone (the blocks under the split, run by hand) is the full call, and at
    the default depth of this three-level U-Net the shallow call is a fraction of it."""
    model = nets[0]
    x, t, y = inputs()
    _, deep = model(x, t, y, cache_depth=model.cache_depth)
    full = flops(lambda: model(x, t, y))
    shallow = flops(lambda: model(x, t, y, cache_depth=model.cache_depth, deep=deep))
    emb = model.time_embed(torch.zeros(3, model.model_channels)) + model.label_emb(y)
    h = x
    for block in model.input_blocks[:model.cache_depth]:
        h = block(h, emb)
    part = flops(lambda: model._deep(h, emb, model.cache_depth))
    assert shallow + part == full
    assert 0.2 < shallow / full < 0.6, shallow / full


def test_cache_intervals_and_depths_are_checked(nets):
    for bad in (0, -1, 11, 1.5, True, "2"):
        with pytest.raises(ValueError, match="cache_interval"):
            check_cache_interval(bad)
    model, clf, _ = nets
    with pytest.raises(ValueError, match="cache_depth"):
        run(nets, "ddim", 2, cache_depth=len(model.input_blocks) + 1)
    with pytest.raises(ValueError, match="cache_depth is where"):
        run(nets, "ddim", 1, cache_depth=1)
    with pytest.raises(ValueError, match="U-Net"):
        DeepCache(clf, 2)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="need a cache_depth"):
        model(x, t, y, deep=torch.zeros(1))
    with pytest.raises(ValueError, match="pass deep"):
        model(x, t, y, cache_depth=2, refresh=torch.ones(3, dtype=torch.bool))


@pytest.mark.slow
def test_deep_feature_reuse_works_under_compile_with_static_shapes(nets):
    """torch.compile (static shapes) of a cached loop: the full and the shallow call are one
    graph each, a second loop recompiles nothing, and the samples are the eager ones up to
    inductor's float reassociation."""
    # The smallest U-Net with a deep part (two levels, no attention): compiling is the cost.
    small = (randomized(openai.create_model({**TINY_UNET_FLAGS, "num_res_blocks": 0,
                                             "attention_resolutions": ""}), 1).eval(), *nets[1:])
    torch._dynamo.reset()
    eager = run(small, "unipc", 2)
    compiled = run(small, "unipc", 2, compile=True)
    torch.testing.assert_close(compiled, eager, atol=2e-4, rtol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(small, "unipc", 2, compile=True)
    assert torch.equal(again, compiled)
