"""Training throughput on Ray Train: images/s and the fraction of step time spent waiting for
data, for 1 and 2 workers, measured in one run on the same data.

    python benchmarks/train.py                        # CPU, small ADM on the 32x32 digits
    python benchmarks/train.py --gpus --preset 128x128_diffusion --precision bf16,fp32

On CPU it trains the quickstart U-Net (32 px); with --gpus the model of --preset (random init)
on the digits upscaled to its size. Each configuration is a fresh run of `--steps` steps; the
figures are those of the last `--steps // 2` steps (Ray Train reports them per interval), so
worker start-up and the first epoch's pipeline warm-up are left out.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--gpus", action="store_true")
    ap.add_argument("--preset", default="128x128_diffusion", help="model with --gpus")
    ap.add_argument("--precision", default="fp32", help="comma list: fp32,bf16,fp16")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from adm.data.digits import prepare_digits
    from adm.train.config import load_config
    from adm.train.trainer import fit

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=max(4, os.cpu_count() or 1))
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = tempfile.mkdtemp(prefix="adm-bench-train-")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "jobs/configs/quickstart/diffusion.yaml")))
    size = 32
    if args.gpus:
        cfg["model"] = {"preset": args.preset, "flags": {"num_classes": 10}}
        from adm.presets import preset

        size = preset(args.preset).model_flags["image_size"]
    data = os.path.join(work, "digits")
    prepare_digits(data, image_size=size)
    half = args.steps // 2
    rows = []
    for precision in args.precision.split(","):
        for n in map(int, args.workers.split(",")):
            path = os.path.join(work, f"cfg-{precision}-{n}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            run = load_config(path, [
                f"optim.batch_size={args.batch}", f"optim.max_steps={args.steps}",
                f"optim.precision={precision}", f"run.num_workers={n}",
                f"run.name=bench-{precision}-{n}", f"run.storage={work}/runs",
                f"run.log_interval={half}", f"run.save_interval={args.steps}",
                f"data.uri={data}", "data.decode_num_cpus=0.5", "data.decode_workers=2",
                f"run.cpus_per_worker={1 if args.gpus else 0.5}",
                f"run.use_gpu={str(args.gpus).lower()}"]
                # the preset's use_fp16 must agree with the precision measured
                + ([f"model.flags.use_fp16={str(precision == 'fp16').lower()}"]
                   if args.gpus else []))
            m = fit(run).metrics  # the last interval's metrics (reported with the checkpoint)
            rows.append((precision, n, m["images_per_s"], m["data_wait_frac"]))
            print(f"# {precision} x{n}: {m['images_per_s']:.1f} images/s, "
                  f"data wait {m['data_wait_frac']:.1%}", flush=True)
    print(f"\n{'precision':10} {'workers':>7} {'images/s':>9} {'vs 1 worker':>11} {'data wait':>9}")
    for precision, n, ips, wait in rows:
        base = next(r[2] for r in rows if r[0] == precision and r[1] == rows[0][1])
        print(f"{precision:10} {n:7d} {ips:9.1f} {ips / base:10.2f}x {wait:9.1%}")


if __name__ == "__main__":
    main()
