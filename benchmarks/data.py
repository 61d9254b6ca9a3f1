"""Decode-and-crop throughput of the Ray Data pipeline vs a plain single-process PIL loop, and
how many such CPU cores one GPU training ADM-128 needs.

    python benchmarks/data.py [--images 384] [--sizes 64 128 256] [--cores N]

What is measured, in one run, over the same shards:

* **PIL loop**: one process reads the Parquet shards with pyarrow and, per image, does what
  training needs: ``decode_image`` + ``center_crop_arr`` + random flip + scaling to float32 CHW
  in [-1, 1]. One core, no Ray.
* **Ray Data**: ``adm.data.image_dataset`` (the training pipeline: seeded shard/row shuffle,
  the same per-image work in Ray Data tasks) consumed by the driver with ``iter_batches``, with
  ``--cores`` decode tasks of 1 CPU each. Images/s per core = images/s / cores. The first epoch
  warms the workers up and is not counted.

The source images are ImageNet-like JPEGs (quality 90, 333-500 x 500-640 pixels, ~ImageNet's
typical sizes) cut from the two photographs in ``tests/fixtures/adm_reference/preprocess.pt``.

Timing is a plain measured loop (``measure``: one pass, ``time.perf_counter`` and
``time.process_time``), not ``torch.utils.benchmark.Timer``: the Timer repeats a code snippet
and reports seconds per run, while this measures items per second over one pass of a stateful
iterator (a Ray Data epoch cannot be replayed cheaply, the first one must be left out as
warm-up) and needs CPU time besides wall time, which the Timer does not give.

The GPU side is an assumption, not a measurement (no GPU here): an ADM-128 training step costs
3x its forward FLOPs per image (counted with ``torch.utils.flop_counter`` on
``adm.factory.create_model`` with the README's 128x128 flags), and a GPU sustains a given
fraction (``--mfu``, default 0.35, typical of convolutional U-Nets in bf16 autocast) of its dense
bf16 peak (H100 SXM 989 TFLOP/s, A100 312 TFLOP/s; vendor data sheets). Pass a measured rate
with ``--gpu-images-per-s`` to replace the estimate.

Recorded 2026-11-25 on the 2-core CI box (shared: load average 5-11 from other jobs during the
run, which depresses the multi-process wall-clock figures most), 3,072 images in 48 shards:

    size | PIL loop img/s (1 core) | per CPU-s | Ray Data img/s (2 cores) | img/s/core | per decode CPU-s
      64 |                   631.0 |     663.3 |                    227.8 |      113.9 |            609.5
     128 |                   549.8 |     587.7 |                    303.1 |      151.6 |            560.6
     256 |                   348.5 |     401.5 |                    217.3 |      108.6 |            336.1

Per CPU-second the pipeline's decode tasks do the same work as the plain loop (92-95 % at 64 and
128 px; 84 % at 256 px, where moving 786 kB float32 images out of the task costs extra). ADM-128
(614 GFLOP forward, 1.84 TFLOP per training image) at 35 % of bf16 peak: H100 SXM ~188 images/s,
A100 ~59 images/s per GPU, i.e. 0.3 (H100) / 0.1 (A100) decode cores per GPU at the CPU-time rate,
1.2 / 0.4 at this loaded box's wall-clock rate: a GPU node's own CPUs (typically 8-24 per GPU)
keep ADM-128 fed with room to spare.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100-SXM": 989.0, "A100": 312.0}
# Forward GFLOP per 128x128 image of ADM-128 (README flags), counted as described above; used
# when the model cannot be built here.
ADM128_FORWARD_GFLOP_FALLBACK = 613.9
ADM128_FLAGS = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
                "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                "--use_scale_shift_norm True")


def source_photos() -> list[Image.Image]:
    import torch

    f = torch.load(REPO / "tests/fixtures/adm_reference/preprocess.pt", weights_only=True)
    return [Image.open(io.BytesIO(bytes(f["images"][k]["png"].numpy()))).convert("RGB")
            for k in ("china", "flower")]


def imagenet_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of ImageNet-like sizes, cropped and rescaled from real photographs."""
    rng = random.Random(seed)
    photos = source_photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = rng.choice([(500, 375), (500, 333), (375, 500), (640, 427), (500, 400)])
        cw, ch = rng.randint(300, photo.width), rng.randint(200, photo.height)
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(root: Path, images: list[bytes], per_shard: int) -> str:
    from adm.data.shards import ShardWriterConfig, write_split
    from adm.data.sources import ScanResult, SourceItem

    items = [SourceItem(f"c{i % 10}/img_{i:05d}.JPEG", f"c{i % 10}", data=d)
             for i, d in enumerate(images)]
    scan = ScanResult(sorted(items, key=lambda it: it.source), [])
    out = str(root / "shards")
    write_split(scan, [f"c{i}" for i in range(10)], str(root / "shards" / "train"), split="train",
                config=ShardWriterConfig(images_per_shard=per_shard, progress_interval_s=5.0),
                log=lambda m: None)
    return out


