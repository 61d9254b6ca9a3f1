"""Whole-request batching against the step engine, under open-loop load, in one run.

    python benchmarks/serve.py              # the full run (~15-20 min on a 2-core CPU)
    python benchmarks/serve.py --quick      # a smoke check (~3 min)

What is served: the whole chain of `adm.serve` (classifier-guided / classifier-free-guided base
sampler -> 8 -> 32 px upsampler) over real HTTP on loopback, with RANDOM-WEIGHT networks of the
quickstart's real architecture (the flags of jobs/configs/quickstart/diffusion_cfg.yaml,
classifier.yaml and upsampler.yaml: an 8 px base trained-with-label-dropout layout, so
cfg_scale != 1 is accepted, its classifier, and the 8 -> 32 upsampler; diffusion_steps 1000, so
250-step requests are allowed), exported to a temporary folder as training exports them
(model.pt + flags.json). On CPU their step is a few ms of network per 8 rows, so the figures
are the scheduling's, not a GPU's.

Two applications with the same settings except `scheduling` run side by side (one replica per
deployment, no autoscaling, max_ongoing_requests 64 everywhere so that requests reach the
model replicas' queues instead of waiting in Serve's):

- request: `@serve.batch` collects up to max_batch_requests=8 requests for batch_wait_s=0.05,
  groups them by equal settings and runs each group to its end in model calls of batch_rows=8
  rows (whole-request batching; the previous default);
- step:    the step engine (adm.engine) with batch_rows=8 slots: rows join the running model
  call at the next step and leave when done; interactive rows pause batch-class rows.

Load: open loop. Each level draws Poisson arrivals (seeded; the same schedule and the same
request bodies for both modes) and sends each request at its arrival time from its own thread,
whether or not earlier ones are done. The mix: steps 10 / 50 / 250 (50 / 30 / 20 %), 1-4
images, no guidance / classifier guidance 2.0 / cfg_scale 3.0 (40 / 30 / 30 %), 25 % of them
priority "batch", DDIM, 4 upsampler DDIM steps for every image. A level ends after
`--requests` arrivals or `--level-seconds` of arrivals, then waits for every request (drain).

Rates: first each mode's single-request service times are measured (one request at a time),
which give the capacity of whole-request batching, cap_R = 1 / (mean service time of the mix)
(its groups rarely share a call, so it serves about one request at a time), and an estimate for
the engine (slots / step time / mean row-steps of a request). The levels are fractions of cap_R
(`--loads`, default 0.25 0.5 0.8 1.0 1.3 2.0 3.0): 1.3 is past the request mode's saturation,
3.0 past the engine's. With 40 requests a level, a length's p95 rests on ~20 (10-step) or ~8
(250-step) requests: read it as "nearly the worst", not as a tail estimate.

Measured per level and mode: throughput (images/s and requests/s completed over the level's
wall time, first arrival -> last answer), p50/p95 latency (arrival -> last byte) per request
length and per class, time to the first `progress` event (step mode: requests stream
Server-Sent Events; request mode cannot stream, so its time to first byte is its whole
latency), and errors (non-200, `error` events, and 120 s without a byte or an event: the
client then disconnects, Serve cancels the request and the engine drops its rows, so a level
always ends).

Goals, printed PASS/FAIL:
1. at every loaded level (>= 0.8 cap_R), p95 latency of the 10-step requests at least 3x lower
   with the step engine than with whole-request batching;
2. at the highest level (past saturation), images/s with the engine no lower than with
   whole-request batching;
3. a 10-step request never waits for a 250-step one to finish. Precisely: a 10-step request S
   is BLOCKED by a 250-step request L when L arrived before S, S's first progress came only
   after L's base stage had finished (step mode: L's last base `progress` event; request mode:
   L's answer, and S's first byte, its only event), S waited longer for its first progress
   than a 10-step request takes alone (so a wait of a step or two at L's very end does not
   count), and L's class is not above S's. PASS when no 10-step request in step mode is
   blocked, at any level. Blocking by one's own slots being full of other short rows is not
   this, and is not counted; nor is a batch-class S waiting while interactive work (an
   interactive L among it) holds the slots, which is the priority the engine must give
   interactive rows (they are never paused for batch rows). Those waits are printed apart
   (`prio10`), with a bound: a batch row ages after 4x its chain and then goes first.

Reading the table: `x cap` is the offered load over cap_R; `lat10`, `lat50`, `lat250` are
p50/p95 seconds of those request lengths; `int`/`bat` the p95 of the two classes; `ttfp` p50/p95
of the time to first progress. docs/serving_load.png plots p50 and p95 of the 10- and
250-step requests against the offered load, both modes. Run it on an otherwise idle machine
(the figures are wall-clock; the client's threads share the CPU with the replicas).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import requests
import torch
import yaml

from adm import factory
from adm.runtime import free_port
from adm.serve import ServeSettings, build, load_settings

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart"
MODES = ("request", "step")
LENGTHS = (10, 50, 250)
LENGTH_WEIGHTS = (0.5, 0.3, 0.2)
GUIDANCE = {"none": {"guidance_scale": 0.0}, "classifier": {"guidance_scale": 2.0},
            "cfg": {"guidance_scale": 0.0, "cfg_scale": 3.0}}
GUIDANCE_WEIGHTS = (0.4, 0.3, 0.3)
BATCH_SHARE = 0.25
MAX_IMAGES = 4
LOADED = 0.8  # levels at or above this fraction of cap_R are "loaded" (goal 1)
APP_ARGS = {"max_images": MAX_IMAGES, "max_steps": 250, "default_steps": 10,
            "samplers": "ddim", "upsampler_sampler": "ddim", "batch_rows": 8,
            "max_batch_requests": 8, "batch_wait_s": 0.05, "max_cfg_scale": 5.0}
# (connect, read) timeouts of one request. The read timeout bounds a silence: no byte of a
# request-mode answer (it comes whole) and no event of a stream for this long is an error,
# and the client's disconnect makes Serve cancel the request, so a level always ends.
REQUEST_TIMEOUT_S = (10, 120)


# ----------------------------------------------------------------------------- models


def quickstart_flags(name: str) -> dict:
    return yaml.safe_load((QUICKSTART / name).read_text())["model"]["flags"]


def export(folder: Path, net: torch.nn.Module, flags: dict, seed: int) -> str:
    """Random N(0, 0.1²) weights saved as training exports them: model.pt + flags.json (ADM
    zero-initialises its output layers, which would make every sample alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "flags.json").write_text(json.dumps(flags))
    return str(folder / "model.pt")


