"""Classifier-guided DDIM-25 sampling throughput, by execution option.

    python benchmarks/sampling.py                 # CPU: a small ADM; GPU (if any): ImageNet-128
    python benchmarks/sampling.py --device cpu --batch-size 8 --repeats 3

For each variant — float32 eager, bf16 autocast, channels-last, torch.compile, and all three
together (plus fp16 autocast on CUDA) — it prints images/s of `adm.diffusion.sample` (DDIM-25,
classifier-guided, random weights), the ratio to float32 eager, seconds per step, and the
fraction of the step time spent in the classifier's backward pass (the guidance gradient),
measured in a separate instrumented run that synchronises around each backward.

On CPU it runs a small 32x32 ADM and classifier (the 2-core CI box would take minutes per image
at 128x128); when CUDA is available it runs the ImageNet-128 model and classifier of the
reference README (`adm.presets`; random weights, same FLOPs). Timing is
`torch.utils.benchmark.Timer` (CUDA synchronisation, thread count): after one warm-up run of each
variant (which also compiles), `--repeats` rounds take one `blocked_autorange` of every variant
in turn, and each variant's rounds are merged; the table gives their median.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils import benchmark

from adm.compat import openai
from adm.diffusion import sample

CONFIGS = {
    # A small ADM: class-conditional, learned sigma, BigGAN up/down, attention at 16 and 8.
    "small32": dict(
        model="--image_size 32 --num_channels 64 --num_res_blocks 2 --channel_mult 1,2,2 "
              "--attention_resolutions 16,8 --num_head_channels 32 --class_cond True "
              "--learn_sigma True --resblock_updown True --use_scale_shift_norm True "
              "--diffusion_steps 1000 --noise_schedule cosine",
        classifier="--image_size 32 --classifier_width 64 --classifier_depth 2 "
                   "--classifier_channel_mult 1,2,2 --classifier_attention_resolutions 16,8 "
                   "--classifier_pool attention",
        scale=1.0),
}


def imagenet128() -> dict:
    """The README's ImageNet-128 model and classifier (adm.presets), DDIM-25 at its scale;
    `use_fp16` is left to the variants (float32 unless one asks for autocast)."""
    from adm.presets import preset

    model = preset("128x128_diffusion")
    return dict(model={**model.model_flags, "use_fp16": False},
                classifier=preset("128x128_classifier").model_flags,
                scale=model.alternatives["ddim25"].classifier_scale)


CONFIGS["imagenet128"] = imagenet128

VARIANTS = {
    "float32 eager": {},
    "bf16 autocast": {"autocast_dtype": torch.bfloat16},
    "channels-last": {"channels_last": True},
    "torch.compile": {"compile": True},
    "bf16+CL+compile": {"autocast_dtype": torch.bfloat16, "channels_last": True, "compile": True},
}
CUDA_VARIANTS = {"fp16 autocast": {"autocast_dtype": torch.float16}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: dict, device: torch.device):
    model = openai.create_model(config["model"]).to(device).eval()
    classifier = openai.create_classifier(config["classifier"]).to(device).eval()
    with torch.no_grad():  # random, non-zero outputs (the builders zero the last layers)
        for module in (model, classifier):
            for p in module.parameters():
                if p.ndim > 1 and not p.abs().sum():
                    p.normal_(0, p.shape[1] ** -0.5)
    return model, classifier, openai.create_diffusion(config["model"])


class BackwardTimer:
    """Replaces torch.autograd.grad (which the guidance function calls) with a version that
    synchronises and times itself."""

    def __init__(self, device):
        self.device, self.durations, self._orig = device, [], torch.autograd.grad

    def __enter__(self):
        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = self._orig(*args, **kwargs)
            sync(self.device)
            self.durations.append(time.perf_counter() - start)
            return out

        torch.autograd.grad = timed
        return self

    def __exit__(self, *exc):
        torch.autograd.grad = self._orig


def prepare(name: str, options: dict, config: dict, device: torch.device, batch: int,
            steps: int, seed: int):
    """Fresh networks for one variant (channels-last converts them in place), a function that
    samples one seeded batch and its `benchmark.Timer`; returns (once, timer, warm-up seconds):
    the first run (warm-up, compilation) is timed apart."""
    model, classifier, diffusion = build(config, device)
    size = model.image_size
    shape = (batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)

    def once():
        generator = torch.Generator(device).manual_seed(seed)
        return sample(model, diffusion, shape, sampler="ddim", steps=steps, classifier=classifier,
                      classifier_scale=config["scale"], y=y, generator=generator, **options)

    sync(device)
    start = time.perf_counter()
    out = once()
    sync(device)
    warmup = time.perf_counter() - start
    assert out.shape == shape and torch.isfinite(out).all() and out.abs().max() <= 1
    timer = benchmark.Timer(stmt="once()", globals={"once": once},
                            num_threads=torch.get_num_threads(), label="guided DDIM sampling",
                            sub_label=name)
    return once, timer, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: imagenet128 on CUDA, small32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 CUDA, 8 CPU")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (ddimN respacing)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: " + ", ".join({**VARIANTS, **CUDA_VARIANTS}))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config_name = args.config or ("imagenet128" if device.type == "cuda" else "small32")
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    variants = dict(VARIANTS, **(CUDA_VARIANTS if device.type == "cuda" else {}))
    if args.variants:
        variants = {k: variants[k] for k in args.variants.split(",")}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 eager means float32
        torch.backends.cudnn.allow_tf32 = False
        what = torch.cuda.get_device_name(device)
    else:
        what = f"CPU, {torch.get_num_threads()} threads"
    print(f"# classifier-guided DDIM-{args.steps}, {config_name}, batch {batch}, {what}, "
          f"torch {torch.__version__}")

    # Warm up every variant, then time them round-robin (--repeats rounds), so that a burst of
    # load on a shared machine hits every variant alike rather than one of them.
    runs, rows = {}, {}
    config = CONFIGS[config_name]
    config = config() if callable(config) else config
    for name, options in variants.items():
        once, timer, warmup = prepare(name, options, config, device, batch, args.steps, args.seed)
        runs[name] = (once, timer)
        rows[name] = {"variant": name, "warmup_s": warmup, "measurements": []}
        print(f"  warmed up {name} ({warmup:.1f} s)", flush=True)
    for _ in range(args.repeats):
        for name, (_, timer) in runs.items():
            rows[name]["measurements"].append(timer.blocked_autorange(min_run_time=0.0))
    for name, (_, timer) in runs.items():
        # The guidance gradient's share, in a separate measurement with every backward
        # synchronised and timed (per run: backward seconds over the run's mean time).
        # Only the last timed block counts: blocked_autorange also runs untimed calls first.
        with BackwardTimer(device) as backward:
            m = timer.blocked_autorange(min_run_time=0.0)
        assert len(backward.durations) % args.steps == 0, (len(backward.durations), args.steps)
        last_block = backward.durations[-m.number_per_run * args.steps:]
        median = benchmark.Measurement.merge(rows[name].pop("measurements"))[0].median
        rows[name].update(images_per_s=batch / median, s_per_step=median / args.steps,
                          backward_fraction=sum(last_block) / m.number_per_run / m.times[-1])
    rows = list(rows.values())
    base = next((r["images_per_s"] for r in rows if r["variant"] == "float32 eager"), None)
    print("\n| variant | images/s | vs float32 eager | s/step | classifier backward share "
          "| warm-up s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['images_per_s']:.3f} | {ratio} | {r['s_per_step']:.4f} | "
              f"{100 * r['backward_fraction']:.0f}% | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