def measure(count: Callable[[], int]) -> tuple[int, float, float]:
    """Run ``count`` once: (the number of items it says it processed, wall seconds, CPU seconds
    of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    n = count()
    return n, time.perf_counter() - start, time.process_time() - cpu


def pil_loop(uri: str, size: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one process doing the training
    preprocessing over all shards."""
    from adm.data.manifest import load_split
    from adm.data.preprocess import center_crop_arr, decode_image, hwc_to_chw, to_model_range

    def one_pass() -> int:
        rng, n = random.Random(0), 0
        for shard in load_split(uri).shard_uris:
            for data in pq.read_table(shard, columns=["image"]).column("image").to_pylist():
                arr = center_crop_arr(decode_image(data), size)
                if rng.random() < 0.5:
                    arr = arr[:, ::-1]
                np.ascontiguousarray(hwc_to_chw(to_model_range(arr)))
                n += 1
        return n

    n, wall, cpu = measure(one_pass)
    return n / wall, n / cpu


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _decode_cpu_seconds(stats: str) -> float:
    """Total CPU time of the decode tasks in the last execution, from Ray Data's stats."""
    lines = stats.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Operator") and "_decode_batch" in line:
            for follow in lines[i + 1:]:
                m = re.search(r"Remote cpu time: .* ([0-9.]+)(us|ms|s) total", follow)
                if m:
                    return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("no decode CPU time in the Ray Data stats")


def ray_pipeline(uri: str, size: int, cores: int) -> tuple[float, float]:
    """(images per wall second, images per decode-task CPU second) of the Ray Data training
    pipeline with ``cores`` 1-CPU decode tasks (second epoch; the first warms up the worker
    processes)."""
    from adm.data import DataConfig, image_dataset

    ds = image_dataset(uri, size, seed=0,
                       config=DataConfig(decode_workers=cores, decode_num_cpus=1.0))

    def one_epoch() -> int:
        return sum(len(b["label"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))

    measure(one_epoch)  # warm-up: starts the worker processes
    n, wall, _ = measure(one_epoch)  # the driver's CPU time is not the decode work: from stats
    return n / wall, n / _decode_cpu_seconds(ds.stats())


def adm128_train_gflop_per_image() -> tuple[float, str]:
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from adm.factory import create_model

        model = create_model(ADM128_FLAGS)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 3, 128, 128), torch.tensor([500]), y=torch.tensor([1]))
        forward = counter.get_total_flops() / 1e9
        how = "counted now on adm.factory.create_model"
    except Exception as e:  # noqa: BLE001 - the models may be unavailable in a partial checkout
        forward = ADM128_FORWARD_GFLOP_FALLBACK
        how = f"recorded count (model not built here: {type(e).__name__})"
    return 3 * forward, f"{forward:.0f} GFLOP forward x 3 for a training step, {how}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3072)
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="CPU cores given to Ray Data's decode tasks")
    p.add_argument("--mfu", type=float, default=0.35)
    p.add_argument("--gpu-images-per-s", type=float, default=None,
                   help="a measured ADM-128 training rate (images/s per GPU), instead of the "
                        "FLOP-based estimate")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=args.cores, include_dashboard=False,
             log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    print(f"machine: {os.cpu_count()} cores; Ray Data decode tasks: {args.cores} x 1 CPU; "
          f"Python {sys.version.split()[0]}, Pillow {Image.__version__}, Ray {ray.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        images = imagenet_like_jpegs(args.images)
        uri = write_shards(Path(tmp), images, args.images_per_shard)
        print(f"{len(images)} ImageNet-like JPEGs, mean {np.mean([len(b) for b in images]) / 1e3:.0f}"
              f" kB, in {-(-len(images) // args.images_per_shard)} shards")
        print("images/s per core = wall-clock rate / cores used; per CPU-s = images per second "
              "of CPU time spent decoding (insensitive to other load on the machine)")
        print(f"{'size':>5} | {'PIL loop img/s (1 core)':>23} | {'per CPU-s':>9} | "
              f"{'Ray Data img/s':>14} | {'img/s/core':>10} | {'per decode CPU-s':>16}")
        per_core, per_cpu_s = {}, {}
        for size in args.sizes:
            pil, pil_cpu = pil_loop(uri, size)
            ray_rate, ray_cpu = ray_pipeline(uri, size, args.cores)
            per_core[size] = ray_rate / args.cores
            per_cpu_s[size] = ray_cpu
            print(f"{size:>5} | {pil:>23.1f} | {pil_cpu:>9.1f} | {ray_rate:>14.1f} | "
                  f"{per_core[size]:>10.1f} | {ray_cpu:>16.1f}")
    ray.shutdown()

    if 128 in per_core:
        rate = per_core[128]
        if args.gpu_images_per_s:
            gpus = {"measured GPU": args.gpu_images_per_s}
            basis = "measured rate given with --gpu-images-per-s"
        else:
            gflop, basis = adm128_train_gflop_per_image()
            gpus = {name: peak * 1e3 * args.mfu / gflop for name, peak in PEAK_BF16_TFLOPS.items()}
            basis += f"; {args.mfu:.0%} of dense bf16 peak"
        print(f"\nADM-128 training, GPU rate assumed from: {basis}")
        for name, img_s in gpus.items():
            print(f"  {name}: {img_s:.0f} images/s per GPU -> {img_s / rate:.1f} cores per GPU "
                  f"at the wall-clock {rate:.0f} images/s/core; {img_s / per_cpu_s[128]:.1f} at "
                  f"the decode-CPU {per_cpu_s[128]:.0f} images/CPU-s (128 px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