def export_models(root: Path) -> dict:
    """The quickstart's three networks (base with label dropout, classifier, upsampler)."""
    base = quickstart_flags("diffusion_cfg.yaml")
    clf = quickstart_flags("classifier.yaml")
    up = quickstart_flags("upsampler.yaml")
    assert base["diffusion_steps"] >= 250 and base.get("class_dropout_prob", 0) > 0, base
    return {"base": export(root / "base", factory.create_model(base), base, 1),
            "classifier": export(root / "classifier", factory.create_classifier(clf), clf, 2),
            "upsampler": export(root / "upsampler", factory.create_superres_model(up), up, 3)}


# ----------------------------------------------------------------------------- serving


def deploy(nets: dict, mode: str, upsampler_steps: int) -> str:
    """The app of `mode` at /<mode>; returns its URL once /healthz answers."""
    from ray import serve

    settings = ServeSettings.from_args({**nets, **APP_ARGS, "scheduling": mode,
                                        "upsampler_steps": upsampler_steps})
    # One replica each; 64 ongoing requests per replica so that the load reaches the engine's
    # queue (or @serve.batch's) rather than Serve's handle queues.
    options = {name: {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1,
                      "max_ongoing_requests": 64}
               for name in ("GuidedSampler", "Upsampler", "Ingress")}
    serve.run(build(load_settings(settings), options), name=f"bench-{mode}",
              route_prefix=f"/{mode}", blocking=False)
    return f"{serve_url()}/{mode}"


_PORT: list[int] = []


def serve_url() -> str:
    return f"http://127.0.0.1:{_PORT[0]}"


