"""Compare samples with a reference set: FID, sFID, Inception Score, precision and recall, as
the ADM evaluator computes them, on features computed by a Ray Data job:

    python jobs/evaluate.py REFERENCE SAMPLES [--features inception:PATH|classifier:URI]
        [--out JSON] [--batch-size B] [--num-workers N] [--gpus] [--resources NAME=N]
        [--image-size S] [--inception-inputs tf1|pytorch-fid] [--address ADDR]

REFERENCE and SAMPLES: an ADM .npz (arr_0 uint8 NHWC; a reference batch's mu/sigma/mu_s/sigma_s
are used), a folder written by jobs/sample.py, a prepared shard dataset, or an image folder;
paths or s3:// URIs. Features are cached beside each input, keyed by the network: a second
evaluation against the same reference reads them back. Everything is checked before Ray
starts: a bad input prints one `error: ...` line and exits 2.
"""
from __future__ import annotations

import argparse
import json

from adm.runtime import CHECK_HELP, check_passed, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("reference", help="reference images (.npz, sample folder, shards, image folder)")
    add("samples", help="images to evaluate (same kinds)")
    add("--features", help="inception:PATH (pt_inception-2015-12-05-6726825d.pth; default "
        "$ADM_INCEPTION_WEIGHTS or ./ that file) or classifier:URI (flags.json beside it)")
    add("--out", help="write the figures as JSON here (path or s3://)")
    add("--batch-size", type=int, default=64, help="images per network call")
    add("--num-workers", type=int, default=1, help="feature actors")
    add("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor reserves")
    add("--gpus", action="store_true", help="one GPU per actor")
    add("--resources", default="", help="custom Ray resources per actor, NAME=AMOUNT[,...] "
        "(adm_batch=1: cluster.yaml's batch nodes)")
    add("--image-size", type=int, help="crop of shard and image-folder inputs (default: the "
        "other input's size, else the first image's short side)")
    add("--inception-inputs", default="tf1", help="what the Inception is fed: tf1 (default: the "
        "ADM evaluator's TensorFlow graph, TF1 bilinear resize and (x-128)/128: the paper's "
        "FIDs) or pytorch-fid (F.interpolate and 2x/255-1: pytorch-fid's FIDs)")
    add("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add("--verbose", action="store_true", help="let Ray's own logs through")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--check", action="store_true", help=CHECK_HELP)
    return p.parse_args(argv)


@run_job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from adm import storage
    from adm.evaluate.evaluation import FeatureJob, format_table, make_plan, needs_features, run
    from adm.runtime import configure_output, init_ray

    configure_output(args.verbose)
    from adm.nodetypes import parse_resources

    resources = parse_resources(args.resources)
    job = FeatureJob(args.batch_size, args.num_workers, args.cpus_per_worker, args.gpus,
                     resources, args.inception_inputs)  # checked
    if args.check:
        return check_passed("evaluate.py")
    plan = make_plan(args.reference, args.samples, args.features, image_size=args.image_size,
                     inception_inputs=job.inception_inputs)  # every input checked: before Ray
    if needs_features(plan):  # both sets cached: no Ray at all
        init_ray(args.address, args.verbose)
    # An image that does not decode, found by a worker, is an InputError too.
    report = run(plan, batch_size=args.batch_size, num_workers=args.num_workers,
                 gpus=args.gpus, cpus_per_worker=args.cpus_per_worker, resources=resources,
                 progress=not args.no_progress)
    print(format_table(report))
    if args.out:
        storage.write_bytes(args.out, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
