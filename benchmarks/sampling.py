"""Guided sampling throughput: by execution option, and by sampler and guidance.

    python benchmarks/sampling.py                 # CPU: a small ADM; GPU (if any): ImageNet-128
    python benchmarks/sampling.py --device cpu --batch-size 8 --repeats 3
    python benchmarks/sampling.py --tables samplers   # only the sampler/guidance table
    python benchmarks/sampling.py --tables quality --models runs/quickstart/models \
        --reference runs/quickstart/data/digits --quality-stop-after 2

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

Table "quality" (`--tables quality`, after `make quickstart`: its models and digits): on the
trained quickstart models, classifier-guided at scale 2 (`--quality-scales`; 0 is unguided),
judge-feature FID (the quickstart judge's features against the real digits) per seed
(`--quality-seeds`, `--quality-samples` each) of DDIM-25 (the reference's sampler, through
`adm.diffusion.sample`) and of DPM-Solver++(2M) and (3M) down a descending sweep of step counts
(`--quality-steps`, their default log-SNR grid; a solver's sweep stops after
`--quality-stop-after` rows worse than DDIM-25 on some seed), every row from the same seeds
and labels; images/s of every row and of the reference loop's DDIM-25
(`reference_loop.reference_ddim`, checked to give DDIM-25's images), timed round-robin on one
batch first. Then, per solver: the fewest model calls no worse than DDIM-25 on every seed, and
its images/s over the reference loop's DDIM-25's. `--precision`, `--compile` and
`--channels-last` set the `sample` rows' execution (default float32 eager).

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
import time

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


# Samplers of the quality table's sweep, by name: the label its rows carry.
SWEEP_SOLVERS = {"dpmpp_2m": "DPM-Solver++(2M)", "dpmpp_3m": "DPM-Solver++(3M)"}
SWEEP_STEPS = (20, 15, 12, 10, 8, 7, 6, 5)


def quality_table(models_dir: str, reference: str, device: torch.device, n: int,
                  seeds: list[int], *, scales: tuple[float, ...] = (2.0,),
                  solvers: tuple[str, ...] = tuple(SWEEP_SOLVERS),
                  sweep: tuple[int, ...] = SWEEP_STEPS, stop_after: int = 1,
                  lambda_min: float | None = None,
                  autocast_dtype: torch.dtype | None = None, compile: bool = False,
                  channels_last: bool = False, batch: int = 250, repeats: int = 3) -> list[dict]:
    """Images/s and judge-feature FID on the trained quickstart models: DDIM-25 (the
    reference's sampler, through `adm.diffusion.sample`), the reference loop's DDIM-25
    (`reference_loop.reference_ddim`, float32 eager: its images/s), and each solver of
    `solvers` down the descending `sweep` of step counts (its default log-SNR grid), for each
    classifier scale of `scales`.

    FID: `n` samples per seed (labels i mod 10, per-index noise `index_seeds(seed, i)`, so every
    row starts from the same x_T), the judge's pooled features against the real digits'.
    A solver's sweep stops after `stop_after` consecutive rows worse than DDIM-25 on some seed
    (its step counts below are not run); `lambda_min` moves the solvers' grid start (None:
    −5.1, `LOGSNR_MIN`). Images/s: of one batch of `batch` samples per row,
    every row timed in turn, `repeats` rounds, the median (see `speeds`), before the FIDs.
    The execution options (`autocast_dtype`, `compile`, `channels_last`) apply to every
    `sample` row, not to the reference loop, which is the reference's float32 eager loop
    whatever they are. Prints the table and, per scale and
    solver, the fewest model calls no worse than DDIM-25 on every seed and its images/s over
    the reference loop's DDIM-25; returns the rows."""
    import numpy as np

    from reference_loop import reference_ddim

    from adm import checkpoints
    from adm.images import to_uint8
    from adm.diffusion.seeds import RowNoise, index_seeds
    from adm.evaluate import fid_statistics, frechet_distance
    from adm.evaluate.networks import FeatureExtractor, resolve_network
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
    ref_mu, ref_sigma = fid_statistics(judge(real_images)["pool"].astype(np.float64))
    options = dict(autocast_dtype=autocast_dtype, compile=compile, channels_last=channels_last)
    shape = lambda rows: (rows, 3, size, size)  # noqa: E731
    batches = [(s, min(batch, n - s)) for s in range(0, n, batch)]

    def run(scale: float, sampler: str, steps: int) -> dict:
        """One row's FID: every seed's n samples."""
        fids = []
        for seed in seeds:
            labels, row_seeds, images = torch.arange(n) % 10, index_seeds(seed, range(n)), []
            for s, rows in batches:
                x = sample(net, diffusion, shape(rows), sampler=sampler, steps=steps,
                           lambda_min=None if sampler == "ddim" else lambda_min,
                           classifier=classifier if scale else None, classifier_scale=scale,
                           y=labels[s:s + rows].to(device), seeds=row_seeds[s:s + rows],
                           device=device, **options)
                images.append(to_uint8(x))
            feats = judge(np.concatenate(images))["pool"].astype(np.float64)
            fids.append(frechet_distance(*fid_statistics(feats), ref_mu, ref_sigma))
        calls = sampling_diffusion(diffusion, sampler, steps, None,
                                   None if sampler == "ddim" else lambda_min).num_timesteps
        return dict(scale=scale, sampler=sampler, steps=steps, calls=calls, fids=fids,
                    fid=float(np.mean(fids)))

    def speeds(scale: float) -> dict:
        """Images/s of every row (the reference loop, DDIM-25 and the whole sweep) on one
        batch of the first seed, timed round-robin, `repeats` rounds, median: a burst of load
        on a shared machine hits every row alike. Checks that the reference loop's images are
        `sample`'s DDIM-25 (float32 eager) on that batch (max |diff| in the row)."""
        rows = batches[0][1]
        y = (torch.arange(rows) % 10).to(device)
        row_seeds = index_seeds(seeds[0], range(rows))
        x_T = RowNoise(row_seeds, shape(rows), device)()
        respaced = sampling_diffusion(diffusion, "ddim", 25)
        guide, ref_guide = (classifier, ref_classifier) if scale else (None, None)
        fns = {("reference", 25): lambda: reference_ddim(ref_net, ref_guide, respaced, x_T, y,
                                                         scale)}
        for sampler, steps in [("ddim", 25)] + [(v, k) for v in solvers for k in sweep]:
            fns[sampler, steps] = functools.partial(
                sample, net, diffusion, shape(rows), sampler=sampler, steps=steps,
                lambda_min=None if sampler == "ddim" else lambda_min,
                classifier=guide, classifier_scale=scale, y=y, seeds=row_seeds, device=device,
                **options)
        ours = sample(ref_net, diffusion, shape(rows), sampler="ddim", steps=25,
                      classifier=ref_guide, classifier_scale=scale, y=y, noise=x_T, device=device)
        diff = (fns["reference", 25]().clamp(-1, 1) - ours).abs().max().item()
        seconds = {key: [] for key in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                seconds[key].append(time.perf_counter() - start)
        return {key: rows / float(np.median(t)) for key, t in seconds.items()}, diff

    # Warm-up (and compilation) of every sampler at the timed batch shape, then the rows.
    for sampler in ("ddim", *solvers):
        sample(net, diffusion, shape(batches[0][1]), sampler=sampler, steps=4,
               classifier=classifier, y=torch.zeros(batches[0][1], dtype=torch.int64),
               device=device, **options)
    rows = []
    what = (f"{autocast_dtype or 'float32'}{', compiled' if compile else ''}"
            f"{'' if lambda_min is None else f', solvers from λ = {lambda_min:g}'}"
            f"{', channels-last' if channels_last else ''}")
    print(f"\n## Quality at equal FID: quickstart models, {n} samples per seed, seeds {seeds}, "
          f"judge-feature FID vs {real.num_images} real digits; `sample` rows: {what}\n")
    print("| classifier scale | sampler | model calls | images/s | FID (mean) | FID per seed | "
          "vs DDIM-25, per seed |\n|---|---|---|---|---|---|---|", flush=True)

    def show(r: dict, ddim: dict) -> None:
        name = {"ddim": "DDIM-25 (`sample`)", "reference": "DDIM-25, the reference loop "
                f"(float32 eager; max |diff| to `sample`'s {r.get('max_abs_diff', 0):.1e})"
                }.get(r["sampler"], f"{SWEEP_SOLVERS.get(r['sampler'], r['sampler'])}-{r['steps']}")
        if r["fid"] is None:
            print(f"| {r['scale']:g} | {name} | {r['calls']} | {r['rate']:.1f} | (DDIM-25's) "
                  "| - | - |", flush=True)
            return
        print(f"| {r['scale']:g} | {name} | {r['calls']} | {r['rate']:.1f} | {r['fid']:.3f} | "
              f"{', '.join(f'{f:.3f}' for f in r['fids'])} | "
              f"{', '.join(f'{f - g:+.3f}' for f, g in zip(r['fids'], ddim['fids']))} |",
              flush=True)

    for scale in scales:
        rate, diff = speeds(scale)
        print(f"(scale {scale:g}: images/s of each row timed first, on {batches[0][1]} samples, "
              f"median of {repeats} rounds)", flush=True)
        ddim = {**run(scale, "ddim", 25), "rate": rate["ddim", 25]}
        rows.append(ddim)
        show(ddim, ddim)
        rows.append(dict(scale=scale, sampler="reference", steps=25, calls=25, fids=[], fid=None,
                         rate=rate["reference", 25], max_abs_diff=diff))
        show(rows[-1], ddim)
        for solver in solvers:
            misses = 0
            for steps in sweep:
                r = {**run(scale, solver, steps), "rate": rate[solver, steps]}
                rows.append(r)
                show(r, ddim)
                matched = all(f <= g for f, g in zip(r["fids"], ddim["fids"]))
                misses = 0 if matched else misses + 1
                if misses >= stop_after:
                    break
    for scale in scales:
        here = [r for r in rows if r["scale"] == scale]
        ddim, ref = here[0], here[1]
        print(f"\nscale {scale:g}: DDIM-25 FID {ddim['fid']:.3f}; `sample` {ddim['rate']:.1f} "
              f"images/s = {ddim['rate'] / ref['rate']:.2f}x the reference loop's "
              f"{ref['rate']:.1f}")
        for solver in solvers:
            matched = [r for r in here if r["sampler"] == solver
                       and all(f <= g for f, g in zip(r["fids"], ddim["fids"]))]
            if not matched:
                print(f"scale {scale:g}: {SWEEP_SOLVERS[solver]}: no row reached DDIM-25's FID "
                      "on every seed")
                continue
            best = min(matched, key=lambda r: (r["calls"], -r["rate"]))
            print(f"scale {scale:g}: {SWEEP_SOLVERS[solver]}: fewest model calls at DDIM-25's "
                  f"FID: {best['calls']} (FID {best['fid']:.3f}); {best['rate']:.1f} images/s = "
                  f"{best['rate'] / ref['rate']:.2f}x the reference loop's DDIM-25 "
                  f"({best['rate'] / ddim['rate']:.2f}x `sample`'s)")
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
    parser.add_argument("--quality-samples", type=int, default=2000)
    parser.add_argument("--quality-seeds", default="0,1",
                        help="quality: comma-separated seeds (FID is compared seed by seed)")
    parser.add_argument("--quality-scales", default="2",
                        help="quality: comma-separated classifier scales (0: unguided)")
    parser.add_argument("--quality-solvers", default=",".join(SWEEP_SOLVERS),
                        help="quality: the solvers swept")
    parser.add_argument("--quality-steps", default=",".join(map(str, SWEEP_STEPS)),
                        help="quality: the solvers' step counts, descending")
    parser.add_argument("--quality-stop-after", type=int, default=1,
                        help="quality: a solver's sweep stops after this many consecutive rows "
                             "worse than DDIM-25 on some seed")
    parser.add_argument("--quality-lambda-min", type=float, default=None,
                        help="quality: the log-SNR where the solvers' grid starts (default -5.1)")
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
        quality_table(args.models, args.reference, device, args.quality_samples,
                      [int(x) for x in args.quality_seeds.split(",")],
                      scales=tuple(float(x) for x in args.quality_scales.split(",")),
                      solvers=tuple(args.quality_solvers.split(",")),
                      sweep=tuple(int(x) for x in args.quality_steps.split(",")),
                      stop_after=args.quality_stop_after, lambda_min=args.quality_lambda_min,
                      autocast_dtype=AUTOCAST[args.precision], compile=args.compile,
                      channels_last=args.channels_last, repeats=args.quality_repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