def wait_healthy(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}/healthz not ready after {timeout_s} s")


def engine_stats(mode: str) -> dict:
    """The base replica's engine counters (step mode; {} for request mode)."""
    from ray import serve

    if mode != "step":
        return {}
    return serve.get_deployment_handle("GuidedSampler", f"bench-{mode}").stats.remote().result()


# ----------------------------------------------------------------------------- requests


@dataclass
class Spec:
    """One request of the mix."""

    steps: int
    images: int
    guidance: str
    priority: str
    class_id: int
    seed: int

    def body(self, stream: bool) -> dict:
        body = {"class_id": self.class_id, "num_images": self.images, "steps": self.steps,
                "seed": self.seed, "priority": self.priority, "response": "json",
                **GUIDANCE[self.guidance]}
        if stream:
            body["stream"] = True
        return body


@dataclass
class Record:
    """What the client saw of one request; times in seconds from the level's start."""

    spec: Spec
    arrival: float  # scheduled
    sent: float = float("nan")
    first_progress: float = float("nan")  # request mode: the first byte (the whole answer)
    base_done: float = float("nan")  # last base progress event (request mode: the answer)
    finish: float = float("nan")
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not np.isnan(self.finish)

    @property
    def latency(self) -> float:
        return self.finish - self.arrival

    @property
    def ttfp(self) -> float:
        return self.first_progress - self.arrival


def draw_mix(rng: random.Random, n: int) -> list[Spec]:
    return [Spec(rng.choices(LENGTHS, LENGTH_WEIGHTS)[0], rng.randint(1, MAX_IMAGES),
                 rng.choices(list(GUIDANCE), GUIDANCE_WEIGHTS)[0],
                 "batch" if rng.random() < BATCH_SHARE else "interactive",
                 rng.randrange(10), rng.randrange(2**31)) for _ in range(n)]


def read_sse(response: requests.Response, rec: Record, t0: float) -> None:
    """Fill `rec` from a text/event-stream answer (events as tests/test_serve.py reads them)."""
    kind = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            now = time.perf_counter() - t0
            data = json.loads(line[len("data: "):])
            if kind == "progress":
                if np.isnan(rec.first_progress):
                    rec.first_progress = now
                if data["stage"] == "base" and data["step"] == data["steps"]:
                    rec.base_done = now
            elif kind == "error":
                rec.error = f"error event: {data}"
                return
            elif kind == "result":
                rec.finish = now
                if len(data["images"]) != rec.spec.images:
                    rec.error = f"{len(data['images'])} images for {rec.spec.images}"
                return
    rec.error = rec.error or "stream ended without a result"


def send(url: str, rec: Record, stream: bool, t0: float) -> None:
    """POST one request and record when its events and its answer came."""
    rec.sent = time.perf_counter() - t0
    try:
        with requests.post(f"{url}/v1/generate", json=rec.spec.body(stream), stream=stream,
                           timeout=REQUEST_TIMEOUT_S) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            if stream:
                read_sse(r, rec, t0)
                return
            body = r.json()
            rec.finish = rec.first_progress = rec.base_done = time.perf_counter() - t0
            if len(body["images"]) != rec.spec.images:
                rec.error = f"{len(body['images'])} images for {rec.spec.images}"
    except requests.RequestException as e:
        rec.error = f"{type(e).__name__}: {e}"[:200]


# ----------------------------------------------------------------------------- calibration


def alone(url: str, spec: Spec, stream: bool) -> float:
    """Seconds of one request with nothing else in the server."""
    rec = Record(spec, 0.0)
    t0 = time.perf_counter()
    send(url, rec, stream, t0)
    if not rec.ok:
        raise RuntimeError(f"calibration request failed: {rec.error}")
    return rec.latency


@dataclass
class Calibration:
    """Single-request service times (1 image) of each guidance at 10 and 250 steps (request
    mode), a linear fit in steps, and the capacities they give."""

    times: dict  # (guidance, steps) -> s
    per_step: dict  # guidance -> s per base step
    fixed: dict  # guidance -> s (HTTP, upsampler, encoding)
    step_alone_10: float  # a 10-step request alone (step mode, streamed)
    step_alone_250: float
    cap_request: float = 0.0  # requests/s
    cap_step: float = 0.0

    def service(self, guidance: str, steps: int) -> float:
        return self.fixed[guidance] + self.per_step[guidance] * steps


