"""Where a classifier-guided sampling step spends its time: `torch.profiler` on one step.

    python benchmarks/profile_step.py                       # the six default cases, float32 eager
    python benchmarks/profile_step.py --precision bf16 --cases quickstart:32:4

One guided DDIM step is: the model's forward, the classifier's forward and backward (the
guidance gradient ∇_x log p(y | x_t)), and the update (the diffusion's arithmetic). Each of the
four runs in its own `record_function` range; the timestep/label embeddings (the U-Net's
`time_embed` and `label_emb`, and each residual block's `emb_layers`) get a range of their own
through module hooks. Every aten op's self time is then filed by what it is (convolution,
attention, GroupNorm, SiLU, linear layers, elementwise and copies) and by the range it ran in;
"Python and dispatch" is each range's wall time minus the self time of the ops in it.

Cases are `arch:size:batch`: `quickstart` is the quickstart's model and classifier
(jobs/configs/quickstart: 32 channels), `adm128` the README's ImageNet-128 pair (adm.presets),
both built at the given image size with random weights. The profiler's own cost is part of
the wall time; the shares, not the absolute times, are the result.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import yaml
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from adm import factory
from adm.diffusion import sampling_diffusion
from adm.guidance import classifier_cond_fn
from adm.precision import AUTOCAST

ROOT = Path(__file__).resolve().parents[1]
CASES = "quickstart:32:4,quickstart:64:8,quickstart:128:2,adm128:32:4,adm128:64:8,adm128:128:2"
RANGES = ("base forward", "classifier forward", "classifier backward", "update")
# Op name fragments -> category, first match wins.
CATEGORIES = (
    ("convolution", ("conv",)),
    ("attention", ("attention", "bmm", "softmax", "baddbmm")),
    ("GroupNorm", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("linear", ("addmm", "linear", "aten::mm")),
    ("copies and casts", ("copy_", "_to_copy", "contiguous", "clone", "cat")),
)


def flags(arch: str, size: int) -> tuple[dict, dict]:
    """(model flags, classifier flags) of `arch` at image side `size`."""
    if arch == "adm128":
        from adm.presets import preset

        # The 128 px channel multipliers, which the flags leave to the image size, kept at
        # every size: the same network, on other inputs.
        model = {**preset("128x128_diffusion").model_flags, "use_fp16": False,
                 "channel_mult": "1,1,2,3,4"}
        classifier = {**preset("128x128_classifier").model_flags, "classifier_use_fp16": False,
                      "classifier_channel_mult": "1,1,2,3,4"}
    else:
        configs = ROOT / "jobs" / "configs" / "quickstart"
        model = yaml.safe_load((configs / "diffusion.yaml").read_text())["model"]["flags"]
        classifier = yaml.safe_load((configs / "classifier.yaml").read_text())["model"]["flags"]
    return {**model, "image_size": size}, {**classifier, "image_size": size}


def build(arch: str, size: int):
    model_flags, classifier_flags = flags(arch, size)
    model = factory.create_model(model_flags).eval().requires_grad_(False)
    classifier = factory.create_classifier(classifier_flags).eval().requires_grad_(False)
    with torch.no_grad():  # random, non-zero outputs (the builders zero the last layers)
        for module in (model, classifier):
            for p in module.parameters():
                if p.ndim > 1 and not p.abs().sum():
                    p.normal_(0, p.shape[1] ** -0.5)
    return model, classifier, factory.create_diffusion({**model_flags, "timestep_respacing": ""})


def embedding_ranges(model: torch.nn.Module) -> list:
    """Module hooks that run the U-Net's embedding layers in a "embedding" profiler range."""
    handles, stack = [], []
    for name, module in model.named_modules():
        if name in ("time_embed", "label_emb") or name.endswith("emb_layers"):
            def enter(*_):
                stack.append(record_function("embedding"))
                stack[-1].__enter__()

            def leave(*_):
                stack.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave)]
    return handles


