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

Against the machine's limit (`--peak`, on by default): first, in the same run, the peak
convolution rate of this machine in fp32 and in bf16 (autocast): 3x3 convolutions of ADM-128's
own channel counts and feature maps (256 channels at 64 px, 512 at 32, 768 at 16, 1024 at 8),
contiguous and channels-last, each timed as the median of 5 calls after 2 warm-ups; the peak of
a precision is the best of them, in GFLOP/s (2·C_in·C_out·9·H·W·N per call). Then each case's
step gets its achieved rate, its FLOPs (the model's forward and the classifier gradient's
forward and backward, counted by `FlopCounterMode`, `adm.capacity.stage_flops`) over its
unprofiled time, and that rate as a fraction of the peak of its precision. `--fast-path` runs
the cases as the default fast path runs on this machine: the precision "auto" picks
(adm.precision) and channels-last.
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
from adm.capacity import stage_flops
from adm.diffusion import sampling_diffusion
from adm.guidance import classifier_cond_fn
from adm.precision import AUTOCAST, auto_precision

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


# ADM-128's 3x3 convolutions at its own scales: (channels, feature-map side, batch).
PEAK_SHAPES = ((256, 64, 4), (512, 32, 8), (768, 16, 16), (1024, 8, 32))


def _median_call_s(fn, warmups: int = 2, calls: int = 5) -> float:
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_conv_rates(precision: str) -> dict:
    """GFLOP/s of each of PEAK_SHAPES' convolutions, contiguous and channels-last, in
    `precision` (autocast, as the networks run); "peak" is the best."""
    dtype = AUTOCAST[precision]
    out = {}
    for channels, side, batch in PEAK_SHAPES:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval().requires_grad_(False)
        x = torch.randn(batch, channels, side, side)
        flops = 2 * channels * channels * 9 * side * side * batch
        for layout in ("contiguous", "channels-last"):
            fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
            c, xx = conv.to(memory_format=fmt), x.to(memory_format=fmt)
            ctx = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                   else contextlib.nullcontext())

            def call():
                with ctx, torch.no_grad():
                    c(xx)

            out[f"{channels}ch {side}px b{batch} {layout}"] = flops / _median_call_s(call) / 1e9
    out["peak"] = max(out.values())
    return out


def step_flops(model, classifier, size: int, batch: int) -> float:
    """FLOPs of one guided step of `batch` rows: the model's forward and the classifier
    gradient's forward and backward (the update's arithmetic is negligible)."""
    model_f, guided_f = stage_flops(model, size, batch, classifier=classifier,
                                    class_cond=model.num_classes is not None)
    return model_f + guided_f


def profile_case(arch: str, size: int, batch: int, precision: str,
                 channels_last: bool = False) -> dict:
    model, classifier, chain = build(arch, size)
    flops = step_flops(*build_meta(arch, size), size, batch)
    diffusion = sampling_diffusion(chain, "ddim", 25)
    if channels_last:
        model, classifier = (m.to(memory_format=torch.channels_last) for m in (model, classifier))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
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
    return {"ranges": breakdown(prof), "step_s": unprofiled, "flops": flops}


def build_meta(arch: str, size: int):
    """The case's two networks on the meta device (for counting FLOPs)."""
    model_flags, classifier_flags = flags(arch, size)
    with torch.device("meta"):
        return (factory.create_model(model_flags).eval(),
                factory.create_classifier(classifier_flags).eval())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=CASES, help=f"arch:size:batch,... (default {CASES})")
    parser.add_argument("--precision", choices=sorted(AUTOCAST), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fast-path", action="store_true",
                        help="the default fast path: precision 'auto' and channels-last")
    parser.add_argument("--no-peak", dest="peak", action="store_false",
                        help="skip the peak convolution rates (and the fractions of peak)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fast_path:
        args.precision = auto_precision(torch.device("cpu"))
    peaks = {}
    if args.peak:
        print(f"# peak 3x3 convolution rates, ADM-128's shapes, {torch.get_num_threads()} "
              "threads (GFLOP/s; the median of 5 calls)\n")
        print("| precision | " + " | ".join(
            f"{c}ch {s}px b{b} {lay}" for c, s, b in PEAK_SHAPES
            for lay in ("contiguous", "channels-last")) + " | peak |")
        print("|---" * (2 + 2 * len(PEAK_SHAPES)) + "|")
        for precision in sorted({"fp32", args.precision}):
            rates = peak_conv_rates(precision)
            peaks[precision] = rates["peak"]
            print(f"| {precision} | " + " | ".join(f"{v:.0f}" for v in rates.values()) + " |",
                  flush=True)
        print()
    columns = ["convolution", "attention", "GroupNorm", "SiLU", "embedding", "linear",
               "copies and casts", "other ops", "Python and dispatch"]
    print(f"# one classifier-guided DDIM step, {args.precision}"
          f"{', channels-last' if args.fast_path else ''}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\nShares of the profiled step's wall time (%); ranges: base forward (B), classifier "
          "forward (CF), classifier backward (CB), update (U). GFLOP/s: the step's FLOPs over "
          "its unprofiled time; of peak: that over the peak rate of its precision.\n")
    print("| case | step ms (unprofiled) | GFLOP/s | of peak | B | CF | CB | U | "
          + " | ".join(columns) + " |")
    print("|---" * (8 + len(columns)) + "|")
    for case in args.cases.split(","):
        arch, size, batch = case.split(":")
        r = profile_case(arch, int(size), int(batch), args.precision, args.fast_path)
        ranges = r["ranges"]
        total = sum(v["wall"] for v in ranges.values())
        share = {k: 100 * v["wall"] / total for k, v in ranges.items()}
        cats = {c: 100 * sum(v.get(c, 0.0) for v in ranges.values()) / total for c in columns}
        rate = r["flops"] / r["step_s"] / 1e9
        of_peak = f"{rate / peaks[args.precision]:.2f}" if peaks else "—"
        print(f"| {arch} {size}px b{batch} | {1e3 * r['step_s']:.0f} | {rate:.0f} | {of_peak} | "
              + " | ".join(f"{share[k]:.0f}" for k in RANGES) + " | "
              + " | ".join(f"{cats[c]:.0f}" for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