def calibrate(urls: dict) -> Calibration:
    times = {}
    for g in GUIDANCE:
        for steps in (10, 250):
            times[g, steps] = alone(urls["request"], Spec(steps, 1, g, "interactive", 0, 7),
                                    stream=False)
    per_step = {g: (times[g, 250] - times[g, 10]) / 240 for g in GUIDANCE}
    fixed = {g: times[g, 10] - 10 * per_step[g] for g in GUIDANCE}
    cal = Calibration(times, per_step, fixed,
                      alone(urls["step"], Spec(10, 1, "none", "interactive", 0, 7), True),
                      alone(urls["step"], Spec(250, 1, "none", "interactive", 0, 7), True))
    # Whole-request batching serves about one request at a time (groups need equal settings),
    # so its capacity is 1 / mean service time over the mix.
    mean_service = sum(gw * lw * cal.service(g, s)
                       for g, gw in zip(GUIDANCE, GUIDANCE_WEIGHTS)
                       for s, lw in zip(LENGTHS, LENGTH_WEIGHTS))
    cal.cap_request = 1 / mean_service
    # The engine fills 8 slots: a step costs about a guided step of one request (the classifier
    # call is made whenever any row is guided), and a request needs images x width x steps
    # row-steps (width 2 with classifier-free guidance).
    mean_images = (1 + MAX_IMAGES) / 2
    mean_width = sum(w * (2 if g == "cfg" else 1) for g, w in zip(GUIDANCE, GUIDANCE_WEIGHTS))
    mean_steps = sum(s * w for s, w in zip(LENGTHS, LENGTH_WEIGHTS))
    step_s = max(per_step.values())
    cal.cap_step = APP_ARGS["batch_rows"] / (step_s * mean_images * mean_width * mean_steps)
    return cal


# ----------------------------------------------------------------------------- one level


def arrivals(rng: random.Random, rate: float, n: int, max_s: float) -> list[float]:
    """Poisson arrival times (s) at `rate`/s: at most n, none later than max_s."""
    out, t = [], 0.0
    while len(out) < n:
        t += rng.expovariate(rate)
        if t > max_s:
            break
        out.append(t)
    return out


def run_level(url: str, mode: str, times: list[float], specs: list[Spec]) -> tuple[list, float]:
    """Send each request at its time (open loop) and wait for all; (records, wall seconds)."""
    records = [Record(s, a) for s, a in zip(specs, times)]
    stream = mode == "step"
    t0 = time.perf_counter()
    # One worker per request: a request never waits for a free client thread.
    with ThreadPoolExecutor(max_workers=len(records)) as pool:
        for rec in records:
            delay = t0 + rec.arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, url, rec, stream, t0)
    wall = max((r.finish for r in records if r.ok), default=0.0)
    return records, wall


def wait_idle(mode: str, timeout_s: float = 60) -> None:
    """Drain: the engine has no rows left (cancelled ones leave at the next step)."""
    if mode != "step":
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine_stats(mode)
        if not any(s["queued"].values()) and not any(s["in_flight"].values()):
            return
        time.sleep(0.5)
    print(f"WARNING: the engine is not idle {timeout_s:.0f} s after the level: {s}", flush=True)


# ----------------------------------------------------------------------------- statistics


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def blocked(records: list[Record], t10: float, priority: bool = False
            ) -> list[tuple[Record, Record]]:
    """Goal 3's (S, L) pairs: 10-step S blocked by 250-step L (see the module docstring); with
    `priority`, instead the pairs of a batch-class S and an interactive L (`prio10`)."""
    done = [r for r in records if r.ok]
    longs = [r for r in done if r.spec.steps == 250]
    out = []
    for s in (r for r in done if r.spec.steps == 10):
        if s.ttfp <= t10:
            continue
        for l in longs:
            above = s.spec.priority == "batch" and l.spec.priority == "interactive"
            if above != priority:
                continue
            if l.arrival < s.arrival and s.first_progress >= l.base_done:
                if l.base_done > s.arrival:  # L was still in its base stage when S came
                    out.append((s, l))
                    break
    return out


