"""Generate N samples on Ray Data (guided base model, then optionally the upsampler) into the
ADM evaluator's `samples.npz`:

    python jobs/sample.py --model URI [--model-preset NAME]
        [--classifier URI [--classifier-preset NAME] --classifier-scale S
         [--guidance-interval LO HI]] [--cache-interval K] [--quality default|fast]
        [--upsampler URI [--upsampler-preset NAME] [--upsampler-steps N]]
        [--sampler ddim|ddpm|dpmpp_2m|dpmpp_3m|unipc] [--steps N] [--timesteps uniform|logsnr]
        [--lambda-min L] [--lambda-max L] [--cfg-scale W] [--num-samples N] [--batch-size B]
        [--classes uniform|balanced|3,7,9] [--seed S] [--out URI]
        [--num-workers N] [--gpus] [--config YAML] [--address ADDR] [key=value ...]

Every setting can also come from `--config YAML` (see jobs/configs/sample/) or a `key=value`
override (any `adm.generate.SampleConfig` field); the command line wins. Everything is checked
before Ray starts: a bad setting prints one `error: ...` line and exits 2. Running the same
command again resumes the run; a finished run is left as it is.

`precision: auto` (the default) is decided once Ray runs, by one task placed as a sampling
actor is (its GPU and custom resources), so a CPU-only head or a laptop submitting the job
decides nothing; the answer is recorded in settings.json, and a resume keeps it.
"""
from __future__ import annotations

import argparse

from adm.runtime import CHECK_HELP, check_passed, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--config", help="YAML file of settings (path or s3://)")
    add("--model", help="base model state dict, .pt or .safetensors (path or s3://); flags "
        "from flags.json beside it, else the safetensors metadata")
    add("--model-preset", help="flags and README sampling defaults of a released file")
    add("--classifier", help="noisy-image classifier state dict: classifier guidance")
    add("--classifier-preset", help="flags of a released classifier")
    add("--classifier-scale", type=float, help="guidance scale s (README default with a preset)")
    add("--upsampler", help="upsampler state dict: stage 2")
    add("--upsampler-preset", help="flags of a released upsampler")
    add("--upsampler-steps", help="stage 2 steps (int) or respacing ('250', 'ddim25')")
    add("--sampler", choices=("ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "unipc"),
        help="stage 1 sampler")
    add("--steps", help="stage 1 steps (int) or respacing ('250', 'ddim25')")
    add("--timesteps", choices=("uniform", "logsnr"),
        help="how an int --steps is spaced (default: the sampler's own)")
    add("--lambda-min", type=float, help="log-SNR where a logsnr grid (DPM-Solver++'s default) "
        "starts: the noisiest step with lambda >= it (default -5.1; -inf: the whole chain)")
    add("--lambda-max", type=float, help="where a logsnr grid ends: its cleanest step with "
        "lambda <= it, whose x_0 prediction is the sample (default: step 0)")
    add("--cfg-scale", type=float, help="classifier-free guidance w (1 = off; a model "
        "trained with label dropout)")
    add("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
        help="classifier guidance only at steps with noise level sigma in (LO, HI] "
        "(sigma = sqrt((1 - alpha_bar) / alpha_bar); e.g. 0.28 5.42; default: every step)")
    add("--cache-interval", type=int, help="deep-feature reuse (DeepCache): the full U-Net "
        "at every K-th model call, its full-resolution blocks only in between (1 = off)")
    # (adm.diffusion.quality.QUALITIES, written out: parsing imports no torch)
    add("--quality", choices=("default", "fast"), help="fast: the sampler, steps, grid ends, "
        "guidance interval and cache interval not given come from the fastest preset that "
        "matched DDIM-25's FID (adm.diffusion.quality); default: as before")
    add("--num-samples", type=int, help="N")
    add("--batch-size", type=int, help="stage 1 rows per model call")
    add("--classes", help="uniform, balanced, or a list of class ids/names: 3,7,9")
    add("--seed", type=int, help="the run's seed: sample i depends on (seed, i) alone")
    add("--out", help="output folder (path or s3://)")
    add("--num-workers", type=int, help="stage 1 actors")
    add("--gpus", action="store_true", default=None, help="one GPU per actor")
    add("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add("--verbose", action="store_true", help="let Ray's own logs through")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--check", action="store_true", help=CHECK_HELP)
    add("overrides", nargs="*", metavar="key=value", help="any other setting")
    return p.parse_args(argv)


def _steps(value: str | None):
    """'25' -> 25 (an int: ddim25 or 25 by sampler), anything else as written."""
    return int(value) if value is not None and value.isdigit() else value


@run_job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from adm.generate import generate, load_sample_config, make_plan
    from adm.generate.output import is_finished
    from adm.generate.pipeline import finished_message
    from adm.runtime import configure_output, init_ray

    configure_output(args.verbose)
    cfg = load_sample_config(
        args.config, args.overrides, model=args.model, model_preset=args.model_preset,
            classifier=args.classifier, classifier_preset=args.classifier_preset,
            classifier_scale=args.classifier_scale,
            guidance_interval=args.guidance_interval, cache_interval=args.cache_interval,
            quality=args.quality,
            upsampler=args.upsampler,
            upsampler_preset=args.upsampler_preset, upsampler_steps=_steps(args.upsampler_steps),
            sampler=args.sampler, steps=_steps(args.steps), timesteps=args.timesteps,
            lambda_min=args.lambda_min, lambda_max=args.lambda_max, cfg_scale=args.cfg_scale, num_samples=args.num_samples,
            batch_size=args.batch_size, classes=args.classes, seed=args.seed, out=args.out,
            num_workers=args.num_workers, gpus=args.gpus)
    if args.check:
        return check_passed("sample.py")
    plan = make_plan(cfg)  # every file read and checked: before Ray starts

    if is_finished(plan.cfg.out):  # nothing to do: no Ray either
        print(finished_message(plan))
        return 0
    init_ray(args.address, args.verbose)
    generate(plan, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
