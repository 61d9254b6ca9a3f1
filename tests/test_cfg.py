"""Classifier-free guidance: the null class (one more label-embedding row, only with
`class_dropout_prob` > 0, so released checkpoints load unchanged), label dropout in training
(its rate and its reproducibility from the step's seed), and `sample(..., cfg_scale=w)`: one
batched call, ε = ε_null + w·(ε_cond − ε_null), Σ from the conditional half, with every sampler,
the per-row seeds path and classifier guidance."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from adm import checkpoints
from adm.compat import openai
from adm.diffusion import (classifier_free_guidance, create_gaussian_diffusion, ddim,
                           index_seeds, sample, sampling_diffusion)
from adm.data import DataConfig
from adm.train.config import ModelSection, TrainConfig, load_config
from adm.train.loop import step_seed
from adm.train.objectives import DiffusionObjective
from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, fixture_network, load_fixture

ROOT = Path(__file__).resolve().parents[1]
CFG_FLAGS = {**TINY_UNET_FLAGS, "class_dropout_prob": 0.2}


class KnownOutputs(nn.Module):
    """A class-conditional learned-Σ "model" whose outputs are known per label: ε = a_y·x + b_y
    and v = c_y (label 4 is the null class); it counts its calls and their batch sizes."""

    num_classes, null_label = 4, 4

    def __init__(self):
        super().__init__()
        self.a = torch.tensor([0.1, 0.2, 0.3, 0.4, -0.2])
        self.b = torch.tensor([0.05, -0.05, 0.1, 0.0, 0.2])
        self.c = torch.tensor([0.5, -0.5, 0.2, 0.0, -0.9])
        self.batches: list[int] = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        view = (-1, 1, 1, 1)
        eps = self.a[y].view(view) * x + self.b[y].view(view)
        return torch.cat([eps, self.c[y].view(view).expand_as(x)], 1)


class Combined(nn.Module):
    """The guided model written out: ε = ε(null) + w·(ε(y) − ε(null)), v = v(y)."""

    num_classes = 4

    def __init__(self, model: KnownOutputs, w: float):
        super().__init__()
        self.model, self.w = model, w

    def forward(self, x, t, y):
        cond = self.model(x, t, y)
        null = self.model(x, t, torch.full_like(y, 4))
        return torch.cat([null[:, :3] + self.w * (cond[:, :3] - null[:, :3]), cond[:, 3:]], 1)


def test_guided_output_is_the_combination_of_eps_in_one_call():
    model = KnownOutputs()
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    y, t = torch.tensor([0, 2, 3]), torch.tensor([5, 5, 5])
    guided = classifier_free_guidance(model, 3.0, 4)(x, t, y=y)
    assert model.batches == [6]  # conditional and null halves in one call
    want = Combined(KnownOutputs(), 3.0)(x, t, y)
    torch.testing.assert_close(guided, want, rtol=0, atol=1e-6)
    assert not torch.allclose(guided[:, :3], model(x, t, y)[:, :3])  # w = 3 guides
    assert torch.equal(guided[:, 3:], model(x, t, y)[:, 3:])  # v: the conditional half's


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_every_sampler_guides_eps_and_takes_sigma_from_the_conditional_half(sampler):
    """`sample(cfg_scale=w)` is `sample` of the written-out guided model, step for step (DDPM
    also uses the learned Σ, so a Σ from the null half would show), with a generator and with
    per-row seeds; and w = 1 is plain conditional sampling, bitwise."""
    d = create_gaussian_diffusion(steps=50, learn_sigma=True, noise_schedule="cosine")
    model, shape, y = KnownOutputs(), (4, 3, 4, 4), torch.tensor([0, 1, 2, 3])
    kw = dict(sampler=sampler, steps=8, y=y, clip_denoised=False)
    for noise_kw in ({"generator": 1}, {"seeds": index_seeds(0, range(4))}):
        def run(m, **more):
            extra = dict(noise_kw)
            if "generator" in extra:
                extra["generator"] = torch.Generator().manual_seed(extra["generator"])
            return sample(m, d, shape, **kw, **extra, **more)

        guided = run(model, cfg_scale=2.5)
        torch.testing.assert_close(guided, run(Combined(model, 2.5)), rtol=0, atol=1e-5)
        assert (guided - run(model)).abs().max() > 0.05
        model.batches.clear()
        assert torch.equal(run(model, cfg_scale=1.0), run(model))  # 1 = off
        assert set(model.batches) == {4}


def tiny_net(flags: dict, seed: int = 1) -> nn.Module:
    """A model of `flags` with every parameter drawn N(0, 0.1²) (ADM zero-initialises its
    output layers, which would make every label's output the same)."""
    build = openai.create_classifier if "classifier_width" in flags else openai.create_model
    module = build(flags)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def test_a_real_unet_at_w_one_and_with_classifier_guidance():
    """The batched path on an ADM U-Net with a null class: at w = 1 it gives plain conditional
    sampling (to float32 rounding: one call on a doubled batch); w = 3 with a classifier is the
    two guidances composed (ε combined, then ε' = ε − √(1−ᾱ)·g with the true labels)."""
    model, classifier = tiny_net(CFG_FLAGS), tiny_net(TINY_CLASSIFIER_FLAGS, seed=2)
    d = openai.create_diffusion(CFG_FLAGS)
    shape, y = (3, 3, 8, 8), torch.tensor([1, 5, 9])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    plain = sample(model, d, shape, steps=5, noise=noise, y=y)
    # (`sample` skips the wrapper at w = 1; here it is forced on, on the same 5 steps)
    forced = classifier_free_guidance(lambda x, t, y: model(x, t, y=y), 1.0, model.null_label)
    at_one = ddim(sampling_diffusion(d, "ddim", 5), forced, noise, model_kwargs={"y": y})
    torch.testing.assert_close(at_one.clamp(-1, 1), plain, rtol=0, atol=1e-5)

    kw = dict(steps=4, noise=noise, y=y, classifier=classifier, classifier_scale=20.0)
    both = sample(model, d, shape, cfg_scale=3.0, **kw)

    class WrittenOut(nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            cond, null = model(x, t, y=y), model(x, t, y=torch.full_like(y, 10))
            return torch.cat([null[:, :3] + 3.0 * (cond[:, :3] - null[:, :3]), cond[:, 3:]], 1)

    torch.testing.assert_close(both, sample(WrittenOut(), d, shape, **kw), rtol=0, atol=1e-4)
    assert (both - sample(model, d, shape, cfg_scale=3.0, steps=4, noise=noise, y=y)
            ).abs().max() > 0.01  # the classifier still guides


def test_per_row_seeds_with_cfg_depend_on_the_index_alone():
    model = tiny_net(CFG_FLAGS)
    d = openai.create_diffusion(CFG_FLAGS)
    labels = torch.arange(6) % 10
    kw = dict(sampler="ddpm", steps=4, cfg_scale=2.0)
    full = sample(model, d, (6, 3, 8, 8), seeds=index_seeds(4, range(6)), y=labels, **kw)
    part = sample(model, d, (3, 3, 8, 8), seeds=index_seeds(4, [5, 1, 3]), y=labels[[5, 1, 3]],
                  **kw)
    torch.testing.assert_close(part, full[[5, 1, 3]], rtol=0, atol=1e-5)
    assert (full[0] - full[1]).abs().max() > 0.1


def test_cfg_errors():
    no_null = tiny_net(TINY_UNET_FLAGS)
    d = openai.create_diffusion(TINY_UNET_FLAGS)
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        sample(no_null, d, (2, 3, 8, 8), steps=2, y=torch.tensor([0, 1]), cfg_scale=2.0)
    with pytest.raises(ValueError, match="needs labels y"):
        sample(tiny_net(CFG_FLAGS), d, (2, 3, 8, 8), steps=2, cfg_scale=2.0)
    assert sample(no_null, d, (2, 3, 8, 8), steps=2, y=torch.tensor([0, 1]),
                  cfg_scale=1.0).shape == (2, 3, 8, 8)  # w = 1 is off: any model


def test_null_row_only_with_dropout_and_released_checkpoints_load():
    with_null, without = openai.create_model(CFG_FLAGS), openai.create_model(TINY_UNET_FLAGS)
    assert with_null.label_emb.weight.shape[0] == 11 and with_null.null_label == 10
    assert without.label_emb.weight.shape[0] == 10 and without.null_label is None
    assert openai.create_model({**TINY_UNET_FLAGS, "class_dropout_prob": 0}).state_dict().keys() \
        == without.state_dict().keys()
    # A released-format state dict (the reference's class-conditional fixture model) loads
    # strictly at the default p = 0, and is refused, naming the shape, with a null row.
    fx = load_fixture("models.pt")["models"]
    name = next(n for n, e in fx.items() if e["kind"] == "unet" and e["flags"].get("class_cond"))
    released = fixture_network(name).state_dict()
    checkpoints.check_state_dict(openai.create_model(fx[name]["flags"]), released)
    with pytest.raises(checkpoints.CheckpointError, match="label_emb.weight"):
        checkpoints.check_state_dict(
            openai.create_model({**fx[name]["flags"], "class_dropout_prob": 0.1}), released)
    with pytest.raises(openai.FlagError, match="needs class_cond"):
        openai.create_model({**TINY_UNET_FLAGS, "class_cond": False, "class_dropout_prob": 0.1})
    with pytest.raises(openai.FlagError, match=r"must be in \[0, 1\)"):
        openai.create_model({**CFG_FLAGS, "class_dropout_prob": 1.0})


class RecordsLabels(nn.Module):
    """Records the labels the objective feeds it and looks them up in the real model's label
    embedding (an IndexError without the null row); returns a zero output of the real model's
    shape, as the U-Net's forward pass itself is not what is tested here (and costs seconds)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x, t, y=None):
        self.seen.append(y.clone())
        self.model.label_emb(y)
        return torch.zeros(x.shape[0], self.model.out_channels, *x.shape[2:])


def dropped_labels(p: float, steps: int = 12, batch: int = 64, seed: int = 0):
    """The labels the diffusion objective trains a tiny model on for `steps` steps, each step
    reseeded as the training loop reseeds it; returns (labels given, labels seen, model)."""
    cfg = TrainConfig(kind="diffusion", model=ModelSection(
        flags={**TINY_UNET_FLAGS, "class_dropout_prob": p}), data=DataConfig(uri="unread"))
    objective = DiffusionObjective(cfg, torch.device("cpu"))
    net = RecordsLabels(openai.create_model(cfg.model_flags))
    given = torch.arange(steps * batch).view(steps, batch) % 10
    for step in range(steps):
        objective.reseed(step_seed(seed, 0, step))
        with torch.no_grad():
            objective.losses(net, {"image": torch.zeros(batch, 3, 8, 8), "label": given[step]})
    return given, torch.stack(net.seen), net.model


def test_label_dropout_rate_and_reproducibility():
    given, seen, model = dropped_labels(0.25)
    dropped = seen == 10
    # 768 labels: the fraction's standard deviation is 0.016; 0.05 is three of them.
    assert abs(dropped.float().mean().item() - 0.25) < 0.05, dropped.float().mean()
    assert torch.equal(seen[~dropped], given[~dropped])  # the others are the given labels
    assert model.label_emb.weight.shape[0] == 11
    again = dropped_labels(0.25)[1]
    assert torch.equal(again, seen)  # the same seed: the same dropouts
    other = dropped_labels(0.25, seed=1)[1]
    assert not torch.equal(other == 10, dropped)
    given, seen, model = dropped_labels(0.0)
    assert torch.equal(seen, given) and model.label_emb.weight.shape[0] == 10


def test_quickstart_cfg_config():
    """diffusion_cfg.yaml is diffusion.yaml with label dropout 0.1 (and its own run name)."""
    cfg_path = ROOT / "jobs/configs/quickstart/diffusion_cfg.yaml"
    plain_path = ROOT / "jobs/configs/quickstart/diffusion.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    assert raw["model"]["flags"].pop("class_dropout_prob") == 0.1
    assert raw["run"].pop("name") == "quickstart-diffusion-cfg"
    plain_raw = yaml.safe_load(plain_path.read_text())
    plain_raw["run"].pop("name")
    assert raw == plain_raw, "diffusion_cfg.yaml drifted from diffusion.yaml"
    cfg, plain = load_config(str(cfg_path)), load_config(str(plain_path))
    assert cfg.model_flags == {**plain.model_flags, "class_dropout_prob": 0.1}
    assert plain.model_flags["class_dropout_prob"] == 0.0
    assert openai.create_model(cfg.model_flags).null_label == cfg.model_flags["num_classes"]
