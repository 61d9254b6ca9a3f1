"""The paper's evaluation protocol at its real size: 50,000 samples generated, killed, resumed
and scored against a 10,000-image reference.

    python benchmarks/scale.py                      # both tables (about 15 min on 2 cores)
    python benchmarks/scale.py --only generate      # or evaluate
    python benchmarks/scale.py --sizes 2000,10000 --eval-samples 10000 --eval-reference 2000

Generation: `jobs/sample.py` as a user runs it, a separate driver process per run connected to
one local Ray (started here), on a tiny random-weight 8 px ADM (DDIM-2) chained through a tiny
8->16 upsampler (DDIM-2), 2 actors per stage. Every setting that decides speed is passed
explicitly. Per size: wall time, samples/s, the driver's peak RSS (its own VmHWM, which it
writes as it exits), the object store's spill during the run. Then the largest run again, its
driver SIGKILLed once half its shards are written, and the same command run again: its
samples.npz must equal the uninterrupted run's (sha256), and the work redone is the samples
the killed driver had received (its live progress bar, read through a pseudo-terminal) beyond
the shards it wrote.

Evaluation: the largest run's samples against the reference (the smaller run, another seed),
features from a tiny random-weight classifier (the `classifier` feature kind, buildable here),
each phase timed: the Ray feature job, FID statistics and distance, Inception Score, precision
and recall (k = 3) at the reference size and at the full size. Precision and recall are checked
against a brute-force computation (scipy's cdist, float64, every distance at once) on a 5,000
subset. The same phases at Inception's width (2048-d features, random) show what a real FID
evaluation costs, with precision/recall on 1 torch thread against all, and on the GPU with
--device cuda. Peak RSS of this process is printed after each phase.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import numpy as np
import torch

from adm import factory

ROOT = Path(__file__).resolve().parents[1]
BASE = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "4", "num_head_channels": 32, "class_cond": True,
        "num_classes": 10, "learn_sigma": True, "resblock_updown": True,
        "diffusion_steps": 100, "noise_schedule": "cosine"}
UP = {**{k: v for k, v in BASE.items() if k != "image_size"}, "large_size": 16,
      "small_size": 8}
CLASSIFIER = {"image_size": 16, "classifier_width": 32, "classifier_depth": 1,
              "classifier_attention_resolutions": "8", "classifier_channel_mult": "1,2",
              "classifier_num_head_channels": 32, "classifier_pool": "adaptive",
              "num_classes": 10}
MIB = 1024 * 1024


def export_random(folder: Path, net: torch.nn.Module, flags: dict, seed: int) -> str:
    """`net` with random N(0, 0.1^2) weights (ADM zero-initialises its output layers: every
    sample would be alike), saved as training exports it, flags.json beside it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "flags.json").write_text(json.dumps(flags))
    return str(folder / "model.pt")


def tiny_models(root: Path) -> dict[str, str]:
    return {"model": export_random(root / "base", factory.create_model(BASE), BASE, 1),
            "upsampler": export_random(root / "up", factory.create_superres_model(UP), UP, 2)}


def sample_settings(models: dict[str, str], num_samples: int, *, seed: int = 0,
                    shard_size: int = 1000, batch_size: int = 100, workers: int = 2,
                    chained: bool = True, steps: int = 2) -> dict:
    """Every setting of the run, speed ones included (defaults may change; figures must not)."""
    s = dict(model=models["model"], num_samples=num_samples, seed=seed, sampler="ddim",
             steps=steps, eta=0.0, precision="fp32", shard_size=shard_size,
             batch_size=batch_size, num_workers=workers, cpus_per_worker=0.5, classes="uniform")
    if chained:
        s.update(upsampler=models["upsampler"], upsampler_sampler="ddim", upsampler_steps=2,
                 upsampler_batch_size=batch_size, upsampler_workers=workers)
    return s


