"""What per-sample determinism and the Ray pipeline cost, for `jobs/sample.py`.

    python benchmarks/generate.py noise              # per-row noise streams vs one generator
    python benchmarks/generate.py pipeline           # the chained Ray Data job vs a plain loop
    python benchmarks/generate.py pipeline --gpus    # the same on GPU actors

`noise`: the extra time of drawing each row's noise from its own generator
(`sample(..., seeds=...)`, `adm.diffusion.seeds.RowNoise`) instead of one batch generator:
the draw alone (one N-row draw against N one-row draws) and whole DDPM sampling calls with
each, on a small random-weight ADM. `torch.utils.benchmark.Timer` (CUDA-synchronised).

`pipeline`: samples/s of the chained job (base model then upsampler, random weights written to
a temporary folder as training exports them) on a local Ray, with 1 and 2 actors per stage,
against the same sampling calls in a plain loop in this process (the Ray pipeline's overhead).
Run on an otherwise idle machine: the figures are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.utils import benchmark

from adm import factory
from adm.diffusion import sample
from adm.diffusion.seeds import RowNoise, index_seeds

SMALL = {"image_size": 32, "num_channels": 64, "num_res_blocks": 1, "channel_mult": "1,2,2",
         "attention_resolutions": "8", "num_head_channels": 32, "class_cond": True,
         "num_classes": 10, "learn_sigma": True, "resblock_updown": True,
         "diffusion_steps": 1000, "noise_schedule": "cosine"}
UP = {**{k: v for k, v in SMALL.items() if k != "image_size"}, "large_size": 64,
      "small_size": 32}


def _median(stmt, glob: dict, device: torch.device) -> float:
    t = benchmark.Timer(stmt=stmt, globals=glob)
    return t.blocked_autorange(min_run_time=1.0).median


def noise(device: torch.device, batch: int, steps: int) -> None:
    shape = (batch, 3, 32, 32)
    seeds = index_seeds(0, range(batch))
    row = RowNoise(seeds, shape, device)
    gen = torch.Generator(device).manual_seed(0)
    one = _median("torch.randn(shape, generator=gen, device=device)",
                  dict(torch=torch, shape=shape, gen=gen, device=device), device)
    rows = _median("row()", dict(row=row), device)
    print(f"noise draw {shape}: one generator {one * 1e6:.1f} us, per-row {rows * 1e6:.1f} us "
          f"({rows / one:.1f}x, +{(rows - one) * 1e6:.1f} us per step)")
    model = factory.create_model(SMALL).eval().to(device)
    diffusion = factory.create_diffusion(SMALL)
    y = torch.arange(batch, device=device) % 10
    kw = dict(sampler="ddpm", steps=str(steps), y=y, device=device)
    g = dict(sample=sample, model=model, diffusion=diffusion, shape=shape, kw=kw, seeds=seeds,
             torch=torch, device=device)
    a = _median("sample(model, diffusion, shape, generator=torch.Generator(device).manual_seed(0),"
                " **kw)", g, device)
    b = _median("sample(model, diffusion, shape, seeds=seeds, **kw)", g, device)
    print(f"DDPM-{steps}, batch {batch}, small 32px ADM on {device}: one generator "
          f"{a * 1e3:.1f} ms, per-row streams {b * 1e3:.1f} ms ({(b / a - 1) * 100:+.1f}%)")


def _export(folder: str, net: torch.nn.Module, flags: dict) -> str:
    os.makedirs(folder)
    torch.save(net.state_dict(), os.path.join(folder, "model.pt"))
    with open(os.path.join(folder, "flags.json"), "w") as f:
        json.dump(flags, f)
    return os.path.join(folder, "model.pt")


def pipeline(args) -> None:
    from adm.generate import generate, load_sample_config, make_plan
    from adm.generate.pipeline import StageSampler
    from adm.runtime import init_ray

    root = tempfile.mkdtemp(prefix="adm-bench-")
    base = _export(os.path.join(root, "base"), factory.create_model(SMALL), SMALL)
    up = _export(os.path.join(root, "up"), factory.create_superres_model(UP), UP)
    init_ray(args.address)
    common = dict(model=base, upsampler=up, num_samples=args.num_samples, steps=args.steps,
                  upsampler_steps=args.steps, batch_size=args.batch_size,
                  upsampler_batch_size=args.batch_size, shard_size=args.batch_size * 4,
                  gpus=args.gpus or None, cpus_per_worker=args.cpus_per_worker)
    results = {}
    for workers in (1, 2):
        cfg = load_sample_config(None, [], out=os.path.join(root, f"out{workers}"),
                                 num_workers=workers, upsampler_workers=workers, **common)
        plan = make_plan(cfg)
        start = time.perf_counter()
        generate(plan, progress=False, log=lambda m: None)
        results[workers] = args.num_samples / (time.perf_counter() - start)
        print(f"Ray pipeline, {workers} actor(s) per stage: {results[workers]:.2f} samples/s")
    # The same work in a plain loop in this process: the two stages' actors, called directly.
    import numpy as np

    plan = make_plan(load_sample_config(None, [], out=os.path.join(root, "plain"), **common))
    stage1 = StageSampler(plan.base, 0, "fp32", True, 0.0, args.gpus)
    stage2 = StageSampler(plan.upsampler, 0, "fp32", True, 0.0, args.gpus)
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        # Ray starts CPU actors with as many torch threads as whole CPUs they reserve (1 for
        # a fraction): the 1-thread loop is the like-for-like one per actor.
        torch.set_num_threads(n)
        start = time.perf_counter()
        for s in range(0, args.num_samples, args.batch_size):
            ids = np.arange(s, min(s + args.batch_size, args.num_samples))
            stage2(stage1({"id": ids, "label": ids % 10}))
        plain = args.num_samples / (time.perf_counter() - start)
        print(f"plain loop, one process, {n} torch thread(s): {plain:.2f} samples/s; Ray "
              f"pipeline (1 actor per stage) time / plain loop time: {plain / results[1]:.2f} "
              "(wall clock; actor start-up and model loading included)")
    torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("noise", "pipeline"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--gpus", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--address")
    args = p.parse_args()
    if args.what == "noise":
        noise(torch.device(args.device), args.batch_size, args.steps)
    else:
        pipeline(args)


if __name__ == "__main__":
    main()
