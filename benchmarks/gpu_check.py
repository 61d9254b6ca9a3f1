"""The GPU check: everything the CPU-only CI cannot show, in one run of at most 15 minutes on
one H100 (each part's time limit in TIMEOUTS), written to one JSON file. Run it through
`benchmarks/gpu_check.sh`.

1. tests: `tests/test_gpu.py` (the sampling path on CUDA: the reference's guided DDIM-10 in
   float32, fp16/bf16 autocast, compiled networks, the padding rule, the auto precision as
   torch counts native bf16, precision/recall).
2. sampling: `benchmarks/sampling.py` at ImageNet-128 (the README's model and classifier,
   random weights), guided DDIM-25, batch 64: the reference loop in fp16, as the reference's
   own command runs it (`--use_fp16 True --classifier_use_fp16 True`), and in float32, then
   fp16 and bf16 autocast, each with torch.compile on and off (compile time in its own
   column). Every ratio names its baseline: "sampling_vs_reference_loop" holds the ratios to
   the fp16 reference loop (the fair GPU baseline) and to the float32 one, apart.
3. batching: what Serve's batching buys on the GPU: 16 one-image requests of the ImageNet-128
   guided stage (DDIM-25, the auto precision, eager) run one at a time in one-row model calls
   (`max_batch_requests: 1`, `batch_rows: 1`), against one batch of 16 rows (`adm.stage`).
4. replica_start: a Serve replica's start on the GPU, three times, each a fresh process doing
   what `adm.serve.deployments` does before a replica takes requests (the ImageNet-128 guided
   stage on the device at the auto precision, with compile its warm-up calls), then its first
   request: eager; compiled with an empty inductor cache (cold); compiled again with the cache
   the cold start filled (warm: a persistent TORCHINDUCTOR_CACHE_DIR, inductor's FX graph and
   AOTAutograd caches). Serve's `compile: auto` stays off until these figures decide it.
5. precision_recall: the k-NN metric at the protocol's size (10,000 real x 50,000 fake
   2048-d features, float32) on the GPU, and the same on a 5,000-point subset on the GPU and
   the CPU (float64: equal results).

Each part runs in its own process (a part that fails or runs out of time is recorded as such;
the others still run).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUTS = {"tests": 120, "sampling": 120, "sampling_compiled": 240, "batching": 60,
            "replica_start": 300, "precision_recall": 40}
# Eager rows, then compiled rows in a process of their own (a compile that overruns its time
# then costs only its own rows); the ratios to the reference loops are taken across the two.
SAMPLING_ROWS = {
    "sampling": "reference loop fp16,reference loop fp32,fp16 autocast,bf16 autocast",
    "sampling_compiled": "fp16 + compile,bf16 + compile"}
# The CPU dry run (--smoke): bf16 for the fp16 autocast rows (CPU fp16 autocast is slow); the
# fp16 reference loop still runs, at toy size, so that its path is exercised.
SMOKE_ROWS = {"sampling": "reference loop fp16,reference loop fp32,bf16 autocast",
              "sampling_compiled": "bf16 + compile"}
# The baselines of the sampling ratios: the reference's own fp16 run, then float32.
BASELINES = {"reference loop fp16": "the reference loop in fp16 (its --use_fp16 command)",
             "reference loop fp32": "the reference loop in float32"}


def run_bounded(argv: list[str], timeout: float, **kwargs) -> tuple[int | str, str]:
    """Run `argv` in a process group of its own for at most `timeout` s: (exit status or
    "timeout", its stdout and stderr). On timeout the whole group is killed, so a grandchild
    still compiling on the GPU does not run on into the next part."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        text, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, text
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        return "timeout", text


