"""Write the quickstart digits (scikit-learn's 8x8 digits, as 32x32 PNGs) as Parquet shards.

    python jobs/prepare_digits.py --out data/digits [--image-size 32] [--address ...]

Writes OUT/train (1,621 images) and OUT/val (176 held-out images) in the same format as
jobs/prepare_imagenet.py; see adm.data.digits for the choices made. The arguments are checked
before Ray starts; a problem with them ends the job with one `error: ...` line and status 2.
"""
from __future__ import annotations

import argparse

from adm.data.digits import DIGITS_IMAGE_SIZE, check_image_size, prepare_digits
from adm.data.prepare import check_output
from adm.data.shards import ShardWriterConfig
from adm.runtime import init_ray, run_job
from adm.storage import S3Options


@run_job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset root to write (path or s3:// URI)")
    p.add_argument("--image-size", type=int, default=DIGITS_IMAGE_SIZE)
    p.add_argument("--images-per-shard", type=int, default=256)
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--verbose", action="store_true", help="let Ray's own logs through")
    args = p.parse_args(argv)
    s3 = S3Options.from_env(endpoint_url=args.s3_endpoint)
    check_image_size(args.image_size)  # before Ray starts
    config = ShardWriterConfig(images_per_shard=args.images_per_shard,
                               num_cpus_per_task=0.5, progress_interval_s=5.0)
    check_output(args.out, "--out", s3)
    init_ray(args.address, args.verbose)
    prepare_digits(args.out, image_size=args.image_size, config=config, s3=s3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
