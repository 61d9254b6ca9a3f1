"""The GPU check: everything the CPU-only CI cannot show, in one run of at most 8 minutes on
one H100, written to one JSON file. Run it through `benchmarks/gpu_check.sh`.

1. tests: `tests/test_gpu.py` (the sampling path on CUDA: the reference's guided DDIM-10 in
   float32, fp16/bf16 autocast, compiled networks, the padding rule, precision/recall).
2. sampling: `benchmarks/sampling.py` at ImageNet-128 (the README's model and classifier,
   random weights), guided DDIM-25, batch 64: the reference loop, fp16 and bf16 autocast, each
   with torch.compile on and off (compile time in its own column).
3. batching: what Serve's batching buys on the GPU: 16 one-image requests of the ImageNet-128
   guided stage (DDIM-25, the auto precision, eager) run one at a time in one-row model calls
   (`max_batch_requests: 1`, `batch_rows: 1`), against one batch of 16 rows (`adm.stage`).
4. precision_recall: the k-NN metric at the protocol's size (10,000 real x 50,000 fake
   2048-d features, float32) on the GPU, and the same on a 5,000-point subset on the GPU and
   the CPU (float64: equal results).

Each part runs in its own process (a part that fails or runs out of time is recorded as such;
the others still run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUTS = {"tests": 120, "sampling": 100, "sampling_compiled": 240, "batching": 60,
            "precision_recall": 40}
# Eager rows, then compiled rows in a process of their own (a compile that overruns its time
# then costs only its own rows); the ratios to the reference loop are taken across the two.
SAMPLING_ROWS = {"sampling": "reference loop,fp16 autocast,bf16 autocast",
                 "sampling_compiled": "fp16 + compile,bf16 + compile"}


def run_part(name: str, argv: list[str], writes_json: bool = True) -> dict:
    """Run one part as a subprocess within its timeout (with `--json FILE` when it
    `writes_json`); its JSON result (if it wrote one), exit status, seconds and output tail."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv + (["--json", out] if writes_json else []), cwd=ROOT,
                                  capture_output=True, text=True, timeout=TIMEOUTS[name])
            status, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status, text = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        result = {"status": status, "seconds": round(time.perf_counter() - start, 1),
                  "output_tail": text[-3000:]}
        if os.path.exists(out):
            with open(out) as f:
                result["result"] = json.load(f)
    print(f"{name}: status {status}, {result['seconds']} s", flush=True)
    return result


def batching(json_path: str, smoke: bool) -> None:
    import torch

    from adm.checkpoints import AUTOCAST
    from adm.stage import Job, Stage, auto_precision, run_batch
    from sampling import CONFIGS, at_size, build, sync

    device = torch.device("cpu" if smoke else "cuda")
    config = at_size(CONFIGS["small32"], 16) if smoke else CONFIGS["imagenet128"]()
    model, classifier, diffusion = build(config, device)
    precision = auto_precision(device)
    steps = 2 if smoke else 25
    args = {"sampler": "ddim", "steps": steps, "classifier_scale": config["scale"]}
    jobs = [Job.make(args, [i], [i]) for i in range(16)]
    result = {"precision": precision, "requests": len(jobs), "steps": steps}
    for name, rows, groups in (("one at a time", 1, [[j] for j in jobs]),
                               ("batched", 16, [jobs])):
        stage = Stage(model, diffusion, model.image_size, rows, classifier, AUTOCAST[precision],
                      device)
        run_batch(stage, groups[0][:1])  # warm-up (cuDNN's algorithm choice)
        sync(device)
        start = time.perf_counter()
        for group in groups:
            run_batch(stage, group)
        sync(device)
        result[name] = {"images_per_s": len(jobs) / (time.perf_counter() - start)}
    result["gain"] = result["batched"]["images_per_s"] / result["one at a time"]["images_per_s"]
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)


def precision_recall(json_path: str, smoke: bool) -> None:
    import numpy as np
    import torch

    from adm.evaluate.metrics import precision_recall as pr
    from sampling import sync

    device = torch.device("cpu" if smoke else "cuda")
    real_n, fake_n, sub, dim = (500, 1000, 300, 64) if smoke else (10_000, 50_000, 5000, 2048)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(real_n, dim)).astype(np.float32)
    fake = rng.normal(0.05, 1.02, size=(fake_n, dim)).astype(np.float32)
    result = {}
    for n in (real_n, fake_n):
        sync(device)
        start = time.perf_counter()
        p, r = pr(real, fake[:n], device=device)
        sync(device)
        result[f"{real_n}x{n}"] = {"seconds": time.perf_counter() - start, "precision": p,
                                   "recall": r}
    sub_real, sub_fake = real[:sub].astype(np.float64), fake[:sub].astype(np.float64)
    gpu = pr(sub_real, sub_fake, device=device, dtype=torch.float64)
    cpu = pr(sub_real, sub_fake, device="cpu", dtype=torch.float64)
    result[f"subset_{sub}"] = {"gpu": gpu, "cpu": cpu, "equal": gpu == cpu}
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--part", choices=["batching", "precision_recall"], default=None,
                        help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="a CPU dry run at toy sizes (checks the script, measures nothing)")
    args = parser.parse_args()
    if args.part:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        {"batching": batching, "precision_recall": precision_recall}[args.part](args.json,
                                                                              args.smoke)
        return
    import torch

    py, me = sys.executable, str(Path(__file__).resolve())
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__}
    tests = run_part("tests", [py, "-m", "pytest", "tests/test_gpu.py", "-q", "-p",
                               "no:cacheprovider", "-o", "addopts=-ra"], writes_json=False)
    tests["output_tail"] = tests["output_tail"][-1500:]
    report["tests"] = tests
    smoke = ["--smoke"] if args.smoke else []
    for part, rows in SAMPLING_ROWS.items():
        report[part] = run_part(part, [
            py, "benchmarks/sampling.py", "--tables", "variants", "--quick", "--repeats", "1"]
            + (["--device", "cpu", "--cases", "16:2", "--steps", "3", "--variants",
                rows.replace("fp16", "bf16")] if args.smoke else
               ["--device", "cuda", "--cases", "128:64", "--steps", "25", "--variants", rows]))
    rows = [r for part in SAMPLING_ROWS for v in report[part].get("result", {}).get("variants", [])
            for r in v["rows"]]
    reference = next((r["images_per_s"] for r in rows if r["variant"] == "reference loop"), None)
    report["sampling_vs_reference_loop"] = {
        r["variant"]: r["images_per_s"] / reference for r in rows} if reference else None
    report["batching"] = run_part("batching", [py, me, "--part", "batching", *smoke])
    report["precision_recall"] = run_part("precision_recall", [py, me, "--part",
                                                              "precision_recall", *smoke])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