def run_part(name: str, argv: list[str], writes_json: bool = True) -> dict:
    """Run one part as a subprocess within its timeout (with `--json FILE` when it
    `writes_json`); its JSON result (if it wrote one), exit status, seconds and output tail."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        start = time.perf_counter()
        status, text = run_bounded(argv + (["--json", out] if writes_json else []),
                                   TIMEOUTS[name], cwd=ROOT)
        result = {"status": status, "seconds": round(time.perf_counter() - start, 1),
                  "output_tail": text[-3000:]}
        if os.path.exists(out):
            with open(out) as f:
                result["result"] = json.load(f)
    print(f"{name}: status {status}, {result['seconds']} s", flush=True)
    return result


def batching(json_path: str, smoke: bool) -> None:
    import torch

    from adm.precision import AUTOCAST, auto_precision
    from adm.stage import Job, Stage, run_batch
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


def replica_once(json_path: str, smoke: bool, compile: bool) -> None:
    """One replica start in this fresh process, as `adm.serve.deployments` starts one: the
    guided stage built on the device at the auto precision (rows of 8, Serve's default
    batch_rows), with `compile` its warm-up calls (`Stage.warm_up`), then one one-image
    request (guided DDIM-25). Seconds: "build_s" (networks on the device), "warm_up_s" (the
    compile), "ready_s" (both, after the imports), "first_request_s"; "ready_at" the wall
    clock at ready, for the launching process to add the interpreter's start."""
    import torch

    from adm.precision import AUTOCAST, auto_precision
    from adm.stage import Job, Stage, run_batch
    from sampling import CONFIGS, at_size, build, sync

    since_start = time.perf_counter()
    device = torch.device("cpu" if smoke else "cuda")
    config = at_size(CONFIGS["small32"], 16) if smoke else CONFIGS["imagenet128"]()
    model, classifier, diffusion = build(config, device)
    precision = auto_precision(device)
    stage = Stage(model, diffusion, model.image_size, 2 if smoke else 8, classifier,
                  AUTOCAST[precision], device, compile)
    sync(device)
    built = time.perf_counter()
    warm_up_s = stage.warm_up() if compile else 0.0
    sync(device)
    ready, ready_at = time.perf_counter(), time.time()
    steps = 2 if smoke else 25
    run_batch(stage, [Job.make({"sampler": "ddim", "steps": steps,
                                "classifier_scale": config["scale"]}, [1], [0])])
    sync(device)
    done = time.perf_counter()
    result = {"precision": precision, "compile": compile, "build_s": built - since_start,
              "warm_up_s": warm_up_s, "ready_s": ready - since_start, "ready_at": ready_at,
              "first_request_s": done - ready, "first_request_steps": steps,
              "cache_entries": sum(len(files) for _, _, files in os.walk(
                  os.environ.get("TORCHINDUCTOR_CACHE_DIR", os.devnull)))}
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)


def replica_start(json_path: str, smoke: bool) -> None:
    """Eager, compiled-cold and compiled-warm replica starts (`replica_once`), each in its own
    process, the compiled two sharing one inductor cache directory (empty before the cold
    one). Seconds from launching the process to ready ("process_ready_s": interpreter, imports,
    networks, compile) and the child's own figures."""
    me = str(Path(__file__).resolve())
    result = {}
    # Each start gets what is left of the part's limit (less a margin to write the result),
    # and the result is written after every start, so the starts that finished are kept.
    deadline = time.time() + TIMEOUTS["replica_start"] - 10
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as tmp:
        for name, compile in (("eager", False), ("compiled, cold cache", True),
                              ("compiled, warm cache", True)):
            out = os.path.join(tmp, "once.json")
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
                   "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
            launched = time.time()
            status, text = run_bounded(
                [sys.executable, me, "--part", "replica_once", "--json", out]
                + (["--smoke"] if smoke else []) + (["--compile"] if compile else []),
                deadline - launched, cwd=ROOT, env=env)
            if status != 0:
                result[name] = {"status": status, "output_tail": text[-2000:]}
                _write_json(json_path, result)
                continue
            with open(out) as f:
                once = json.load(f)
            # The child's figures run from its own imports; this adds the interpreter's start.
            once["process_ready_s"] = once.pop("ready_at") - launched
            result[name] = once
            print(f"  {name}: ready {once['process_ready_s']:.1f} s after launch (compile "
                  f"{once['warm_up_s']:.1f} s), first request {once['first_request_s']:.2f} s",
                  flush=True)
            _write_json(json_path, result)


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
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


PARTS = {"batching": batching, "replica_start": replica_start,
         "precision_recall": precision_recall}


def vs_reference(rows: list[dict]) -> dict:
    """Each sampling row's images/s over each reference loop's that ran (the eager and the
    compiled rows come from two processes, so the ratios are taken here), keyed by the
    baseline in words; prints one line per row and baseline."""
    rates = {r["variant"]: r["images_per_s"] for r in rows}
    out = {}
    for baseline, words in BASELINES.items():
        if baseline not in rates:
            continue
        out[words] = {name: rate / rates[baseline] for name, rate in rates.items()}
        for name, ratio in out[words].items():
            print(f"  {name}: {ratio:.2f}x {words}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--part", choices=[*PARTS, "replica_once"], default=None,
                        help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # replica_once
    parser.add_argument("--smoke", action="store_true",
                        help="a CPU dry run at toy sizes (checks the script, measures nothing)")
    args = parser.parse_args()
    if args.part:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        if args.part == "replica_once":
            replica_once(args.json, args.smoke, args.compile)
        else:
            PARTS[args.part](args.json, args.smoke)
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
    for part, rows in (SMOKE_ROWS if args.smoke else SAMPLING_ROWS).items():
        report[part] = run_part(part, [
            py, "benchmarks/sampling.py", "--tables", "variants", "--quick", "--repeats", "1"]
            + (["--device", "cpu", "--cases", "16:2", "--steps", "3"] if args.smoke else
               ["--device", "cuda", "--cases", "128:64", "--steps", "25"])
            + ["--variants", rows])
    rows = [r for part in SAMPLING_ROWS for v in report[part].get("result", {}).get("variants", [])
            for r in v["rows"]]
    report["sampling_vs_reference_loop"] = vs_reference(rows)
    for part in PARTS:
        report[part] = run_part(part, [py, me, "--part", part, *smoke])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