def spilled_bytes(address: str) -> int:
    """Bytes the cluster's object stores have spilled since it started (Ray's memory summary)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return int(get_memory_info_reply(get_state_from_address(address)).store_stats
               .spilled_bytes_total)


_PROGRESS = re.compile(rb"(\d+)/(\d+) \[")
# A child's ru_maxrss starts at its parent's RSS (Linux carries it over fork and exec), so a
# driver forked from this process (over 1 GiB) would report that. The driver writes its own
# VmHWM (its peak since exec) to ADM_PEAK_FILE as it exits instead.
_OWN_PEAK = """import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["ADM_PEAK_FILE"], "w") as f:
        f.write(str(kib))
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_driver(settings: dict, out: str, address: str, kill_at_shards: int | None = None,
               timeout: float = 3600) -> dict:
    """`jobs/sample.py` with `settings` as key=value overrides, as its own driver process on
    the Ray at `address`. Its stderr is a pseudo-terminal, so its progress bar is live (a
    redraw every 0.1 s): the last count drawn is what the driver had received. With
    `kill_at_shards`, SIGKILL it once that many shard files exist.

    :return: wall_s, rc, peak_rss_mib (the driver's own VmHWM, None when killed), received
    (the last progress count), draws ([(time, count)] of every progress draw, for `halves`),
    killed, shards_at_kill, output (stdout and stderr)."""
    peak_file = Path(tempfile.mkdtemp(prefix="adm-peak-")) / "vmhwm_kib"
    cmd = [sys.executable, "-c", _OWN_PEAK, str(ROOT / "jobs" / "sample.py"), "--address",
           address, "--out", out] + [f"{k}={v}" for k, v in settings.items()]
    master, slave = pty.openpty()
    # A window of 0 columns draws a bar of nothing: give the terminal a width.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env={**os.environ, "ADM_PEAK_FILE": str(peak_file)})
    os.close(slave)
    chunks: list[tuple[float, bytes]] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the driver is gone (EIO on a closed pty)
                return
            if not data:
                return
            chunks.append((time.perf_counter(), data))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed, shards_at_kill = False, None
    shards = Path(out) / "shards"
    while proc.poll() is None and kill_at_shards is not None and not killed:
        if time.perf_counter() - start > timeout:
            break
        done = len(list(shards.glob("shard-*.npz"))) if shards.is_dir() else 0
        if done >= kill_at_shards:
            os.kill(proc.pid, signal.SIGKILL)
            killed, shards_at_kill = True, done
        time.sleep(0.02)
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    os.close(master)
    output = b"".join(data for _, data in chunks)
    counts = _PROGRESS.findall(output)
    draws = [(t, int(c)) for t, data in chunks for c, _ in _PROGRESS.findall(data)]
    peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else None
    shutil.rmtree(peak_file.parent)
    return {"wall_s": wall, "rc": proc.returncode, "peak_rss_mib": peak,
            "received": int(counts[-1][0]) if counts else None, "draws": draws,
            "killed": killed,
            "shards_at_kill": shards_at_kill,
            "output": output.decode(errors="replace")}


