"""Classifier guidance: the reference's gradient (fixtures/models.pt 'guidance'), float32 under
autocast, no graph kept, and the paper's two rules checked against a classifier whose gradient is
known in closed form: the DDPM mean moves by exactly s·Σ·g and the DDIM ε by exactly
−s·√(1−ᾱ_t)·g, on plain and respaced diffusions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from adm.compat import openai
from adm.diffusion import create_gaussian_diffusion
from adm.guidance import classifier_cond_fn
from helpers import assert_within, float_state_dict, load_fixture

GUIDANCE = 5e-5


def reference_classifier():
    fx = load_fixture("models.pt")
    entry = fx["models"][fx["guidance"]["classifier"]]
    classifier = openai.create_classifier(entry["flags"])
    classifier.load_state_dict(float_state_dict(entry), strict=True)
    return classifier.eval(), fx["guidance"]


def test_reference_gradient():
    classifier, g = reference_classifier()
    x = g["x"].clone()
    got = classifier_cond_fn(classifier, g["scale"])(x, g["t"], y=g["y"])
    assert got.dtype == torch.float32 and not got.requires_grad and got.grad_fn is None
    assert_within(got, g["grad"], GUIDANCE, 0.0, "guidance gradient")
    assert torch.equal(x, g["x"]) and not x.requires_grad  # input untouched
    assert all(p.grad is None for p in classifier.parameters())  # nothing accumulated
    # Extra model inputs (the upsampler's low_res) are accepted and ignored.
    again = classifier_cond_fn(classifier, g["scale"])(x, g["t"], y=g["y"], low_res=x[:, :, ::2, ::2])
    assert torch.equal(again, got)


def test_gradient_is_float32_under_autocast():
    classifier, g = reference_classifier()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = classifier_cond_fn(classifier, g["scale"], autocast=False)(g["x"], g["t"], y=g["y"])
        mixed = classifier_cond_fn(classifier, g["scale"])(g["x"], g["t"], y=g["y"])
    assert exact.dtype == mixed.dtype == torch.float32
    assert_within(exact, g["grad"], GUIDANCE, 0.0, "gradient with autocast disabled")
    # bf16 forward/backward: the same gradient to bf16 precision, not float32's.
    rel = (mixed - g["grad"]).norm() / g["grad"].norm()
    assert 0 < rel < 0.1, rel


def test_labels_are_required():
    classifier, g = reference_classifier()
    with pytest.raises(ValueError, match="labels"):
        classifier_cond_fn(classifier, 1.0)(g["x"], g["t"])


class LinearClassifier(nn.Module):
    """logits = (1 + t/1000)·(W·vec(x) + b): ∇_x log p(y|x) = (1 + t/1000)·(W_y − Σ_k p_k W_k),
    with p = softmax(logits). The t factor shows which timesteps guidance is given."""

    def __init__(self, shape, classes=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = int(np.prod(shape))
        weight = torch.randn(classes, dim, generator=g, dtype=torch.float64) / dim ** 0.5
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.randn(classes, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        return (1 + t.double().view(-1, 1) / 1000) * (x.flatten(1) @ self.weight.T + self.bias)

    def closed_form_grad(self, x, t, y):
        """In float64 numpy, from the weights alone."""
        w, b = self.weight.detach().numpy(), self.bias.detach().numpy()
        xs, ts, ys = x.flatten(1).numpy(), t.double().numpy(), y.numpy()
        out = []
        for xi, ti, yi in zip(xs, ts, ys):
            logits = (1 + ti / 1000) * (w @ xi + b)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out.append((1 + ti / 1000) * (w[yi] - p @ w))
        return torch.from_numpy(np.stack(out)).view_as(x)


class FixedModel(nn.Module):
    """A deterministic stand-in denoiser: ε = 0.3·x + 0.1, and v = tanh(x) when learned."""

    def __init__(self, learned):
        super().__init__()
        self.learned = learned

    def forward(self, x, t, **kwargs):
        eps = 0.3 * x + 0.1
        return torch.cat([eps, torch.tanh(x)], dim=1) if self.learned else eps


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("respacing", ["", "ddim10", "30,7"])
@pytest.mark.parametrize("rescale", [False, True])
def test_guidance_moves_the_step_as_the_paper_says(learn_sigma, respacing, rescale):
    d = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=learn_sigma,
                                  timestep_respacing=respacing, rescale_timesteps=rescale)
    shape, scale = (4, 3, 4, 4), 3.5
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    y = torch.tensor([0, 3, 1, 4])
    classifier, model = LinearClassifier(shape[1:]), FixedModel(learn_sigma)
    cond_fn = classifier_cond_fn(classifier, scale)
    # The classifier is given the original chain's timesteps (rescaled when asked).
    t_seen = torch.tensor(d.timestep_map)[t].double()
    if rescale:
        t_seen = t_seen * 1000.0 / d.original_num_steps
    grad = classifier.closed_form_grad(x, t_seen, y)
    assert grad.abs().max() > 0.1
    kw = {"y": y}

    with torch.no_grad():
        out = d.p_mean_variance(model, x, t, model_kwargs=kw)
        # DDPM (algorithm 1): μ + s·Σ·g.
        mean = d.condition_mean(cond_fn, out, x, t, model_kwargs=kw)
        torch.testing.assert_close(mean - out["mean"], scale * out["variance"] * grad,
                                   rtol=1e-9, atol=1e-12)
        # The whole ancestral step moves by the same amount (same noise).
        plain = d.p_sample(model, x, t, model_kwargs=kw, generator=torch.Generator().manual_seed(1))
        guided = d.p_sample(model, x, t, model_kwargs=kw, cond_fn=cond_fn,
                            generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(guided["sample"] - plain["sample"],
                                   scale * out["variance"] * grad, rtol=1e-8, atol=1e-10)

        # DDIM (algorithm 2): ε − s·√(1−ᾱ_t)·g.
        abar = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
        abar_prev = torch.from_numpy(d.alphas_cumprod_prev)[t].view(-1, 1, 1, 1)
        eps = d._predict_eps_from_xstart(x, t, out["pred_xstart"])
        scored = d.condition_score(cond_fn, out, x, t, model_kwargs=kw)
        eps_guided = d._predict_eps_from_xstart(x, t, scored["pred_xstart"])
        delta_eps = -scale * (1 - abar).sqrt() * grad
        torch.testing.assert_close(eps_guided - eps, delta_eps, rtol=1e-8, atol=1e-10)
        # ... and the DDIM step (η = 0) moves by Δx0·√ᾱ_prev + √(1−ᾱ_prev)·Δε with
        # Δx0 = −√(1/ᾱ − 1)·Δε.
        plain = d.ddim_sample(model, x, t, model_kwargs=kw)
        guided = d.ddim_sample(model, x, t, model_kwargs=kw, cond_fn=cond_fn)
        want = (-(1 / abar - 1).sqrt() * abar_prev.sqrt() + (1 - abar_prev).sqrt()) * delta_eps
        torch.testing.assert_close(guided["sample"] - plain["sample"], want, rtol=1e-8, atol=1e-10)
