"""Guided sampling throughput: by execution option, and by sampler and guidance.

    python benchmarks/sampling.py                 # CPU: a small ADM; GPU (if any): ImageNet-128
    python benchmarks/sampling.py --device cpu --batch-size 8 --repeats 3
    python benchmarks/sampling.py --tables samplers   # only the sampler/guidance table
    python benchmarks/sampling.py --tables quality --train-deep --precision bf16 --compile \
        --quality-lambda-min -2.8

Table "variants": for each execution option — float32 eager, bf16 autocast, channels-last,
torch.compile, and all three together (plus fp16 autocast on CUDA) — images/s of
`adm.diffusion.sample` (DDIM-25, classifier-guided, random weights), the ratios to the
reference loop (`reference_loop.py`) in float32 and, on CUDA, in fp16 as the reference's own
commands run it (`--use_fp16 True --classifier_use_fp16 True`: its `convert_to_fp16`), each
column naming its baseline, and to float32 eager, seconds per step, and the fraction of the
step time spent in the classifier's backward pass (the guidance gradient), measured in a
separate instrumented run that synchronises around each backward.

Table "samplers" (float32 eager): images/s of DDIM-25 and DPM-Solver++(2M) at 10 and 25 steps,
classifier-guided, and the cost of classifier-free guidance (w = 3: one model call on a doubled
batch per step; the model gets the null-class embedding row), alone and with the classifier.
It measures speed at a step count, not quality.

Table "quality" (`--tables quality`, after `make quickstart`: its models and digits; with
`--train-deep` also on a deep model, three resolution levels at 16 px, trained first by
`train_deep` with benchmarks/configs/digits16/ and kept in runs/digits16/): images/s against
judge-feature FID, precision and recall (the model's judge against its real digits), each row
on two seeds of samples (`--quality-seeds`, `--quality-samples` / `--deep-samples` each).
Rows: the reference loop's DDIM-25 (`reference_loop.reference_ddim`, float32 eager: the
baseline of every speed-up; checked to give `sample`'s DDIM-25's images), DDIM-25 through
`adm.diffusion.sample` (the anchor), DDIM-250 (the paper's), then sweeps down
`--quality-steps`: DDIM, DPM-Solver++(2M), (3M) and UniPC alone, and 2M and UniPC with each
combination of the methods: the guidance interval (`--quality-interval`), DeepCache
(`--quality-cache`) and the grid's clean end (`--quality-lambda-max`). A row matches when its
mean FID is at most DDIM-25's worse seed (the noise band); a sweep stops after
`--quality-stop-after` rows that do not. After the FIDs every row is timed round-robin on one
batch. Prints the table, the fastest matching row's speed-up over the reference loop, and
what each method contributes against the same row without it. `--precision`, `--compile` and
`--channels-last` set the `sample` rows' execution (default float32 eager; the default fast
path of a long run on this CPU is `--precision bf16 --compile`).

On CPU it runs a small 32x32 ADM and classifier (the 2-core CI box would take minutes per image
at 128x128); when CUDA is available it runs the ImageNet-128 model and classifier of the
reference README (`adm.presets`; random weights, same FLOPs). Timing is
`torch.utils.benchmark.Timer` (CUDA synchronisation, thread count): after one warm-up run of each
variant (which also compiles), `--repeats` rounds take one `blocked_autorange` of every variant
in turn, and each variant's rounds are merged; the table gives their median.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

from adm import factory
from adm.diffusion import sample, sampling_diffusion
from adm.precision import AUTOCAST
from adm.stage import COMPILE_PAYS_AFTER_CALLS, resolve_fast_path
from reference_loop import convert_to_fp16, reference_ddim

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


def at_size(config: dict, size: int) -> dict:
    """`config` with its model and classifier built for `size` x `size` images."""
    return {**config, "size": size,
            "model": {**factory.parse_flags(config["model"]), "image_size": size},
            "classifier": {**factory.parse_flags(config["classifier"]), "image_size": size}}

VARIANTS = {
    # The reference's own loop (benchmarks/reference_loop.py), float32: a baseline of the ratios.
    "reference loop fp32": {"reference": "fp32"},
    "float32 eager": {},
    "bf16 autocast": {"autocast_dtype": torch.bfloat16},
    "channels-last": {"channels_last": True},
    "torch.compile": {"compile": True},
    "bf16 + compile": {"autocast_dtype": torch.bfloat16, "compile": True},
    "bf16+CL+compile": {"autocast_dtype": torch.bfloat16, "channels_last": True, "compile": True},
}
# The reference loop in fp16 is the GPU baseline: how the reference's README commands run
# ADM-G (fp16 weights and activations in the torsos). On a CPU, whose fp16 convolutions are
# slow, it runs only when --variants names it.
REFERENCE_FP16 = {"reference loop fp16": {"reference": "fp16"}}
CUDA_VARIANTS = {**REFERENCE_FP16, "fp16 autocast": {"autocast_dtype": torch.float16},
                 "fp16 + compile": {"autocast_dtype": torch.float16, "compile": True}}
# The baselines of the variants table's ratio columns, in column order.
BASELINES = ("reference loop fp16", "reference loop fp32", "float32 eager")
# Rows of the samplers table: sampler, steps (model calls), classifier guidance (at the config's
# scale) and classifier-free guidance weight (1 = off).
CFG_SCALE = 3.0
SAMPLER_ROWS = {
    "DDIM-25, classifier": dict(sampler="ddim", steps=25, classifier=True),
    "DPM-Solver++(2M)-25, classifier": dict(sampler="dpmpp_2m", steps=25, classifier=True),
    "DPM-Solver++(2M)-10, classifier": dict(sampler="dpmpp_2m", steps=10, classifier=True),
    "DDIM-25, CFG": dict(sampler="ddim", steps=25, cfg_scale=CFG_SCALE),
    "DPM-Solver++(2M)-10, CFG": dict(sampler="dpmpp_2m", steps=10, cfg_scale=CFG_SCALE),
    "DPM-Solver++(2M)-10, classifier + CFG": dict(sampler="dpmpp_2m", steps=10, classifier=True,
                                                  cfg_scale=CFG_SCALE),
}
DEFAULT_SAMPLING = dict(sampler="ddim", classifier=True)  # the variants table's (steps: --steps)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: dict, device: torch.device, null_class: bool = False):
    """Random-weight model and classifier of `config`, and the diffusion; `null_class` gives the
    model the null-class row classifier-free guidance needs (as if trained with dropout)."""
    flags = factory.parse_flags(config["model"])
    if null_class:
        flags["class_dropout_prob"] = 0.1
    model = factory.create_model(flags).to(device).eval()
    classifier = factory.create_classifier(config["classifier"]).to(device).eval()
    with torch.no_grad():  # random, non-zero outputs (the builders zero the last layers)
        for module in (model, classifier):
            for p in module.parameters():
                if p.ndim > 1 and not p.abs().sum():
                    p.normal_(0, p.shape[1] ** -0.5)
    return model, classifier, factory.create_diffusion(config["model"])


def prepare(name: str, options: dict, config: dict, device: torch.device, batch: int,
            steps: int, seed: int, sampling: dict = DEFAULT_SAMPLING, quick: bool = False):
    """Fresh networks for one row (channels-last converts them in place), a function that
    samples one seeded batch and its `benchmark.Timer`; returns (once, timer, warm-up seconds):
    the first run (warm-up, compilation) is timed apart; `quick`: the warm-up is a two-step
    run (same shapes, so the same compiled graphs). `sampling`: sampler, steps (else `steps`),
    classifier (bool) and cfg_scale of the row."""
    cfg_scale = sampling.get("cfg_scale", 1.0)
    model, classifier, diffusion = build(config, device, null_class=cfg_scale != 1.0)
    size = model.image_size
    shape = (batch, 3, size, size)
    y = torch.randint(0, model.num_classes, (batch,),
                      generator=torch.Generator().manual_seed(seed)).to(device)
    guide = classifier if sampling.get("classifier") else None
    if options.get("reference") == "fp16":  # fresh networks per row: converted in place
        convert_to_fp16(model)
        convert_to_fp16(classifier)

    def once(run_steps=sampling.get("steps", steps)):
        generator = torch.Generator(device).manual_seed(seed)
        if options.get("reference"):
            noise = torch.randn(shape, generator=generator, device=device)
            spaced = sampling_diffusion(diffusion, "ddim", run_steps)
            return reference_ddim(model, guide, spaced, noise, y, config["scale"]).clamp(-1, 1)
        return sample(model, diffusion, shape, sampler=sampling["sampler"],
                      steps=run_steps, classifier=guide,
                      classifier_scale=config["scale"], cfg_scale=cfg_scale, y=y,
                      generator=generator, **options)

    sync(device)
    start = time.perf_counter()
    out = once(2) if quick else once()
    sync(device)
    warmup = time.perf_counter() - start
    assert out.shape == shape and torch.isfinite(out).all() and out.abs().max() <= 1
    timer = benchmark.Timer(stmt="once()", globals={"once": once},
                            num_threads=torch.get_num_threads(), label="guided sampling",
                            sub_label=name)
    return once, timer, warmup


def time_rows(rows_spec: dict, config: dict, device: torch.device, batch: int, steps: int,
              seed: int, repeats: int, quick: bool = False) -> dict:
    """Warm up every row, then time them round-robin (`repeats` rounds), so that a burst of
    load on a shared machine hits every row alike rather than one of them. `rows_spec`:
    name -> (execution options, sampling). `quick`: two-step warm-ups and one timed call per
    round (the GPU check's budget). Returns name -> {"warmup_s", "median_s", "timer"}."""
    runs = {}
    for name, (options, sampling) in rows_spec.items():
        _, timer, warmup = prepare(name, options, config, device, batch, steps, seed, sampling,
                                   quick)
        runs[name] = {"warmup_s": warmup, "timer": timer, "measurements": []}
        print(f"  warmed up {name} ({warmup:.1f} s)", flush=True)
    for _ in range(repeats):
        for run in runs.values():
            run["measurements"].append(run["timer"].timeit(1) if quick
                                       else run["timer"].blocked_autorange(min_run_time=0.0))
    for run in runs.values():
        run["median_s"] = benchmark.Measurement.merge(run.pop("measurements"))[0].median
    return runs


DEFAULT_ROW = "default (auto settings; a long run)"


def default_options(device: torch.device) -> dict:
    """What `jobs/sample.py` runs by default (`adm.stage.resolve_fast_path` with precision and
    compile "auto") for a long run on `device`, as `sample` options (a Serve replica: the same
    precision, and no compile on "auto")."""
    precision, compile = resolve_fast_path("auto", "auto", device, COMPILE_PAYS_AFTER_CALLS)
    return {"autocast_dtype": AUTOCAST[precision], "compile": compile}


def variants_table(variants: dict, config: dict, device, batch: int, steps: int, seed: int,
                   repeats: int, quick: bool = False) -> list[dict]:
    """Classifier-guided DDIM-`steps` by execution option (see the module docstring)."""
    runs = time_rows({k: (v, DEFAULT_SAMPLING) for k, v in variants.items()}, config, device,
                     batch, steps, seed, repeats, quick)
    rows = [dict(variant=name, first_call_s=run["warmup_s"], images_per_s=batch / run["median_s"],
                 s_per_step=run["median_s"] / steps) for name, run in runs.items()]
    by_name = {r["variant"]: r["images_per_s"] for r in rows}
    baselines = [b for b in BASELINES if b in by_name]
    print(f"\n## classifier-guided DDIM-{steps}, {config['size']}x{config['size']}, batch "
          f"{batch}, by execution option\n")
    print("| variant | images/s | " + " | ".join(f"vs {b}" for b in baselines)
          + " | s/step | first call s (compiles) |")
    print("|---|---|" + "---|" * len(baselines) + "---|---|")
    for r in rows:
        r["vs"] = {b: r["images_per_s"] / by_name[b] for b in baselines}
        ratios = "".join(f"{r['vs'][b]:.2f}x | " for b in baselines)
        print(f"| {r['variant']} | {r['images_per_s']:.3f} | {ratios}"
              f"{r['s_per_step']:.4f} | {r['first_call_s']:.1f} |")
    return rows


def samplers_table(config: dict, device, batch: int, seed: int, repeats: int) -> None:
    """Images/s by sampler, steps and guidance, float32 eager (see the module docstring)."""
    runs = time_rows({k: ({}, v) for k, v in SAMPLER_ROWS.items()}, config, device, batch, 0,
                     seed, repeats)
    base = runs["DDIM-25, classifier"]["median_s"]
    print(f"\n## by sampler and guidance (float32 eager; classifier scale {config['scale']}, "
          f"CFG w = {CFG_SCALE})\n")
    print("| sampler, guidance | model calls | images/s | vs DDIM-25 classifier | s/call "
          "| warm-up s |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        calls = SAMPLER_ROWS[name]["steps"]
        print(f"| {name} | {calls} | {batch / run['median_s']:.3f} | "
              f"{base / run['median_s']:.2f}x | {run['median_s'] / calls:.4f} | "
              f"{run['warmup_s']:.1f} |")


# The quality table's second model (`--train-deep`): three resolution levels at 16 px.
DEEP_MODELS = Path(__file__).resolve().parent / "configs" / "digits16" / "models.yaml"


def train_deep(config: Path = DEEP_MODELS) -> tuple[str, str]:
    """Train the deep model's networks with jobs/quickstart.py's own stages (the digits
    prepared, each role of `config` trained on Ray Train and its EMA weights published; a
    finished role is reused); returns (the models folder, the digits' shard root)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "adm_job_quickstart", Path(__file__).resolve().parents[1] / "jobs" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = quickstart  # (its dataclasses look their module up)
    spec.loader.exec_module(quickstart)
    cfg = quickstart.load_config(str(config), False, None)
    run = quickstart.Quickstart(cfg, None)
    run.prepare()
    for role in cfg.trainings:
        run.train(role)
    return str(run.models), str(run.data)


# Samplers of the quality table's sweeps, by name: the label their rows carry.
SWEEP_SOLVERS = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "dpmpp_3m": "DPM-Solver++(3M)",
                 "unipc": "UniPC"}
SWEEP_STEPS = (20, 15, 10, 8, 6, 5, 4, 3)
# The methods switched on and off over the sweeps of `METHOD_SOLVERS`: the guidance interval
# (sigma in (lo, hi]), deep-feature reuse (DeepCache, every `cache`-th call full), and the
# grid's clean end (`lambda_max`: the last call's x_0 is the sample). The interval's default
# guides the noisy end only: on a held-out seed (7) of the quickstart models, UniPC-6's FID
# was the same with guidance above sigma 0.28 only (2.484 vs 2.491), and worse with the upper
# bound of the paper's ImageNet-512 interval (0.28, 5.42] (3.233), which drops the first step.
METHODS = {"end": "grid end", "interval": "guidance interval", "cache": "DeepCache"}
METHOD_COMBINATIONS = (("interval",), ("cache",), ("interval", "cache"), ("end",),
                       ("end", "interval"), ("end", "cache"), ("end", "interval", "cache"))
METHOD_SOLVERS = ("dpmpp_2m", "unipc")
DEFAULT_INTERVAL = (1.0, 1e6)
DEFAULT_CACHE = 2
DEFAULT_LAMBDA_MAX = 1.9  # the 4th point of a 6-step grid from -2.8 (t = 960) to step 0


def quality_rows(solvers, method_solvers, sweep, interval, cache, lambda_max) -> list[list[dict]]:
    """The quality table's sweeps: each a list of rows (`sample` keywords and the methods on)
    down the descending `sweep` of step counts. Every solver alone, then every method solver
    with each combination of methods on (`METHOD_COMBINATIONS`)."""
    sweeps = [[dict(sampler=v, steps=k, methods=()) for k in sweep] for v in solvers]
    for v in method_solvers:
        for on in METHOD_COMBINATIONS:
            sweeps.append([dict(sampler=v, steps=k, methods=on) for k in sweep])
    for rows in sweeps:
        for r in rows:
            r["guidance_interval"] = interval if "interval" in r["methods"] else None
            r["cache_interval"] = cache if "cache" in r["methods"] else 1
            r["lambda_max"] = lambda_max if "end" in r["methods"] else None
    return sweeps


def row_name(r: dict) -> str:
    if r["sampler"] == "reference":
        return "DDIM-25, the reference loop (float32 eager)"
    name = f"{SWEEP_SOLVERS.get(r['sampler'], r['sampler'])}-{r['steps']}"
    if r.get("anchor"):
        name += " (`sample`)"
    on = [{"interval": lambda: f"interval ({r['guidance_interval'][0]:g}, "
                               f"{r['guidance_interval'][1]:g}]",
           "cache": lambda: f"DeepCache k={r['cache_interval']}",
           "end": lambda: f"to λ {r['lambda_max']:g}"}[m]() for m in r["methods"]]
    return name + (" + " + " + ".join(on) if on else "")


def matches(r: dict, anchor: dict) -> bool:
    """The table's rule: a row matches when its mean FID is within the noise band of the
    anchor's (DDIM-25's two seeds: at most the worse of them)."""
    return r["fid"] <= max(anchor["fids"])


def quality_table(models_dir: str, reference: str, device: torch.device, n: int,
                  seeds: list[int], *, title: str = "quickstart models", scale: float = 2.0,
                  solvers: tuple[str, ...] = tuple(SWEEP_SOLVERS),
                  method_solvers: tuple[str, ...] = METHOD_SOLVERS,
                  sweep: tuple[int, ...] = SWEEP_STEPS, stop_after: int = 1,
                  lambda_min: float | None = None, interval=DEFAULT_INTERVAL,
                  cache: int = DEFAULT_CACHE, lambda_max: float = DEFAULT_LAMBDA_MAX,
                  ddim250: bool = True,
                  autocast_dtype: torch.dtype | None = None, compile: bool = False,
                  channels_last: bool = False, batch: int = 250, repeats: int = 3) -> list[dict]:
    """Judge-feature FID (and precision/recall) against images/s on trained models (a models
    folder of jobs/quickstart.py's layout: diffusion, classifier, judge), classifier-guided at
    `scale`: DDIM-25 (the anchor, through `adm.diffusion.sample`), the reference loop's
    DDIM-25 (`reference_loop.reference_ddim`, float32 eager: the baseline of the speed-ups;
    checked to give the anchor's images), DDIM-250 (the paper's), and the sweeps of
    `quality_rows`: each solver alone, and each method solver with the guidance interval
    (`interval`), DeepCache (`cache`) and both.

    Every row samples `n` images per seed of `seeds` (labels i mod 10, per-index noise
    `index_seeds(seed, i)`: every row starts from the same x_T); the judge's pooled features
    against the real images' give FID, and precision/recall (k = 3). A row matches when its
    mean FID is at most the anchor's worse seed (`matches`); "paired" marks the stricter rule,
    no worse than the anchor on every seed. A sweep stops after `stop_after` consecutive rows
    that do not match. `lambda_min` starts the log-SNR grid of the solvers (None: -5.1).
    Images/s: every row with a FID, timed round-robin on one batch of `batch` samples after all
    FIDs (`repeats` rounds, the median), so a burst of load hits every row alike. The
    execution options apply to the `sample` rows, not to the reference loop. Prints the table,
    the fastest matching row's speed-up over the reference loop's DDIM-25 and what each method
    contributes (speed and FID against the same row without it); returns the rows."""
    import numpy as np

    from reference_loop import reference_ddim

    from adm import checkpoints
    from adm.images import to_uint8
    from adm.diffusion.seeds import RowNoise, index_seeds
    from adm.evaluate import fid_statistics, frechet_distance
    from adm.evaluate.networks import FeatureExtractor, resolve_network
    from adm.evaluate.metrics import precision_recall
    from adm.evaluate.sources import open_source, read_rows

    specs = {role: checkpoints.resolve(role, f"{models_dir}/{role}/model.pt", None, kind)
             for role, kind in (("diffusion", "diffusion"), ("classifier", "classifier"))}
    # The reference loop gets its own copies: channels-last converts `sample`'s in place.
    net, classifier = (checkpoints.load(specs[r], device) for r in ("diffusion", "classifier"))
    ref_net, ref_classifier = (checkpoints.load(specs[r], device)
                               for r in ("diffusion", "classifier"))
    diffusion = factory.create_diffusion({**specs["diffusion"].flags, "timestep_respacing": ""})
    size = checkpoints.image_size(specs["diffusion"])
    judge = FeatureExtractor(resolve_network(f"classifier:{models_dir}/judge/model.pt"),
                             batch_size=500, device=str(device))
    real = open_source(reference, size)
    real_images = np.concatenate([read_rows(real, c) for c in real.chunks(1000)])
    real_feats = judge(real_images)["pool"].astype(np.float64)
    ref_mu, ref_sigma = fid_statistics(real_feats)
    options = dict(autocast_dtype=autocast_dtype, compile=compile, channels_last=channels_last)
    shape = lambda rows: (rows, 3, size, size)  # noqa: E731
    if n % batch:
        raise ValueError(f"--quality-samples {n}: a multiple of the batch {batch} (one shape)")

    def kwargs(r: dict) -> dict:
        return dict(sampler=r["sampler"], steps=r["steps"],
                    lambda_min=None if r["sampler"] == "ddim" else lambda_min,
                    lambda_max=r["lambda_max"], guidance_interval=r["guidance_interval"],
                    cache_interval=r["cache_interval"], classifier=classifier,
                    classifier_scale=scale, **options)

    def evaluate(r: dict) -> dict:
        fids, prec, rec = [], [], []
        for seed in seeds:
            labels, row_seeds, images = torch.arange(n) % 10, index_seeds(seed, range(n)), []
            for s in range(0, n, batch):
                x = sample(net, diffusion, shape(batch), y=labels[s:s + batch].to(device),
                           seeds=row_seeds[s:s + batch], device=device, **kwargs(r))
                images.append(to_uint8(x))
            feats = judge(np.concatenate(images))["pool"].astype(np.float64)
            fids.append(frechet_distance(*fid_statistics(feats), ref_mu, ref_sigma))
            precision, recall = precision_recall(real_feats, feats, k=3)
            prec.append(precision)
            rec.append(recall)
        calls = sampling_diffusion(diffusion, r["sampler"], r["steps"], None,
                                   kwargs(r)["lambda_min"], r["lambda_max"]).num_timesteps
        return {**r, "calls": calls, "fids": fids, "fid": float(np.mean(fids)),
                "precision": float(np.mean(prec)), "recall": float(np.mean(rec))}

    def speeds(rows: list[dict]) -> float:
        """Sets every row's images/s (one batch of the first seed, round-robin, `repeats`
        rounds, median); returns max |diff| of the reference loop's images to the anchor's
        (`sample`'s DDIM-25 in float32 eager, same x_T)."""
        y = (torch.arange(batch) % 10).to(device)
        row_seeds = index_seeds(seeds[0], range(batch))
        x_T = RowNoise(row_seeds, shape(batch), device)()
        respaced = sampling_diffusion(diffusion, "ddim", 25)
        fns = [lambda: reference_ddim(ref_net, ref_classifier, respaced, x_T, y, scale)]
        for r in rows[1:]:
            fns.append(functools.partial(sample, net, diffusion, shape(batch), y=y,
                                         seeds=row_seeds, device=device, **kwargs(r)))
        ours = sample(ref_net, diffusion, shape(batch), sampler="ddim", steps=25,
                      classifier=ref_classifier, classifier_scale=scale, y=y, noise=x_T,
                      device=device)
        diff = (fns[0]().clamp(-1, 1) - ours).abs().max().item()
        for fn in fns[1:]:  # warm-up (compiles, if compiling)
            fn()
        seconds = [[] for _ in fns]
        for _ in range(repeats):
            for times, fn in zip(seconds, fns):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - start)
        for r, times in zip(rows, seconds):
            r["rate"] = batch / float(np.median(times))
        return diff

    what = (f"{autocast_dtype or 'float32'}{', compiled' if compile else ''}"
            f"{'' if lambda_min is None else f', solvers from λ = {lambda_min:g}'}"
            f"{', channels-last' if channels_last else ''}")
    print(f"\n## Quality against speed: {title}, classifier scale {scale:g}, {n} samples per "
          f"seed, seeds {seeds}, judge-feature FID vs {real.num_images} real images; `sample` "
          f"rows: {what}\n", flush=True)
    base = dict(methods=(), guidance_interval=None, cache_interval=1, lambda_max=None)
    anchor = evaluate({**base, "sampler": "ddim", "steps": 25, "anchor": True})
    print(f"(DDIM-25: FID {anchor['fids']}; a row matches at mean FID <= "
          f"{max(anchor['fids']):.3f})", flush=True)
    rows = [{**base, "sampler": "reference", "steps": 25, "calls": 25, "fids": anchor["fids"],
             "fid": anchor["fid"], "precision": anchor["precision"],
             "recall": anchor["recall"]}, anchor]
    if ddim250:
        rows.append(evaluate({**base, "sampler": "ddim", "steps": 250}))
        print(f"(DDIM-250: FID {rows[-1]['fids']})", flush=True)
    for one in quality_rows(solvers, method_solvers, sweep, interval, cache, lambda_max):
        misses = 0
        for r in one:
            if r["sampler"] == "ddim" and r["steps"] >= 25:
                continue
            rows.append(evaluate(r))
            print(f"({row_name(rows[-1])}: {rows[-1]['calls']} calls, FID "
                  f"{', '.join(f'{f:.3f}' for f in rows[-1]['fids'])})", flush=True)
            misses = 0 if matches(rows[-1], anchor) else misses + 1
            if misses >= stop_after:
                break
    print(f"(timing {len(rows)} rows, {repeats} rounds)", flush=True)
    diff = speeds(rows)
    ref = rows[0]
    print(f"\nThe reference loop's images are `sample`'s DDIM-25's to max |diff| {diff:.1e}.\n")
    print("| sampler | model calls | images/s | vs reference DDIM-25 | FID (mean) | FID per seed | "
          "vs DDIM-25, per seed | precision | recall | matches |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = ("(anchor)" if r.get("anchor") or r is ref else
                   ("yes, paired" if all(f <= g for f, g in zip(r["fids"], anchor["fids"]))
                    else "yes") if matches(r, anchor) else "no")
        print(f"| {row_name(r)} | {r['calls']} | {r['rate']:.1f} | {r['rate'] / ref['rate']:.2f}x | "
              f"{r['fid']:.3f} | {', '.join(f'{f:.3f}' for f in r['fids'])} | "
              f"{', '.join(f'{f - g:+.3f}' for f, g in zip(r['fids'], anchor['fids']))} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {verdict} |")
    matched = [r for r in rows[2:] if matches(r, anchor)]
    if matched:
        best = max(matched, key=lambda r: r["rate"])
        print(f"\nFastest matching row: {row_name(best)}, {best['calls']} calls, FID "
              f"{best['fid']:.3f}: {best['rate']:.1f} images/s = "
              f"{best['rate'] / ref['rate']:.2f}x the reference loop's DDIM-25 "
              f"({ref['rate']:.1f}), {best['rate'] / anchor['rate']:.2f}x `sample`'s")
    print("\nWhat each method contributes (rows with it against the same row without it):\n\n"
          "| method | row | speed | FID change |\n|---|---|---|---|")
    for r in rows:
        for m in r["methods"]:
            off = [o for o in rows if o["sampler"] == r["sampler"] and o["steps"] == r["steps"]
                   and set(o["methods"]) == set(r["methods"]) - {m}]
            if off:
                print(f"| {METHODS[m]} | {row_name(r)} | {r['rate'] / off[0]['rate']:.2f}x | "
                      f"{r['fid'] - off[0]['fid']:+.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: imagenet128 on CUDA, small32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samplers table's batch (default: 64 CUDA, 8 CPU)")
    parser.add_argument("--cases", default=None,
                        help="variants table: size:batch,... (default: 128:64 CUDA, 32:4,64:8 CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="variants: two-step warm-ups, one timed call per round")
    parser.add_argument("--json", default=None, help="also write the tables' rows to this file")
    parser.add_argument("--steps", type=int, default=25,
                        help="DDIM steps of the variants table (ddimN respacing)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tables", default="variants,samplers",
                        help="comma-separated subset of: variants, samplers, quality")
    parser.add_argument("--models", default="runs/quickstart/models",
                        help="quality: the quickstart's models folder")
    parser.add_argument("--reference", default="runs/quickstart/data/digits",
                        help="quality: the real images (a shard dataset root)")
    parser.add_argument("--train-deep", action="store_true",
                        help="quality: also the deep model (three levels at 16 px), trained "
                             "first with benchmarks/configs/digits16/ (reused when done)")
    parser.add_argument("--no-quickstart", action="store_true",
                        help="quality: only the deep model (with --train-deep)")
    parser.add_argument("--quality-samples", type=int, default=2000)
    parser.add_argument("--deep-samples", type=int, default=1000,
                        help="quality: samples per seed on the deep model")
    parser.add_argument("--quality-seeds", default="0,1",
                        help="quality: comma-separated seeds (each row's FID on each)")
    parser.add_argument("--quality-scale", type=float, default=2.0,
                        help="quality: the classifier scale")
    parser.add_argument("--quality-solvers", default=",".join(SWEEP_SOLVERS),
                        help="quality: the solvers swept alone")
    parser.add_argument("--quality-method-solvers", default=",".join(METHOD_SOLVERS),
                        help="quality: the solvers swept with each method on")
    parser.add_argument("--quality-steps", default=",".join(map(str, SWEEP_STEPS)),
                        help="quality: the sweeps' step counts, descending")
    parser.add_argument("--quality-stop-after", type=int, default=1,
                        help="quality: a sweep stops after this many consecutive rows that "
                             "do not match DDIM-25")
    parser.add_argument("--quality-lambda-min", type=float, default=None,
                        help="quality: the log-SNR where the solvers' grid starts (default -5.1)")
    parser.add_argument("--quality-interval", type=float, nargs=2, default=DEFAULT_INTERVAL,
                        metavar=("LO", "HI"), help="quality: the guidance interval (sigma)")
    parser.add_argument("--quality-cache", type=int, default=DEFAULT_CACHE,
                        help="quality: DeepCache's cache_interval")
    parser.add_argument("--quality-lambda-max", type=float, default=DEFAULT_LAMBDA_MAX,
                        help="quality: the grid end of the rows with it on")
    parser.add_argument("--no-ddim250", action="store_true",
                        help="quality: leave out DDIM-250 (ten times DDIM-25's time)")
    parser.add_argument("--deep-ddim250", action="store_true",
                        help="quality: DDIM-250 on the deep model too")
    parser.add_argument("--quality-repeats", type=int, default=3,
                        help="quality: rounds of the round-robin timing of every row")
    parser.add_argument("--precision", choices=sorted(AUTOCAST), default="fp32",
                        help="quality: autocast of the `sample` rows (not the reference loop)")
    parser.add_argument("--compile", action="store_true",
                        help="quality: torch.compile the networks of the `sample` rows")
    parser.add_argument("--channels-last", action="store_true",
                        help="quality: channels-last `sample` rows")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: " + ", ".join(
                            [*VARIANTS, *CUDA_VARIANTS, DEFAULT_ROW]) + " (on a CPU the fp16 "
                        "rows run only when named here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config_name = args.config or ("imagenet128" if device.type == "cuda" else "small32")
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    variants = dict(VARIANTS, **(CUDA_VARIANTS if device.type == "cuda" else {}))
    variants[DEFAULT_ROW] = default_options(device)
    if args.variants:
        known = {**variants, **CUDA_VARIANTS}
        unknown = set(args.variants.split(",")) - set(known)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; known: {sorted(known)}")
        variants = {k: known[k] for k in args.variants.split(",")}
    tables = set(args.tables.split(","))
    if tables - {"variants", "samplers", "quality"}:
        parser.error(f"--tables: unknown {sorted(tables - {'variants', 'samplers', 'quality'})}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 eager means float32
        torch.backends.cudnn.allow_tf32 = False
        what = torch.cuda.get_device_name(device)
    else:
        what = f"CPU, {torch.get_num_threads()} threads"
    print(f"# guided sampling, {config_name}, {what}, torch {torch.__version__}")

    config = CONFIGS[config_name]
    config = config() if callable(config) else config
    results = {"device": what, "config": config_name, "variants": []}
    if "variants" in tables:
        cases = args.cases or ("128:64" if device.type == "cuda" else "32:4,64:8")
        for case in cases.split(","):
            size, rows = (int(v) for v in case.split(":"))
            table = variants_table(variants, at_size(config, size), device, rows, args.steps,
                                   args.seed, args.repeats, args.quick)
            results["variants"].append({"size": size, "batch": rows, "rows": table})
    if "samplers" in tables:
        samplers_table(config, device, batch, args.seed, args.repeats)
    if "quality" in tables:
        common = dict(
            seeds=[int(x) for x in args.quality_seeds.split(",")], scale=args.quality_scale,
            solvers=tuple(args.quality_solvers.split(",")),
            method_solvers=tuple(filter(None, args.quality_method_solvers.split(","))),
            sweep=tuple(int(x) for x in args.quality_steps.split(",")),
            stop_after=args.quality_stop_after, lambda_min=args.quality_lambda_min,
            interval=tuple(args.quality_interval), cache=args.quality_cache,
            lambda_max=args.quality_lambda_max,
            autocast_dtype=AUTOCAST[args.precision], compile=args.compile,
            channels_last=args.channels_last, repeats=args.quality_repeats)
        results["quality"] = {} if args.no_quickstart else {"quickstart": quality_table(
            args.models, args.reference, device, n=args.quality_samples,
            ddim250=not args.no_ddim250, **common)}
        if args.train_deep:
            models, digits = train_deep()
            results["quality"]["deep"] = quality_table(
                models, digits, device, n=args.deep_samples, ddim250=args.deep_ddim250,
                title="the deep model (digits at 16 px, three levels)", **common)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
