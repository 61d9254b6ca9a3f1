"""Feature extraction for `jobs/evaluate.py`: the Ray Data job against a plain loop.

    python benchmarks/evaluate.py                       # FID Inception, CPU
    python benchmarks/evaluate.py --network classifier  # a small ADM classifier (32 px)
    python benchmarks/evaluate.py --gpus                # GPU actors (and a GPU plain loop)

Images/s of the feature job (``adm.evaluate.features.run_feature_job``: chunks of an .npz
read by each actor, the network run in batches) on a local Ray with 1 and 2 actors, against
the same network called in a plain loop in this process over the same images. The Inception
has random weights in pytorch-fid's layout (the real file has the same shapes, so the same
cost). Each job is timed end to end, actor start-up and network loading included (a real
evaluation pays them once per job); the plain loop is timed warm. Run on an otherwise idle
machine: the figures are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from adm import factory
from adm.evaluate import inception
from adm.evaluate.features import run_feature_job
from adm.evaluate.networks import FeatureExtractor, resolve_network
from adm.evaluate.sources import open_source

CLASSIFIER = {"image_size": 32, "classifier_width": 64, "classifier_depth": 2,
              "classifier_attention_resolutions": "16,8", "classifier_channel_mult": "1,2,2",
              "classifier_num_head_channels": 32, "num_classes": 10}


def _network(root: str, kind: str) -> str:
    """A random-weight feature network saved where `--features` would find it."""
    if kind == "classifier":
        torch.save(factory.create_classifier(CLASSIFIER).state_dict(),
                   os.path.join(root, "classifier.pt"))
        with open(os.path.join(root, "flags.json"), "w") as f:
            json.dump(CLASSIFIER, f)
        return "classifier:" + os.path.join(root, "classifier.pt")
    path = os.path.join(root, inception.WEIGHTS_FILE)
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    return "inception:" + path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", choices=("inception", "classifier"), default="inception")
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpus", action="store_true")
    p.add_argument("--address")
    args = p.parse_args()
    from adm.runtime import init_ray

    root = tempfile.mkdtemp(prefix="adm-bench-eval-")
    net = resolve_network(_network(root, args.network))
    images = np.random.default_rng(0).integers(
        0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    np.savez(os.path.join(root, "x.npz"), arr_0=images)
    source = open_source(os.path.join(root, "x.npz"))
    device = "cuda" if args.gpus else "cpu"
    print(f"{args.network} features of {args.num_images} images {args.image_size}px, batch "
          f"{args.batch_size}, on {device}; {os.cpu_count()} CPUs")

    # Ray starts CPU actors with one torch thread per CPU they reserve (1 here): the 1-thread
    # plain loop is the like-for-like one per actor.
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        extract = FeatureExtractor(net, args.batch_size, device)
        extract(images[:args.batch_size])  # warm-up: the first call sets kernels up
        start = time.perf_counter()
        extract(images)
        if args.gpus:
            torch.cuda.synchronize()
        rate = args.num_images / (time.perf_counter() - start)
        print(f"plain loop, one process, {n} torch thread(s): {rate:.2f} images/s (warm)")
    torch.set_num_threads(threads)

    init_ray(args.address)
    for workers in (1, 2):
        start = time.perf_counter()
        run_feature_job([source], net, batch_size=args.batch_size, num_workers=workers,
                        gpus=args.gpus, progress=False)
        took = time.perf_counter() - start
        print(f"Ray feature job, {workers} actor(s): {args.num_images / took:.2f} images/s "
              f"end to end ({took:.1f} s, actor start and network loading included)")


if __name__ == "__main__":
    main()