def summarize(records: list[Record], wall: float, t10: float) -> dict:
    ok = [r for r in records if r.ok]
    lat = lambda rs: [r.latency for r in rs]  # noqa: E731
    out = {"sent": len(records), "done": len(ok), "errors": len(records) - len(ok),
           "images_per_s": sum(r.spec.images for r in ok) / wall if wall else 0.0,
           "requests_per_s": len(ok) / wall if wall else 0.0, "wall_s": wall,
           "send_lag_max_s": max((r.sent - r.arrival for r in records), default=0.0),
           "ttfp": (pct([r.ttfp for r in ok], 50), pct([r.ttfp for r in ok], 95)),
           "blocked": len(blocked(records, t10)),
           "priority_waits": [round(s.ttfp, 2) for s, _ in blocked(records, t10, True)],
           "n10": sum(r.spec.steps == 10 for r in ok),
           "error_samples": [r.error for r in records if not r.ok][:3]}
    for steps in LENGTHS:
        rs = lat([r for r in ok if r.spec.steps == steps])
        out[f"lat{steps}"] = (pct(rs, 50), pct(rs, 95), len(rs))
    for cls in ("interactive", "batch"):
        rs = lat([r for r in ok if r.spec.priority == cls])
        out[cls] = (pct(rs, 50), pct(rs, 95), len(rs))
    return out


def save_records(path: Path, load: float, mode: str, records: list[Record]) -> None:
    """Append the level's requests as JSON lines (for a closer look at a level)."""
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps({"load": load, "mode": mode, **r.spec.__dict__,
                                "arrival": r.arrival, "sent": r.sent,
                                "first_progress": r.first_progress, "base_done": r.base_done,
                                "finish": r.finish, "error": r.error}) + "\n")


# ----------------------------------------------------------------------------- output


def fmt(x: float) -> str:
    return "   -  " if np.isnan(x) else f"{x:6.2f}"


def print_table(results: list[dict]) -> None:
    print(f"\n{'x cap':>5} {'req/s':>5} {'mode':7} {'done':>4} {'err':>3} {'img/s':>5} "
          f"{'req/s':>5} {'lat10 p50':>9} {'p95':>6} {'lat50 p50':>9} {'p95':>6} "
          f"{'lat250 p50':>10} {'p95':>6} {'int p95':>7} {'bat p95':>7} {'ttfp p50':>8} "
          f"{'p95':>6} {'blk10':>5}")
    for r in results:
        s = r["stats"]
        print(f"{r['load']:5.2f} {r['rate']:5.2f} {r['mode']:7} {s['done']:4d} {s['errors']:3d} "
              f"{s['images_per_s']:5.2f} {s['requests_per_s']:5.2f} "
              f"{fmt(s['lat10'][0]):>9} {fmt(s['lat10'][1])} {fmt(s['lat50'][0]):>9} "
              f"{fmt(s['lat50'][1])} {fmt(s['lat250'][0]):>10} {fmt(s['lat250'][1])} "
              f"{fmt(s['interactive'][1]):>7} {fmt(s['batch'][1]):>7} "
              f"{fmt(s['ttfp'][0]):>8} {fmt(s['ttfp'][1])} {s['blocked']:2d}/{s['n10']:<2d}")