def guided_step(model, classifier, diffusion, x, t, y, scale: float):
    """One classifier-guided DDIM step from x = x_t at index t [N] (the four ranges)."""
    cond = classifier_cond_fn(classifier, scale)
    grads = {}

    def model_fn(x_, t_, **kw):
        with record_function("base forward"):
            return model(x_, t_, **kw).float()

    def cond_fn(x_, t_, y=None, **kw):
        # The backward's range nests inside the forward's call: split them by timing the
        # autograd call on its own.
        real_grad = torch.autograd.grad

        def grad(*args, **kwargs):
            with record_function("classifier backward"):
                return real_grad(*args, **kwargs)

        torch.autograd.grad = grad
        try:
            with record_function("classifier forward"):
                grads["g"] = cond(x_, t_, y=y)
        finally:
            torch.autograd.grad = real_grad
        return grads["g"]

    with record_function("update"):
        return diffusion.ddim_sample(model_fn, x, t, cond_fn=cond_fn, model_kwargs={"y": y})


def ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def breakdown(prof) -> dict:
    """{range: {"wall": s, category: s, ...}} from one profiled step (ms)."""
    out = {r: {"wall": 0.0} for r in RANGES}
    for ev in prof.events():
        names = [a.name for a in ancestors(ev)]
        if ev.name in RANGES and ev.name == names[0]:
            # A range's wall time, minus the ranges nested in it (classifier backward in
            # classifier forward, the three others in update).
            inner = sum(c.cpu_time_total for c in ev.cpu_children if c.name in RANGES)
            out[ev.name]["wall"] += (ev.cpu_time_total - inner) / 1e3
            continue
        if not ev.name.startswith("aten::"):
            continue
        where = next((n for n in names if n in RANGES), None)
        if where is None:
            continue
        if "embedding" in names:
            category = "embedding"
        else:
            category = next((c for c, keys in CATEGORIES if any(k in ev.name for k in keys)),
                            "other ops")
        out[where][category] = out[where].get(category, 0.0) + ev.self_cpu_time_total / 1e3
    for r in out.values():
        r["Python and dispatch"] = max(0.0, r["wall"] - sum(v for k, v in r.items() if k != "wall"))
    return out


def profile_case(arch: str, size: int, batch: int, precision: str) -> dict:
    model, classifier, chain = build(arch, size)
    diffusion = sampling_diffusion(chain, "ddim", 25)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 12, dtype=torch.int64)
    dtype = AUTOCAST[precision]
    precision_ctx = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                     else contextlib.nullcontext())
    with precision_ctx:
        guided_step(model, classifier, diffusion, x, t, y, 1.0)  # warm-up
        start = time.perf_counter()
        guided_step(model, classifier, diffusion, x, t, y, 1.0)
        unprofiled = time.perf_counter() - start
        handles = embedding_ranges(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            guided_step(model, classifier, diffusion, x, t, y, 1.0)
        for h in handles:
            h.remove()
    return {"ranges": breakdown(prof), "step_s": unprofiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=CASES, help=f"arch:size:batch,... (default {CASES})")
    parser.add_argument("--precision", choices=sorted(AUTOCAST), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    columns = ["convolution", "attention", "GroupNorm", "SiLU", "embedding", "linear",
               "copies and casts", "other ops", "Python and dispatch"]
    print(f"# one classifier-guided DDIM step, {args.precision}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\nShares of the profiled step's wall time (%); ranges: base forward (B), classifier "
          "forward (CF), classifier backward (CB), update (U).\n")
    print("| case | step ms (unprofiled) | B | CF | CB | U | " + " | ".join(columns) + " |")
    print("|---" * (6 + len(columns)) + "|")
    for case in args.cases.split(","):
        arch, size, batch = case.split(":")
        r = profile_case(arch, int(size), int(batch), args.precision)
        ranges = r["ranges"]
        total = sum(v["wall"] for v in ranges.values())
        share = {k: 100 * v["wall"] / total for k, v in ranges.items()}
        cats = {c: 100 * sum(v.get(c, 0.0) for v in ranges.values()) / total for c in columns}
        print(f"| {arch} {size}px b{batch} | {1e3 * r['step_s']:.0f} | "
              + " | ".join(f"{share[k]:.0f}" for k in RANGES) + " | "
              + " | ".join(f"{cats[c]:.0f}" for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
