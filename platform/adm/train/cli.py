"""The command line shared by `jobs/train_{diffusion,classifier,upsampler}.py`:

    python jobs/train_diffusion.py --config YAML [--data ROOT] [--val-data URI]
        [--num-workers N] [--gpus] [--storage URI] [--max-steps N] [--init-from PT]
        [--address ADDR] [--verbose] [key=value ...]

`--data ROOT` is a prepared dataset root: the run trains on its train split and holds out its
val split when it has one (`--val-data` names other held-out shards). `key=value` overrides any
config key (`optim.lr=3e-4`, `run.name=big`, `data.val_uri=null`). Everything is checked
before Ray starts; running the same command again resumes the run.
"""
from __future__ import annotations

import argparse

from .. import storage
from ..config import ConfigError
from ..data.manifest import MANIFEST
from ..runtime import CHECK_HELP, check_passed, run_job
from .config import TrainConfig, load_config


def parse_args(kind: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"train_{kind}.py", description=f"Train the {kind} model "
                                "on Ray Train (resumes a run found in its storage folder).")
    p.add_argument("--config", required=True, help="YAML config (path or s3:// URI)")
    p.add_argument("--data", help="a prepared dataset root: trains on its train split, holds "
                                  "out its val split if any (overrides data.uri, data.val_uri)")
    p.add_argument("--val-data", help="held-out shards: overrides data.val_uri")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides run.num_workers)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (run.use_gpu)")
    p.add_argument("--storage", help="where runs live, local or s3:// (run.storage)")
    p.add_argument("--max-steps", type=int, help="train to this step (optim.max_steps)")
    p.add_argument("--init-from", help="a released-format state dict to fine-tune from")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--verbose", action="store_true", help="let Ray's own logs through")
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def _held_out(root: str) -> str | None:
    """`root` when it is a dataset root with a finished val split, else None."""
    return root if storage.exists(storage.join(root, "val", MANIFEST)) else None


def resolve_config(kind: str, args: argparse.Namespace) -> TrainConfig:
    """The run's config from the file, the overrides and the command line's options (built,
    and so checked, once). With `--check`, `--data` is not looked into for a val split."""
    held_out = args.val_data
    if held_out is None and args.data and not getattr(args, "check", False):
        held_out = _held_out(args.data) or ""
    cfg = load_config(
        args.config, args.overrides,
        run__num_workers=args.num_workers, run__use_gpu=True if args.gpus else None,
        run__storage=args.storage, optim__max_steps=args.max_steps,
        run__init_from=args.init_from, data__uri=args.data, data__val_uri=held_out)
    if cfg.kind != kind:
        raise ConfigError(f"kind: {args.config} is a {cfg.kind!r} config; this job trains "
                          f"{kind!r} models")
    return cfg


@run_job
def main(kind: str, argv: list[str] | None = None) -> int:
    """The job: train (or resume) a `kind` model; bad input ends it with one ``error: ...``
    line and status 2."""
    args = parse_args(kind, argv)
    from ..runtime import configure_output, init_ray

    configure_output(args.verbose)
    cfg = resolve_config(kind, args)
    if args.check:
        return check_passed(f"train_{kind}.py")
    from .trainer import check_data, fit, run_uri

    check_data(cfg)  # before Ray starts: bad data fails in one line
    init_ray(args.address, args.verbose)
    fit(cfg, log_level="INFO" if args.verbose else "WARNING")
    print(f"[{kind}] done: {run_uri(cfg)} (exported to {run_uri(cfg)}/export)")
    return 0
