"""Guided sampling throughput: by execution option, and by sampler and guidance.

    python benchmarks/sampling.py                 # CPU: a small ADM; GPU (if any): ImageNet-128
    python benchmarks/sampling.py --device cpu --batch-size 8 --repeats 3
    python benchmarks/sampling.py --tables samplers   # only the sampler/guidance table

Table "variants": for each execution option — float32 eager, bf16 autocast, channels-last,
torch.compile, and all three together (plus fp16 autocast on CUDA) — images/s of
`adm.diffusion.sample` (DDIM-25, classifier-guided, random weights), the ratio to float32 eager,
seconds per step, and the fraction of the step time spent in the classifier's backward pass
(the guidance gradient), measured in a separate instrumented run that synchronises around each
backward.

Table "samplers" (float32 eager): images/s of DDIM-25 and DPM-Solver++(2M) at 10 and 25 steps,
classifier-guided, and the cost of classifier-free guidance (w = 3: one model call on a doubled
batch per step; the model gets the null-class embedding row), alone and with the classifier.
It measures speed at a step count, not quality.

Table "quality" (`--tables quality`, after `make quickstart`: its models and digits): on the
trained quickstart models, images/s and classifier-feature FID (the quickstart judge's features
against the real digits), per seed, of DDIM-25 (the reference's), DDIM-50, and DPM-Solver++(2M)
at 10, 15 and 20 steps on its default grid (log-SNR from λ = −5.1), at 10 steps over the whole
chain, on DDIM-25's own interval (from t = 960) and uniform in t; unguided and classifier-guided
(scale 2), every row from the same seeds and labels. Then the quality-matched speed-up: the
images/s of the fastest DPM-Solver++ row no worse than DDIM-25 on every seed, over DDIM-25's.

On CPU it runs a small 32x32 ADM and classifier (the 2-core CI box would take minutes per image
at 128x128); when CUDA is available it runs the ImageNet-128 model and classifier of the
reference README (`adm.presets`; random weights, same FLOPs). Timing is
`torch.utils.benchmark.Timer` (CUDA synchronisation, thread count): after one warm-up run of each
variant (which also compiles), `--repeats` rounds take one `blocked_autorange` of every variant
in turn, and each variant's rounds are merged; the table gives their median.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils import benchmark

from adm.checkpoints import AUTOCAST
from adm.compat import openai
from adm.diffusion import sample, sampling_diffusion
from adm.stage import COMPILE_PAYS_AFTER_CALLS, resolve_fast_path
from reference_loop import reference_ddim

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
            "model": {**openai.parse_flags(config["model"]), "image_size": size},
            "classifier": {**openai.parse_flags(config["classifier"]), "image_size": size}}

VARIANTS = {
    # The reference's own loop (benchmarks/reference_loop.py): the baseline of every ratio.
    "reference loop": {"reference": True},
    "float32 eager": {},
    "bf16 autocast": {"autocast_dtype": torch.bfloat16},
    "channels-last": {"channels_last": True},
    "torch.compile": {"compile": True},
    "bf16 + compile": {"autocast_dtype": torch.bfloat16, "compile": True},
    "bf16+CL+compile": {"autocast_dtype": torch.bfloat16, "channels_last": True, "compile": True},
}
CUDA_VARIANTS = {"fp16 autocast": {"autocast_dtype": torch.float16},
                 "fp16 + compile": {"autocast_dtype": torch.float16, "compile": True}}
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
    flags = openai.parse_flags(config["model"])
    if null_class:
        flags["class_dropout_prob"] = 0.1
    model = openai.create_model(flags).to(device).eval()
    classifier = openai.create_classifier(config["classifier"]).to(device).eval()
    with torch.no_grad():  # random, non-zero outputs (the builders zero the last layers)
        for module in (model, classifier):
            for p in module.parameters():
                if p.ndim > 1 and not p.abs().sum():
                    p.normal_(0, p.shape[1] ** -0.5)
    return model, classifier, openai.create_diffusion(config["model"])


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


DEFAULT_ROW = "default (auto settings, a long run)"


def default_options(device: torch.device) -> dict:
    """What `jobs/sample.py` and Serve run by default (`adm.stage.resolve_fast_path` with
    precision and compile "auto") for a long run on `device`, as `sample` options."""
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
    print(f"\n## classifier-guided DDIM-{steps}, {config['size']}x{config['size']}, batch "
          f"{batch}, by execution option\n")
    print("| variant | images/s | vs reference loop | vs float32 eager | s/step "
          "| first call s (compiles) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratios = [f"{r['images_per_s'] / by_name[b]:.2f}x" if b in by_name else "-"
                  for b in ("reference loop", "float32 eager")]
        print(f"| {r['variant']} | {r['images_per_s']:.3f} | {ratios[0]} | {ratios[1]} | "
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


def quality_table(models_dir: str, reference: str, device: torch.device, n: int,
                  seeds: list[int]) -> None:
    """Images/s and judge-feature FID per sampler on the trained quickstart models."""
    import numpy as np

    from adm.diffusion.sampling import index_seeds, log_snr, logsnr_timesteps
    from adm.evaluate import fid_statistics, frechet_distance
    from adm.evaluate.networks import FeatureExtractor, resolve_network
    from adm.evaluate.sources import open_source, read_rows
    from adm import checkpoints
    from adm.checkpoints import to_uint8

    specs = {role: checkpoints.resolve(role, f"{models_dir}/{role}/model.pt", None, kind)
             for role, kind in (("diffusion", "diffusion"), ("classifier", "classifier"))}
    net = checkpoints.load(specs["diffusion"], device)
    classifier = checkpoints.load(specs["classifier"], device)
    diffusion = openai.create_diffusion({**specs["diffusion"].flags, "timestep_respacing": ""})
    size = checkpoints.image_size(specs["diffusion"])
    judge = FeatureExtractor(resolve_network(f"classifier:{models_dir}/judge/model.pt"),
                             batch_size=500, device=str(device))
    real = open_source(reference, size)
    real_images = np.concatenate([read_rows(real, c) for c in real.chunks(1000)])
    ref_mu, ref_sigma = fid_statistics(judge(real_images)["pool"].astype(np.float64))
    alphas_cumprod = np.cumprod(1 - np.asarray(diffusion.base_betas, dtype=np.float64))
    ddim25_start = 1000 - 1000 // 25  # "ddim25" starts at t = 960 of 1000
    lam = log_snr(alphas_cumprod)
    rows_spec = [  # (name, sampler, steps, timesteps)
        ("DDIM-25 (the reference's)", "ddim", 25, None),
        ("DDIM-50", "ddim", 50, None),
        ("DPM++ 10, log-SNR from λ=-5.1 (default)", "dpmpp_2m", 10, None),
        ("DPM++ 15, log-SNR from λ=-5.1 (default)", "dpmpp_2m", 15, None),
        ("DPM++ 20, log-SNR from λ=-5.1 (default)", "dpmpp_2m", 20, None),
        ("DPM++ 10, log-SNR over the whole chain", "dpmpp_2m",
         logsnr_timesteps(alphas_cumprod, 10, lambda_min=-np.inf), None),
        (f"DPM++ 10, log-SNR on DDIM-25's interval (from t={ddim25_start})", "dpmpp_2m",
         logsnr_timesteps(alphas_cumprod, 10, lambda_min=lam[ddim25_start]), None),
        ("DPM++ 10, uniform in t", "dpmpp_2m", 10, "uniform"),
    ]
    batch, rows = 250, []
    sample(net, diffusion, (batch, 3, size, size), sampler="ddim", steps=2,  # warm-up
           classifier=classifier, y=torch.zeros(batch, dtype=torch.int64), device=device)
    for scale in (0.0, 2.0):
        for name, sampler, steps, spacing in rows_spec:
            fids, seconds = [], 0.0
            for seed in seeds:
                labels, row_seeds, images = torch.arange(n) % 10, index_seeds(seed, range(n)), []
                start = time.perf_counter()
                for s in range(0, n, batch):
                    x = sample(net, diffusion, (min(batch, n - s), 3, size, size),
                               sampler=sampler, steps=steps, timesteps=spacing,
                               classifier=classifier if scale else None,
                               classifier_scale=scale, y=labels[s:s + batch].to(device),
                               seeds=row_seeds[s:s + batch], device=device)
                    images.append(to_uint8(x))
                seconds += time.perf_counter() - start  # sampling only, not the judge
                feats = judge(np.concatenate(images))["pool"].astype(np.float64)
                fids.append(frechet_distance(*fid_statistics(feats), ref_mu, ref_sigma))
            rate = n * len(seeds) / seconds
            calls = sampling_diffusion(diffusion, sampler, steps, spacing).num_timesteps
            rows.append(dict(scale=scale, name=name, calls=calls, rate=rate, fids=fids,
                             fid=float(np.mean(fids))))
    print(f"\n## Quality at equal FID: quickstart models, {n} samples per seed, seeds {seeds}, "
          f"judge-feature FID vs {real.num_images} real digits\n")
    print("| classifier scale | sampler | model calls | images/s | FID (mean) | FID per seed | "
          "vs DDIM-25, per seed |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ddim = next(d for d in rows if d["scale"] == r["scale"])
        print(f"| {r['scale']:g} | {r['name']} | {r['calls']} | {r['rate']:.1f} | "
              f"{r['fid']:.3f} | {', '.join(f'{f:.3f}' for f in r['fids'])} | "
              f"{', '.join(f'{f - g:+.3f}' for f, g in zip(r['fids'], ddim['fids']))} |")
    for scale in (0.0, 2.0):
        here = [r for r in rows if r["scale"] == scale]
        ddim = here[0]
        matched = [r for r in here[1:] if r["name"].startswith("DPM")
                   and all(f <= g for f, g in zip(r["fids"], ddim["fids"]))]
        if matched:
            best = max(matched, key=lambda r: r["rate"])
            print(f"scale {scale:g}: {best['name']}, FID {best['fid']:.3f} vs DDIM-25's "
                  f"{ddim['fid']:.3f} (no worse on every seed): {best['rate'] / ddim['rate']:.2f}x "
                  "the images/s at equal FID")
        else:
            print(f"scale {scale:g}: no DPM-Solver++ row reached DDIM-25's FID on every seed "
                  f"({ddim['fid']:.3f})")


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
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: " + ", ".join(
                            [*VARIANTS, *CUDA_VARIANTS, DEFAULT_ROW]))
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
        variants = {k: variants[k] for k in args.variants.split(",")}
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
                      [int(x) for x in args.quality_seeds.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
