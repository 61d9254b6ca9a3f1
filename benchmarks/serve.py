"""Latency and throughput of the served chain (`adm.serve`): guided base sampler -> upsampler,
over real HTTP on loopback, with `@serve.batch` batching on and off, at 1, 4 and 12 concurrent
clients, in one run.

    python benchmarks/serve.py                      # tiny random-weight models on CPU
    python benchmarks/serve.py --steps 25 --requests-per-client 8

The models are TINY random-weight networks (8 px base + classifier, 8 -> 16 px upsampler),
exported to a temporary folder as training exports them: the figures measure the serving path
(HTTP, validation, handles, batching, padding, PNG encoding) more than the networks. One replica
per deployment (no autoscaling), so the two modes differ only in batching:

- on:  up to 12 requests per @serve.batch call, model calls of 8 rows (padded);
- off: one request per call, model calls of 1 row (no padding).

Each client sends its requests back to back (1 image each, a random class, its own seed);
p50/p95 are per-request latencies, images/s is images over the wall time of the whole level.
Run on an otherwise idle machine: the figures are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import requests
import torch

from adm import factory
from adm.serve import ServeSettings, build, load_settings

TINY = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "4", "num_head_channels": 32, "class_cond": True,
        "num_classes": 10, "learn_sigma": True, "resblock_updown": True,
        "diffusion_steps": 100, "noise_schedule": "cosine"}
TINY_CLASSIFIER = {"image_size": 8, "classifier_width": 32, "classifier_depth": 1,
                   "classifier_attention_resolutions": "4", "classifier_channel_mult": "1,2",
                   "classifier_num_head_channels": 32, "num_classes": 10}
TINY_UP = {**{k: v for k, v in TINY.items() if k != "image_size"}, "large_size": 16,
           "small_size": 8}
MODES = {"on": {"max_batch_requests": 12, "batch_rows": 8},
         "off": {"max_batch_requests": 1, "batch_rows": 1}}
CLIENTS = (1, 4, 12)


def export(folder: Path, net: torch.nn.Module, flags: dict) -> str:
    """Random weights saved as training exports them: model.pt + flags.json."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "flags.json").write_text(json.dumps(flags))
    return str(folder / "model.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def level(url: str, clients: int, per_client: int, steps: int) -> dict:
    """`clients` concurrent clients, `per_client` requests each: latencies and images/s."""
    def client(c: int) -> list[float]:
        out, session = [], requests.Session()
        for i in range(per_client):
            body = {"class_id": (c * 7 + i) % 10, "seed": c * 1000 + i, "steps": steps,
                    "response": "json"}
            t = time.perf_counter()
            r = session.post(f"{url}/v1/generate", json=body, timeout=300)
            r.raise_for_status()
            out.append(time.perf_counter() - t)
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(client, range(clients)) for t in ts]
    wall = time.perf_counter() - start
    return {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
            "images_per_s": len(latencies) / wall, "requests": len(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="base DDIM steps per request")
    p.add_argument("--upsampler-steps", type=int, default=4)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--cpus", type=float, default=4, help="logical CPUs of the local Ray")
    args = p.parse_args()

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        nets = {"base": export(Path(tmp, "base"), factory.create_model(TINY), TINY),
                "classifier": export(Path(tmp, "clf"), factory.create_classifier(TINY_CLASSIFIER),
                                     TINY_CLASSIFIER),
                "upsampler": export(Path(tmp, "up"), factory.create_superres_model(TINY_UP),
                                    TINY_UP)}
        for mode, batching in MODES.items():
            settings = ServeSettings.from_args({
                **nets, **batching, "max_steps": 100, "upsampler_steps": args.upsampler_steps,
                "upsampler_sampler": "ddim", "batch_wait_s": 0.02, "max_images": 1})
            options = {name: {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1,
                              "max_ongoing_requests": 32}
                       for name in ("GuidedSampler", "Upsampler", "Ingress")}
            serve.run(build(load_settings(settings), options), name=f"bench-{mode}",
                      route_prefix=f"/{mode}", blocking=False)
            url = f"http://127.0.0.1:{port}/{mode}"
            level(url, 2, 2, args.steps)  # warm-up: first calls, connections
            for clients in CLIENTS:
                rows.append((mode, clients, level(url, clients, args.requests_per_client,
                                                  args.steps)))
            serve.delete(f"bench-{mode}")
    serve.shutdown()
    ray.shutdown()

    print(f"\nadm.serve chain on loopback HTTP, TINY RANDOM-WEIGHT models (8 px base + "
          f"classifier, guidance 1.0, {args.steps} DDIM steps -> 16 px upsampler, "
          f"{args.upsampler_steps} DDIM steps), CPU, {os.cpu_count()} cores, 1 image per "
          f"request, 1 replica per deployment")
    print(f"{'batching':9} {'clients':>7} {'requests':>8} {'p50 s':>8} {'p95 s':>8} "
          f"{'images/s':>9}")
    for mode, clients, r in rows:
        print(f"{mode:9} {clients:7d} {r['requests']:8d} {r['p50']:8.3f} {r['p95']:8.3f} "
              f"{r['images_per_s']:9.2f}")


if __name__ == "__main__":
    main()
