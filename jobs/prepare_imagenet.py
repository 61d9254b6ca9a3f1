"""Write ImageNet (or any class-folder image set) as Parquet shards, locally or to s3://.

    python jobs/prepare_imagenet.py --src /data/ILSVRC2012_img_train.tar --out s3://bucket/imagenet
    python jobs/prepare_imagenet.py --src train/ --val val/ --val-labels LOC_val_solution.csv \
        --out /data/imagenet-shards [--images-per-shard 1000] [--address ray://...]

Writes OUT/train (and OUT/val) with shard-*.parquet, classes.json and manifest.json.
Bad images are skipped, logged and listed in the manifest; rerunning after an interruption
finishes the job without rewriting finished shards. See adm.data.shards for the details.
The inputs are checked before Ray starts; a problem with them (here or later, e.g. no usable
images) ends the job with one `error: ...` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse

from adm.data.prepare import check_prepare_inputs, prepare_imagenet
from adm.data.shards import ShardWriterConfig
from adm.runtime import CHECK_HELP, check_passed, init_ray, run_job
from adm.storage import S3Options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="training images: a class-folder tree, or a tar of per-class "
                                 "tars / of a class-folder tree (path or s3:// URI)")
    p.add_argument("--out", required=True, help="dataset root to write (path or s3:// URI)")
    p.add_argument("--images-per-shard", type=int, default=1000)
    p.add_argument("--val", help="validation images: a folder or tar (flat, with --val-labels, "
                                 "or class folders)")
    p.add_argument("--val-labels", help="file naming each validation image's class: "
                                        "'<image> <synset>' lines or LOC_val_solution.csv")
    p.add_argument("--seed", type=int, default=0, help="seed of the image-to-shard permutation")
    p.add_argument("--num-cpus-per-task", type=float, default=1.0,
                   help="CPU share of each decode-check / shard-writing Ray task")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="Ray tasks submitted at once (default: twice the cluster's CPUs)")
    p.add_argument("--progress-interval", type=float, default=10.0,
                   help="least seconds between two updates of a progress bar")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--verbose", action="store_true", help="let Ray's own logs through")
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
    return p.parse_args(argv)


@run_job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s3 = S3Options.from_env(endpoint_url=args.s3_endpoint)
    # Everything that can be checked cheaply, before Ray starts.
    config = ShardWriterConfig(images_per_shard=args.images_per_shard, shuffle_seed=args.seed,
                               num_cpus_per_task=args.num_cpus_per_task,
                               max_in_flight=args.max_in_flight,
                               progress_interval_s=args.progress_interval)
    if args.check:
        return check_passed("prepare_imagenet.py")
    check_prepare_inputs(args.out, src=args.src, val=args.val, val_labels=args.val_labels, s3=s3)
    init_ray(args.address, args.verbose)
    # InputErrors found while running: no usable images, a foreign --out, ...
    prepare_imagenet(args.out, src=args.src, val=args.val, val_labels=args.val_labels,
                     config=config, s3=s3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