def markdown(results: list[dict]) -> str:
    """The table for docs/serving.md."""
    lines = ["| load (x cap_R) | req/s offered | scheduling | images/s | 10-step p50 / p95 s | "
             "250-step p50 / p95 s | first progress p95 s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["stats"]
        lines.append(f"| {r['load']:.2f} | {r['rate']:.2f} | {r['mode']} | "
                     f"{s['images_per_s']:.2f} | {s['lat10'][0]:.2f} / {s['lat10'][1]:.2f} | "
                     f"{s['lat250'][0]:.2f} / {s['lat250'][1]:.2f} | {s['ttfp'][1]:.2f} | "
                     f"{s['errors']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str, cap: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"request": "tab:red", "step": "tab:blue"}
    for ax, steps in zip(axes, (10, 250)):
        for mode in MODES:
            rs = [r for r in results if r["mode"] == mode]
            x = [r["rate"] for r in rs]
            for q, style in ((0, "-"), (1, "--")):
                ax.plot(x, [r["stats"][f"lat{steps}"][q] for r in rs], style, marker="o",
                        color=colors[mode],
                        label=f"{'whole-request' if mode == 'request' else 'step engine'} "
                              f"p{50 if q == 0 else 95}")
        ax.set_title(f"{steps}-step requests")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.axvline(cap, color="gray", linestyle=":", linewidth=1)
        ax.text(cap, ax.get_ylim()[1], " cap_R", color="gray", fontsize=8, va="top")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency, arrival -> answer (s)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def goals(results: list[dict], cal: Calibration) -> list[tuple[str, bool, str]]:
    by = {(r["load"], r["mode"]): r["stats"] for r in results}
    loads = sorted({r["load"] for r in results})
    loaded = [x for x in loads if x >= LOADED] or loads[-1:]
    ratios = [(x, by[x, "request"]["lat10"][1] / by[x, "step"]["lat10"][1]) for x in loaded]
    g1 = all(r >= 3 for _, r in ratios)
    top = loads[-1]
    ips = by[top, "request"]["images_per_s"], by[top, "step"]["images_per_s"]
    g2 = ips[1] >= ips[0]
    blk = [(x, by[x, "step"]["blocked"], by[x, "step"]["n10"], by[x, "request"]["blocked"],
            by[x, "request"]["n10"]) for x in loads]
    g3 = all(b == 0 for _, b, *_ in blk) and all(by[x, "step"]["n10"] for x in loads)
    return [
        ("1. 10-step p95 >= 3x lower with the engine at loads >= "
         f"{LOADED} cap_R", g1, ", ".join(f"{x:.2f}: {r:.1f}x" for x, r in ratios)),
        ("2. images/s at the top load no lower with the engine", g2,
         f"load {top:.2f}: request {ips[0]:.2f}, step {ips[1]:.2f} images/s"),
        ("3. no 10-step request blocked by a 250-step one (step mode)", g3,
         "; ".join(f"{x:.2f}: step {b}/{n}, request {rb}/{rn}" for x, b, n, rb, rn in blk)
         + f" (blocked/10-step; a 10-step alone: {cal.times['none', 10]:.2f} s)"),
    ]


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.8, 1.0, 1.3, 2.0, 3.0],
                   help="offered loads as fractions of whole-request batching's capacity")
    p.add_argument("--requests", type=int, default=40, help="arrivals per level at most")
    p.add_argument("--level-seconds", type=float, default=60,
                   help="arrival window per level at most")
    p.add_argument("--upsampler-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=float, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--plot", default=str(ROOT / "docs" / "serving_load.png"))
    p.add_argument("--records", help="write every request's times here (JSON lines)")
    args = p.parse_args()
    if args.quick:
        args.loads, args.requests, args.level_seconds = [0.5, 1.3], 12, 20

    import ray
    from ray import serve

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    _PORT.append(free_port("127.0.0.1"))
    serve.start(http_options={"host": "127.0.0.1", "port": _PORT[0]})
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            nets = export_models(Path(tmp))
            urls = {mode: deploy(nets, mode, args.upsampler_steps) for mode in MODES}
            for mode, url in urls.items():
                wait_healthy(url)
                info = requests.get(f"{url}/v1/models", timeout=10).json()
                assert info["scheduling"] == mode, info
                for g in GUIDANCE:  # warm-up: first calls of each kind, connections
                    alone(url, Spec(10, 2, g, "interactive", 1, 1), mode == "step")
            cal = calibrate(urls)
            print_calibration(cal)
            for i, load in enumerate(args.loads):
                rate = load * cal.cap_request
                rng = random.Random(args.seed * 1000 + i)
                times = arrivals(rng, rate, args.requests, args.level_seconds)
                specs = draw_mix(rng, len(times))
                for mode in MODES:
                    before = engine_stats(mode)
                    records, wall = run_level(urls[mode], mode, times, specs)
                    wait_idle(mode)
                    stats = summarize(records, wall, cal.times["none", 10])
                    stats["engine"] = engine_delta(before, engine_stats(mode))
                    results.append({"load": load, "rate": rate, "mode": mode, "stats": stats})
                    if args.records:
                        save_records(Path(args.records), load, mode, records)
                    print_level(results[-1], time.perf_counter() - start)
    finally:
        serve.shutdown()
        ray.shutdown()

    title = (f"adm.serve on {os.cpu_count()} CPU cores: quickstart-sized random-weight models "
             f"(8 px base + classifier -> 32 px upsampler, {args.upsampler_steps} steps), "
             f"open-loop Poisson mix of 10/50/250-step requests")
    print(f"\n{title}\ncap_R (whole-request batching) {cal.cap_request:.3f} req/s, engine "
          f"estimate {cal.cap_step:.3f} req/s; {args.requests} requests or "
          f"{args.level_seconds:.0f} s of arrivals per level; latency = arrival -> last byte; "
          f"request mode's first progress = its whole answer (it cannot stream)")
    print_table(results)
    print("\nblk10: 10-step requests blocked by a 250-step one / 10-step requests (goal 3)")
    print("prio10 (step mode): batch-class 10-step requests that started after an interactive "
          "250-step one ended, by priority (s to first progress): " + "; ".join(
              f"{r['load']:.2f}: {r['stats']['priority_waits'] or 'none'}" for r in results
              if r["mode"] == "step"))
    print("\nmarkdown for docs/serving.md:\n")
    print(markdown(results))
    plot(results, Path(args.plot), title, cal.cap_request)
    print(f"\nplot: {args.plot}")
    print("\ngoals:")
    for name, ok, detail in goals(results, cal):
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"\nrun time {time.perf_counter() - start:.0f} s")


