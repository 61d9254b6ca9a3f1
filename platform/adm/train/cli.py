"""The command line shared by `jobs/train_{diffusion,classifier,upsampler}.py` (contract 9):

    python jobs/train_diffusion.py --config YAML [--data URI] [--num-workers N] [--gpus]
        [--storage URI] [--max-steps N] [--init-from PT] [--address ADDR] [key=value ...]

`key=value` overrides any config key (`optim.lr=3e-4`, `run.name=big`). Everything is checked
before Ray starts; running the same command again resumes the run.
"""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from .config import load_config


def parse_args(kind: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"train_{kind}.py", description=f"Train the {kind} model "
                                "on Ray Train (resumes a run found in its storage folder).")
    p.add_argument("--config", required=True, help="YAML config (path or s3:// URI)")
    p.add_argument("--data", help="training shards: overrides data.uri")
    p.add_argument("--val-data", help="held-out shards: overrides data.val_uri")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides run.num_workers)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (run.use_gpu)")
    p.add_argument("--storage", help="where runs live, local or s3:// (run.storage)")
    p.add_argument("--max-steps", type=int, help="train to this step (optim.max_steps)")
    p.add_argument("--init-from", help="a released-format state dict to fine-tune from")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def main(kind: str, argv: list[str] | None = None) -> int:
    args = parse_args(kind, argv)
    try:
        cfg = load_config(
            args.config, args.overrides,
            data__uri=args.data, data__val_uri=args.val_data,
            run__num_workers=args.num_workers, run__use_gpu=True if args.gpus else None,
            run__storage=args.storage, optim__max_steps=args.max_steps,
            run__init_from=args.init_from)
        if cfg.kind != kind:
            raise ConfigError(f"kind: {args.config} is a {cfg.kind!r} config; this job trains "
                              f"{kind!r} models")
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ..data.prepare import init_ray
    from .trainer import fit, run_uri

    init_ray(args.address)
    try:
        fit(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{kind}] done: {run_uri(cfg)} (exported to {run_uri(cfg)}/export)")
    return 0