def halves(run: dict) -> tuple[float, float]:
    """Seconds per sample over the first and the second half of a run's sampling (from its
    first counted batch to half the samples, and from there to the last draw): equal when the
    time is linear in the samples, the second larger when a sample costs more the more came
    before it."""
    draws = [d for d in run["draws"] if d[1] > run["draws"][0][1]]
    (t0, c0), (t1, c1) = draws[0], draws[-1]
    mid_c = (c0 + c1) // 2
    tm, cm = next(d for d in draws if d[1] >= mid_c)
    return (tm - t0) / (cm - c0), (t1 - tm) / (c1 - cm)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kill_and_resume(settings: dict, out: str, address: str) -> dict:
    """Run `settings` into `out`, SIGKILL its driver once half the shards are written, run the
    same command again. :return: both runs' figures, the shards finished at the kill, and the
    samples redone (received by the killed driver, not in a finished shard)."""
    n, size = settings["num_samples"], settings["shard_size"]
    shards = -(-n // size)
    killed = run_driver(settings, out, address, kill_at_shards=shards // 2)
    if not killed["killed"]:
        raise RuntimeError(f"the run ended before it could be killed:\n{killed['output']}")
    finished = len(list((Path(out) / "shards").glob("shard-*.npz")))
    resumed = run_driver(settings, out, address)
    if resumed["rc"] != 0:
        raise RuntimeError(f"the resumed run failed:\n{resumed['output']}")
    kept = min(finished * size, n)
    return {"killed": killed, "resumed": resumed, "finished_shards": finished,
            "kept_samples": kept, "redone": (killed["received"] or 0) - kept,
            "resume_log": re.findall(r"resuming: .*", resumed["output"])}


def start_ray(num_cpus: int | None) -> str:
    """A local Ray for the drivers to join; its GCS address."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()  # the feature job's progress: timed, not drawn
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    return ray.get_runtime_context().gcs_address


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_generate(args, root: Path, address: str) -> dict:
    models = tiny_models(root / "models")
    runs = {}
    for i, n in enumerate(args.sizes):
        s = sample_settings(models, n, seed=i, shard_size=args.shard_size,
                            batch_size=args.batch_size, workers=args.workers)
        before = spilled_bytes(address)
        r = run_driver(s, str(root / f"gen{n}"), address)
        if r["rc"] != 0:
            raise RuntimeError(f"the {n}-sample run failed:\n{r['output']}")
        r["spilled_mib"] = (spilled_bytes(address) - before) / MIB
        r["sha256"] = sha256(str(root / f"gen{n}" / "samples.npz"))
        r["settings"] = s
        runs[n] = r
        print(f"generated {n}: {r['wall_s']:.1f} s, {n / r['wall_s']:.1f} samples/s, driver "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB, spilled {r['spilled_mib']:.0f} MiB",
              flush=True)
    big = args.sizes[-1]
    kr = kill_and_resume(runs[big]["settings"], str(root / f"killed{big}"), address)
    kr["identical"] = sha256(str(root / f"killed{big}" / "samples.npz")) == runs[big]["sha256"]
    print(f"killed at {kr['finished_shards']} shards, resumed: {kr['resume_log']}; identical "
          f"{kr['identical']}; redone {kr['redone']} samples", flush=True)
    small = args.sizes[0]
    rows = [[f"{n:,}", f"{r['wall_s']:.1f}", f"{n / r['wall_s']:.1f}",
             f"{r['peak_rss_mib']:.0f}", f"{r['spilled_mib']:.0f}"] for n, r in runs.items()]
    print(f"\nSampling at scale ({args.workers} actors per stage, 8 px DDIM-2 -> 16 px DDIM-2, "
          f"batch {args.batch_size}, shards of {args.shard_size}; {os.cpu_count()} CPUs)\n")
    print(table(["samples", "wall s", "samples/s", "driver peak RSS MiB", "spilled MiB"],
                rows))
    ratio = runs[big]["wall_s"] / runs[small]["wall_s"]
    growth = runs[big]["peak_rss_mib"] - runs[small]["peak_rss_mib"]
    killed, resumed = kr["killed"], kr["resumed"]
    print(f"\ntime {big:,} / time {small:,}: {ratio:.2f} (x{big / small:g} samples); driver "
          f"peak RSS growth {growth:+.0f} MiB")
    print(f"killed (SIGKILL) after {killed['wall_s']:.1f} s with {kr['finished_shards']} of "
          f"{-(-big // args.shard_size)} shards written ({kr['kept_samples']:,} samples) and "
          f"{killed['received']:,} received; the rerun took {resumed['wall_s']:.1f} s "
          f"(killed + rerun {killed['wall_s'] + resumed['wall_s']:.1f} s vs "
          f"{runs[big]['wall_s']:.1f} s uninterrupted); redone: {kr['redone']} samples "
          f"({kr['redone'] / args.shard_size:.2f} shards, {args.workers} actors); samples.npz "
          f"sha256 equal to the uninterrupted run's: {kr['identical']}")
    return {"runs": runs, "kill": kr, "ratio": ratio, "rss_growth": growth}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision and recall from every distance at once (scipy cdist, float64): the
    independent check of the blocked computation."""
    from scipy.spatial.distance import cdist

    def radii(x):
        return np.partition(cdist(x, x, "sqeuclidean"), k, axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    d = cdist(real, fake, "sqeuclidean")
    return float((d <= r_real[:, None]).any(0).mean()), float((d <= r_fake[None]).any(1).mean())


def _timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - start


def bench_evaluate(args, root: Path, samples: str, reference: str) -> None:
    from adm.evaluate.evaluation import make_plan
    from adm.evaluate.features import run_feature_job, summarize
    from adm.evaluate.metrics import (fid_statistics, frechet_distance, inception_score,
                                      precision_recall, softmax)

    export_random(root / "judge", factory.create_classifier(CLASSIFIER), CLASSIFIER, 3)
    plan = make_plan(reference, samples, f"classifier:{root / 'judge' / 'model.pt'}")
    n_ref, n_smp = plan.reference.num_images, plan.samples.num_images
    rows = []
    raw, took = _timed(run_feature_job, [plan.reference, plan.samples], plan.network,
                       batch_size=256, num_workers=args.workers, cpus_per_worker=0.5,
                       progress=False)
    rows.append(["features (Ray job, classifier, 2 actors)", f"{took:.1f}",
                 f"{(n_ref + n_smp) / took:.0f} images/s"])
    ref_raw, smp_raw = raw
    (ref, smp), took = _timed(lambda: [summarize(r, s, plan.network, write=False)
                                       for r, s in zip(raw, (plan.reference, plan.samples))])
    fid, t_fid = _timed(frechet_distance, smp.mu, smp.sigma, ref.mu, ref.sigma)
    dim = ref.pool.shape[1]
    rows.append([f"FID: statistics + distance ({dim}-d)", f"{took + t_fid:.1f}",
                 f"FID {fid:.4g} (same model, another seed)"])
    score, took = _timed(inception_score, softmax(smp.logits))
    rows.append(["Inception Score (splits of 5,000)", f"{took:.1f}", f"{score:.4f}"])
    print(f"after features and FID: peak RSS of this process {_peak_rss_mib():.0f} MiB",
          flush=True)
    device = args.device
    (p10, r10), took = _timed(precision_recall, ref.pool, smp.pool[:n_ref], device=device)
    rows.append([f"precision/recall {n_ref:,} x {n_ref:,} ({dim}-d, {device})", f"{took:.1f}",
                 f"P {p10:.4f} R {r10:.4f}"])
    (p, r), took = _timed(precision_recall, ref.pool, smp.pool, device=device)
    rows.append([f"precision/recall {n_smp:,} x {n_ref:,} ({dim}-d, {device})", f"{took:.1f}",
                 f"P {p:.4f} R {r:.4f}"])
    print(f"after precision/recall: peak RSS of this process {_peak_rss_mib():.0f} MiB",
          flush=True)
    sub = min(5000, n_ref, n_smp)
    want = brute_force_pr(ref.pool[:sub].astype(np.float64), smp.pool[:sub].astype(np.float64))
    got64 = precision_recall(ref.pool[:sub], smp.pool[:sub], dtype=torch.float64,
                             rows=1000, cols=1500)
    got32 = precision_recall(ref.pool[:sub], smp.pool[:sub], device=device)
    print(f"precision/recall on a {sub:,} subset: brute force (float64) {want}, blocked "
          f"float64 {got64}, blocked float32 {got32}: equal {got64 == want}, "
          f"{got32 == want}", flush=True)
    if got64 != want:
        raise RuntimeError("blocked precision/recall differs from brute force")

    # Inception's width: what the same phases cost with 2048-d features (random ones).
    g = np.random.default_rng(0)
    big_ref = g.standard_normal((n_ref, 2048), dtype=np.float32)
    big_smp = g.standard_normal((n_smp, 2048), dtype=np.float32) * 1.05
    (mu1, s1), t1 = _timed(fid_statistics, big_smp)
    (mu2, s2), t2 = _timed(fid_statistics, big_ref)
    _, t3 = _timed(frechet_distance, mu1, s1, mu2, s2)
    rows.append([f"FID at 2048-d: statistics {n_smp:,} + {n_ref:,}, distance",
                 f"{t1 + t2 + t3:.1f}", f"{t1:.1f} + {t2:.1f} + {t3:.1f} s"])
    threads = torch.get_num_threads()
    if device == "cpu" and threads > 1:
        torch.set_num_threads(1)
        _, one = _timed(precision_recall, big_ref, big_smp[:n_ref])
        torch.set_num_threads(threads)
        rows.append([f"precision/recall {n_ref:,} x {n_ref:,} (2048-d, cpu, 1 thread)",
                     f"{one:.1f}", ""])
    _, t = _timed(precision_recall, big_ref, big_smp[:n_ref], device=device)
    rows.append([f"precision/recall {n_ref:,} x {n_ref:,} (2048-d, {device}, "
                 f"{threads} threads)", f"{t:.1f}", ""])
    _, t = _timed(precision_recall, big_ref, big_smp, device=device)
    rows.append([f"precision/recall {n_smp:,} x {n_ref:,} (2048-d, {device}, "
                 f"{threads} threads)", f"{t:.1f}", ""])
    print(f"after 2048-d phases: peak RSS of this process {_peak_rss_mib():.0f} MiB")
    print(f"\nEvaluation at scale ({n_smp:,} samples x {n_ref:,} reference; {os.cpu_count()} "
          f"CPUs)\n")
    print(table(["phase", "seconds", "result"], rows))


def bench_inputs(args) -> None:
    """FID between two sets with each Inception input handling: the 8x8 digits of
    scikit-learn upscaled to 32 px (first half) against the second half blurred, features from
    the FID Inception with --inception-weights, else with random He-initialised weights (batch
    norm with unit statistics; only the relative shift means anything then)."""
    from PIL import Image, ImageFilter
    from sklearn.datasets import load_digits

    from adm.evaluate import inception
    from adm.evaluate.metrics import fid_statistics, frechet_distance

    digits = (load_digits().images * 255 / 16).astype(np.uint8)[:2 * args.fid_images]

    def image(d, blur):
        im = Image.fromarray(d).resize((32, 32), Image.BICUBIC).convert("RGB")
        return np.asarray(im.filter(ImageFilter.GaussianBlur(1)) if blur else im)

    a = np.stack([image(d, False) for d in digits[0::2]])
    b = np.stack([image(d, True) for d in digits[1::2]])
    if args.inception_weights:  # the real network: FIDs comparable with anyone's
        path = args.inception_weights
        net = inception.load_inception(inception.read_weights(Path(path).read_bytes(), path))
        kind = "the FID Inception"
    else:
        g = torch.Generator().manual_seed(0)
        net = inception.FIDInceptionV3()
        with torch.no_grad():
            # He's N(0, 2/fan_in): each ReLU layer keeps its input's scale, so 2048-d pool
            # features of O(1) (1/fan_in shrinks them ~sqrt(2) per layer, to FIDs of ~1e-6).
            for name, t in net.state_dict().items():
                if name.endswith("weight") and t.ndim > 1:
                    t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
        net.eval()
        kind = "random-weight FID Inception"
    fids = {}
    for mode in inception.INPUTS:
        net.inputs = mode
        with torch.no_grad():
            fa, fb = (torch.cat([net(torch.from_numpy(x[i:i + 25]))["pool"]
                                 for i in range(0, len(x), 25)]).numpy() for x in (a, b))
        fids[mode] = frechet_distance(*fid_statistics(fa), *fid_statistics(fb))
    shift = fids["pytorch-fid"] - fids["tf1"]
    print(f"FID of {len(a)} digits vs {len(b)} blurred digits (32 px, {kind}): tf1 inputs "
          f"{fids['tf1']:.5g}, pytorch-fid inputs {fids['pytorch-fid']:.5g}, shift "
          f"{shift:+.4g} ({shift / fids['tf1'] * 100:+.1f}%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("generate", "evaluate", "inputs"))
    p.add_argument("--fid-images", type=int, default=200, help="images per set (inputs)")
    p.add_argument("--inception-weights", default=os.environ.get("ADM_INCEPTION_WEIGHTS"),
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for the inputs "
                   "phase (default: $ADM_INCEPTION_WEIGHTS, else random weights)")
    p.add_argument("--sizes", default="10000,50000", help="generation sizes, smallest first")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="actors per stage")
    p.add_argument("--num-cpus", type=int, help="the local Ray's CPUs (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where precision/recall's distance blocks run")
    p.add_argument("--keep", help="a folder to keep the runs in (default: a temporary one)")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.inception_weights and not Path(args.inception_weights).is_file():
        from adm.evaluate.inception import missing_weights_message

        p.error(missing_weights_message(args.inception_weights))
    if args.only in (None, "inputs"):
        bench_inputs(args)
        if args.only:
            return
    root = Path(args.keep or tempfile.mkdtemp(prefix="adm-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"runs under {root}", flush=True)
    address = start_ray(args.num_cpus)
    if args.only != "evaluate":
        bench_generate(args, root, address)
    if args.only != "generate":
        big, small = args.sizes[-1], args.sizes[0]
        if not (root / f"gen{big}" / "samples.npz").is_file():
            models = tiny_models(root / "models")
            for i, n in enumerate(args.sizes):
                run_driver(sample_settings(models, n, seed=i), str(root / f"gen{n}"), address)
        bench_evaluate(args, root, str(root / f"gen{big}" / "samples.npz"),
                       str(root / f"gen{small}" / "samples.npz"))


if __name__ == "__main__":
    main()