def engine_delta(before: dict, after: dict) -> dict:
    """The base engine's steps, mean step time, mean rows per step and preemptions during a
    level (step mode)."""
    if not before:
        return {}
    steps = after["steps"] - before["steps"]
    return {"steps": steps,
            "step_ms": 1000 * (after["step_seconds"] - before["step_seconds"]) / max(steps, 1),
            "rows_per_step": (after["row_steps"] - before["row_steps"]) / max(steps, 1),
            "preemptions": after["preemptions"] - before["preemptions"]}


def print_calibration(cal: Calibration) -> None:
    print("single requests alone (request mode, 1 image, 10 / 250 steps, + upsampler):")
    for g in GUIDANCE:
        print(f"  {g:10} {cal.times[g, 10]:6.2f} s / {cal.times[g, 250]:6.2f} s  "
              f"({1000 * cal.per_step[g]:.1f} ms per base step)")
    print(f"  step mode, none: {cal.step_alone_10:.2f} s / {cal.step_alone_250:.2f} s")
    print(f"  capacity: whole-request batching {cal.cap_request:.3f} req/s; step engine "
          f"estimate {cal.cap_step:.3f} req/s", flush=True)


def print_level(r: dict, elapsed: float) -> None:
    s, e = r["stats"], r["stats"]["engine"]
    engine = (f"; engine {e['steps']} steps, {e['step_ms']:.1f} ms/step, "
              f"{e['rows_per_step']:.1f} rows/step, {e['preemptions']} preemptions") if e else ""
    print(f"[{elapsed:5.0f} s] load {r['load']:.2f} ({r['rate']:.2f} req/s) {r['mode']:7}: "
          f"{s['done']}/{s['sent']} done, {s['images_per_s']:.2f} img/s, 10-step p95 "
          f"{s['lat10'][1]:.2f} s, 250-step p95 {s['lat250'][1]:.2f} s, send lag max "
          f"{s['send_lag_max_s']:.2f} s, wall {s['wall_s']:.0f} s{engine}"
          + (f"; errors {s['error_samples']}" if s["errors"] else ""), flush=True)


if __name__ == "__main__":
    main()
