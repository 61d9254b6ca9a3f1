"""Capacity past this machine: replicas (and GPUs) per serving preset for a request rate at a
p95 bound, by simulating the step engine (adm.capacity), checked against the real engine.

    python benchmarks/capacity.py                    # everything; writes docs/capacity.md
    python benchmarks/capacity.py --efficiency 0.4 --rates 1,100,5000 --no-doc
    python benchmarks/capacity.py --skip-check       # no real-engine check (faster)

1. Stage costs. CPU (the `local` preset): the real `RowStepper` steps of the quickstart-sized
   networks (jobs/configs/quickstart/{diffusion,classifier,upsampler}.yaml, random weights,
   float32, the preset's slots) timed on this machine at 1-8 rows, guided and not, and fitted
   to call + guided + per-row seconds. GPU (`imagenet256`, `imagenet512`): the FLOPs of the
   presets' real ADM networks per step (FlopCounterMode on the meta device, `slots` rows),
   divided by peak FLOP/s × `--efficiency`, plus `--call-overhead-ms` per call and
   `--row-overhead-ms` per row: ESTIMATES until benchmarks/gpu_check.sh measures a step.
2. The check: the real engine (`Engine(StepperRunner(RowStepper(...)))`, the quickstart base
   and classifier) in this process under Poisson arrivals at `--check-loads` of its estimated
   capacity, against the simulation of the same arrivals with the cost fitted in step 1.
3. Sizing: for each preset and rate, `adm.capacity.find_replicas` (the fewest replicas per
   stage meeting the interactive p95 bound, batch p95 within `--batch-factor` × it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from adm import capacity as cap  # noqa: E402
from adm import factory  # noqa: E402
from adm.compat import openai  # noqa: E402
from adm.diffusion.rows import RowSpec, RowStepper  # noqa: E402
from adm.engine import StepperRunner  # noqa: E402
from adm.presets import preset  # noqa: E402

QUICKSTART = ROOT / "jobs" / "configs" / "quickstart"
PRESETS = ("local", "imagenet256", "imagenet512")
DEFAULT_BOUNDS = {"local": 5.0, "imagenet256": 10.0, "imagenet512": 120.0}


def quickstart_flags(name: str) -> dict:
    """A quickstart training config's model flags."""
    return yaml.safe_load((QUICKSTART / f"{name}.yaml").read_text())["model"]["flags"]


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights (the step's time does not depend on them), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def quickstart_steppers(slots: int, up_slots: int) -> tuple[RowStepper, RowStepper]:
    """The quickstart's base (+ classifier) and upsampler as real row steppers on the CPU."""
    base_flags, up_flags = quickstart_flags("diffusion"), quickstart_flags("upsampler")
    net = randomized(openai.create_model(base_flags), 1)
    clf = randomized(openai.create_classifier(quickstart_flags("classifier")), 2)
    base = RowStepper(net, factory.create_diffusion({**base_flags, "timestep_respacing": ""}),
                      slots=slots, image_size=base_flags["image_size"], classifier=clf)
    up_net = randomized(openai.create_superres_model(up_flags), 3)
    up = RowStepper(up_net, factory.create_diffusion({**up_flags, "timestep_respacing": ""}),
                    slots=up_slots, image_size=up_flags["large_size"])
    return base, up


def cpu_costs(p: cap.ServePreset) -> tuple[cap.StageCost, cap.StageCost, list, list]:
    """Measured and fitted step costs of the local preset's two stages (and the samples)."""
    base, up = quickstart_steppers(p.batch_rows, p.upsampler_batch_rows)
    rows = sorted({1, 2, 4, p.batch_rows})
    b = cap.measure_step_times(base, RowSpec("ddim", 100, classifier_scale=1.0),
                               RowSpec("ddim", 100), rows)
    small = quickstart_flags("upsampler")["small_size"]
    low = torch.zeros(3, small, small)
    u = cap.measure_step_times(up, None, RowSpec(p.upsampler_sampler or "ddim", 100),
                               sorted({1, 2, 4, p.upsampler_batch_rows}), low_res=low)
    src = "measured on this CPU (2 cores), fitted"
    return cap.fit_stage_cost(b, src), cap.fit_stage_cost(u, src), b, u


def gpu_flops(p: cap.ServePreset) -> dict:
    """FLOPs per engine step of each stage of a GPU preset: {stage: (model, guided)}."""
    out = {}
    with torch.device("meta"):
        net = preset(p.base_preset).build()
        clf = preset(p.classifier_preset).build() if p.classifier_preset else None
    size = preset(p.base_preset).model_flags["image_size"]
    out["base"] = cap.stage_flops(net, size, p.batch_rows, classifier=clf,
                                  class_cond=preset(p.base_preset).model_flags["class_cond"])
    if p.upsampler_preset:
        up = preset(p.upsampler_preset)
        with torch.device("meta"):
            up_net = up.build()
        out["upsampler"] = cap.stage_flops(
            up_net, up.model_flags["large_size"], p.upsampler_batch_rows,
            low_res_size=up.model_flags["small_size"], class_cond=up.model_flags["class_cond"])
    return out


def stages_of(p: cap.ServePreset, costs: dict) -> list[cap.StageSpec]:
    """The preset's chain as simulation stages."""
    stages = [cap.StageSpec("base", p.batch_rows, costs["base"],
                            **p.schedule)]
    if p.has_upsampler:
        stages.append(cap.StageSpec("upsampler", p.upsampler_batch_rows, costs["upsampler"],
                                    sampler=p.upsampler_sampler or "ddpm",
                                    steps=p.upsampler_steps or 25,
                                    **p.schedule))
    return stages


def fmt_s(x: float) -> str:
    if math.isinf(x) or x != x:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def real_check(p: cap.ServePreset, cost: cap.StageCost, mix: cap.RequestMix, loads: list,
               n: int, seed: int) -> list[dict]:
    """The real engine against the simulation, one replica of the base stage, same arrivals."""
    stepper, _ = quickstart_steppers(p.batch_rows, p.upsampler_batch_rows)
    stage = cap.StageSpec("base", p.batch_rows, cost, **p.schedule)
    unit = cap.draw_requests(mix, n, 1.0, default_steps=p.default_steps, max_steps=p.max_steps,
                             seed=seed, has_upsampler=False)
    capacity = 1.0 / cap.slot_seconds(stage, 0, unit)
    rows = []
    for load in loads:
        rate = load * capacity
        reqs = cap.at_rate(unit, rate, 1.0)
        spec = lambda r: cap.base_spec(r, p.default_sampler, p.default_guidance_scale)  # noqa
        start = time.perf_counter()
        real, steps = cap.run_real_engine(StepperRunner(stepper), p.batch_rows, reqs, spec,
                                          **p.schedule)
        wall = time.perf_counter() - start
        # The simulation's cost: the fit to this run's own steps (the shared machine's speed
        # during the run), as the check's point is the scheduling and the queueing.
        fitted = cap.fit_stage_cost(steps, "fitted to the run's own steps")
        sim_stage = cap.StageSpec("base", p.batch_rows, fitted,
                                  **p.schedule)
        sim = cap.ChainSim([sim_stage], [1], sampler=p.default_sampler,
                           guidance_scale=p.default_guidance_scale).run(reqs).summary()
        real = real.summary()
        rows.append({"load": load, "rate": rate, "n": n, "wall_s": wall, "real": real,
                     "sim": sim, "cost": fitted, "steps": len(steps)})
        print(f"  load {load:.2f} ({rate:.1f} req/s, {n} requests, {wall:.0f} s): "
              f"real p50/p95 {real['all']['p50']:.3f}/{real['all']['p95']:.3f} s, "
              f"sim {sim['all']['p50']:.3f}/{sim['all']['p95']:.3f} s; fitted step "
              f"{fitted.call_s * 1e3:.1f} + {fitted.guided_s * 1e3:.1f} guided ms", flush=True)
    return rows


def rel(sim: float, real: float) -> str:
    return f"{100 * (sim - real) / real:+.0f}%"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="1,10,100,1000,5000",
                    help="requests/s to size each preset for")
    ap.add_argument("--p95", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_BOUNDS.items()),
                    help="interactive p95 bound in seconds, per preset (name=s,...)")
    ap.add_argument("--batch-factor", type=float, default=4.0,
                    help="batch-class p95 bound, as a multiple of the interactive bound")
    ap.add_argument("--efficiency", type=float, default=0.3,
                    help="achieved share of the GPU's peak FLOP/s (an assumption)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense fp16/bf16 tensor peak (H100 SXM: 989)")
    ap.add_argument("--gpu", default="NVIDIA H100 SXM", help="the GPU's name, for the tables")
    ap.add_argument("--call-overhead-ms", type=float, default=2.0,
                    help="fixed launch/dispatch time per model call on the GPU")
    ap.add_argument("--row-overhead-ms", type=float, default=0.1,
                    help="per running row per step on the GPU (update, bookkeeping)")
    ap.add_argument("--requests", type=int, default=1200,
                    help="requests per simulated run (the first 10%% are warm-up)")
    ap.add_argument("--check-loads", default="0.3,0.6,0.85",
                    help="real-engine check: loads as fractions of its estimated capacity")
    ap.add_argument("--check-requests", type=int, default=80)
    ap.add_argument("--window-latencies", type=float, default=10.0,
                    help="a simulated run spans at least this many unloaded latencies")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "capacity.md"))
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write --out")
    args = ap.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    bounds = {**DEFAULT_BOUNDS, **{k: float(v) for k, v in
                                   (kv.split("=") for kv in args.p95.split(","))}}
    mix = cap.RequestMix()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    presets = {name: cap.load_serve_preset(ROOT / "serve_configs" / f"{name}.yaml")
               for name in args.presets.split(",")}
    costs: dict[str, dict] = {}
    flops: dict[str, dict] = {}
    cpu_samples = None
    print("== stage costs", flush=True)
    for name, p in presets.items():
        if p.gpus_per_replica == 0:  # a CPU preset: measured here
            b, u, bs, us = cpu_costs(p)
            costs[name] = {"base": b, "upsampler": u}
            cpu_samples = (bs, us)
        else:
            flops[name] = gpu_flops(p)
            costs[name] = {stage: cap.flops_stage_cost(
                m, g, peak_flops=args.peak_tflops * 1e12, efficiency=args.efficiency,
                call_overhead_s=args.call_overhead_ms / 1e3,
                per_row_s=args.row_overhead_ms / 1e3, device=args.gpu)
                for stage, (m, g) in flops[name].items()}
        for stage, c in costs[name].items():
            print(f"  {name}/{stage}: call {c.call_s * 1e3:.2f} ms, guided +{c.guided_s * 1e3:.2f}"
                  f" ms, per row {c.per_row_s * 1e3:.3f} ms ({c.source})", flush=True)

    check = []
    if not args.skip_check and "local" in presets:
        print("== real engine vs simulation (local base stage, one replica)", flush=True)
        check = real_check(presets["local"], costs["local"]["base"], mix,
                           [float(x) for x in args.check_loads.split(",")],
                           args.check_requests, args.seed)

    print("== sizing", flush=True)
    sizing: dict[str, list] = {}
    for name, p in presets.items():
        stages = stages_of(p, costs[name])
        unit = cap.draw_requests(mix, args.requests, 1.0, default_steps=p.default_steps,
                                 max_steps=p.max_steps, seed=args.seed,
                                 has_upsampler=p.has_upsampler)
        sizing[name] = []
        for rate in rates:
            t0 = time.perf_counter()
            s = cap.find_replicas(stages, rate, bounds[name], unit, sampler=p.default_sampler,
                                  guidance_scale=p.default_guidance_scale,
                                  batch_factor=args.batch_factor, seed=args.seed,
                                  window_latencies=args.window_latencies)
            took = time.perf_counter() - t0
            sizing[name].append((s, took))
            summ = s.evaluation.summary
            print(f"  {name} {rate:g} req/s: replicas {s.plan.replicas} (cells {s.plan.cells}),"
                  f" interactive p50/p95 {summ['interactive']['p50']:.2f}/"
                  f"{summ['interactive']['p95']:.2f} s, {len(s.tried)} runs, {took:.0f} s",
                  flush=True)

    total = time.perf_counter() - t_start
    args.load = (load_before, os.getloadavg())
    print(f"== done in {total:.0f} s")
    if not args.no_doc:
        text = render(args, presets, costs, flops, cpu_samples, check, sizing, bounds, mix,
                      total)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


def render(args, presets, costs, flops, cpu_samples, check, sizing, bounds, mix,
           total_s) -> str:
    """docs/capacity.md."""
    gpu = args.gpu
    L = []
    w = L.append
    w("# Capacity, past this machine\n")
    w("How many replicas (and GPUs) each serving preset needs for a request rate at a p95 "
      "latency bound, from a discrete-event simulation that runs the step engine's own "
      "scheduling code (`adm.engine.Engine`, unchanged) on a virtual clock "
      "(`platform/adm/capacity.py`). Reproduce everything on this page, and write it again:\n")
    w("```bash\npython benchmarks/capacity.py            # "
      f"{total_s / 60:.0f} min on the 2-core CPU machine\n"
      "python benchmarks/capacity.py --efficiency 0.4 --rates 1,100,5000 --no-doc\n```\n")
    w(f"This run: the 1-minute load average of the shared 2-core machine was "
      f"{args.load[0][0]:.1f} at its start and {args.load[1][0]:.1f} at its end (other "
      "sessions' jobs); the CPU step times below were measured under it.\n")
    w(f"**The GPU figures are estimates**: no GPU step of these networks has been measured yet "
      f"(`bash benchmarks/gpu_check.sh` measures one); they assume {args.efficiency:g} of the "
      f"{gpu}'s {args.peak_tflops:g} TFLOP/s dense fp16/bf16 peak. The CPU figures (`local`) "
      "are measured on this machine.\n")
    w("## How it is computed\n")
    w("- **The engine itself.** Each replica is a real `Engine` with a `VirtualRunner`: rows "
      "only count steps, and `step(rows)` advances the replica's virtual clock by the stage's "
      "step time. Admission, interactive-over-batch preemption, ageing, wide rows: the "
      "engine's own code decides (tests/test_capacity.py checks that its rules show).")
    w("- **Step time** of a stage = a fixed model call (always `slots` rows: the call has a "
      "fixed shape, padded) + a fixed classifier-gradient call when any running row is "
      "guided + a small per-row overhead.")
    w("- **Replicas run concurrently** in virtual time: the event loop always takes the "
      "earliest event (an arrival, a result's delivery, or the replica whose next step starts "
      "earliest: a heap of replica clocks). A step's results are delivered when it ends.")
    w("- **Routing**: power of two choices, as Serve's router: two random replicas of the "
      "stage, the one with fewer ongoing requests. A request enters the upsampler stage when "
      "its base rows finish. Not modelled: Serve's `max_ongoing_requests` cap per replica "
      "(requests past it wait in the router instead of in the engine), the ingress, HTTP and "
      "PNG encoding, the network between stages, replica start-up and autoscaling delays.")
    w("- **Arrivals**: Poisson (seeded); every run of a preset sees the same "
      f"{args.requests} requests (common random numbers), compressed to the rate; the first "
      "10% are warm-up and not measured; every run drains.")
    w(f"- **Request mix** (every preset): {mix.describe()}. The default steps are the "
      "preset's `default_steps` (capped at `max_steps`); guided requests use its "
      "`default_guidance_scale`; the upsampler stage runs the preset's `upsampler_sampler` "
      "and `upsampler_steps` for every image.")
    w(f"- **Bounds**: end to end (arrival to the last stage's result): interactive p95 ≤ the "
      f"preset's bound, batch-class p95 ≤ {args.batch_factor:g}× it, and no replica's queue "
      "past 16 × its slots waiting rows (a run that passes it is stopped and fails). The "
      "bound is on the whole chain only, so the search may let one stage queue (the base "
      "stage's time to first progress) as far as the bound leaves room.")
    w("- **The search** (`find_replicas`): from the utilization bound (every step full), "
      "every stage grows by 25% until the bounds hold, then each stage is bisected down with "
      "the others fixed. The answer meets the bounds and one replica fewer in any stage (per "
      "cell) was simulated to fail.")
    w(f"- **Cells, for fleets too large to simulate request by request.** A run of "
      f"{args.requests} requests must span at least {args.window_latencies:g} unloaded latencies "
      "(mean latency of a request alone) of the chain. Past "
      "that rate, stage s is split into k_s identical cells, each receiving 1/k_s of the "
      "requests (a random split of a Poisson stream is Poisson) with power-of-two-choices "
      "inside the cell; one cell per stage is simulated, and a request's latency is the sum "
      "of its stage latencies (stages treated as independent given the request; the "
      "upsampler's arrivals, many replicas' results merged, as Poisson). Routing over the "
      "whole fleet balances at least as well as within a cell, so this errs on the side of "
      "more replicas, by at most the rounding of replicas to a multiple of k_s.\n")

    w("## Stage costs\n")
    w("| preset | stage | slots | call ms | + guided ms | per row ms | source |")
    w("|---|---|---|---|---|---|---|")
    for name, p in presets.items():
        for stage, c in costs[name].items():
            slots = p.batch_rows if stage == "base" else p.upsampler_batch_rows
            w(f"| {name} | {stage} | {slots} | {c.call_s * 1e3:.2f} | {c.guided_s * 1e3:.2f} | "
              f"{c.per_row_s * 1e3:.3f} | {c.source}{' (ESTIMATE)' if c.estimate else ''} |")
    w("")
    if flops:
        w("FLOPs per engine step (FlopCounterMode, meta device, one row × slots; the "
          "classifier's gradient is its forward and backward with respect to x):\n")
        w("| preset | stage | networks | slots | model call TFLOP | gradient call TFLOP |")
        w("|---|---|---|---|---|---|")
        for name, f in flops.items():
            p = presets[name]
            for stage, (m, g) in f.items():
                nets = (f"{p.base_preset} + {p.classifier_preset}" if stage == "base"
                        else p.upsampler_preset)
                slots = p.batch_rows if stage == "base" else p.upsampler_batch_rows
                w(f"| {name} | {stage} | {nets} | {slots} | {m / 1e12:.2f} | {g / 1e12:.2f} |")
        w("")
        w(f"GPU step time = FLOPs / ({args.peak_tflops:g} TFLOP/s × {args.efficiency:g}) + "
          f"{args.call_overhead_ms:g} ms per call (launches, dispatch) + "
          f"{args.row_overhead_ms:g} ms per running row. Precision: the presets' fp16. "
          "`--efficiency`, `--peak-tflops`, `--call-overhead-ms` and `--row-overhead-ms` "
          "change them.\n")
    if cpu_samples:
        w("The CPU costs are least-squares fits to the real `RowStepper`'s steps of the "
          "quickstart-sized networks (jobs/configs/quickstart: 8 px base + classifier, 8→32 "
          "upsampler; random weights, float32, 2 torch threads), the 25th percentile of 15 "
          "mid-chain steps per point, timed round-robin:\n")
        w("| stage | rows | guided | measured ms | fit ms |")
        w("|---|---|---|---|---|")
        for stage, samples in zip(("base", "upsampler"), cpu_samples):
            c = costs["local"][stage]
            for r, g, s in samples:
                w(f"| {stage} | {r} | {'yes' if g else 'no'} | {s * 1e3:.2f} | "
                  f"{c.step_s(r, g) * 1e3:.2f} |")
        w("")

    if check:
        w("## The simulation against the real engine\n")
        w("The real engine (`Engine(StepperRunner(RowStepper(...)))`, the local preset's base "
          "stage: quickstart base + classifier, random weights, 8 slots) in this process, a "
          "thread looping `wait_for_work(); step()` as a Serve replica does, under Poisson "
          "arrivals at fractions of its estimated capacity (slots / full-step time / mean "
          "row-steps per request); then the simulation of the same arrivals, its step cost "
          "fitted (call + guided + per row) to that run's own measured steps, so that the "
          "check is of the scheduling and queueing, at the speed the shared machine had "
          "during the run. Latency: submit to the `result` event. All requests, p50 and p95, "
          "and the relative error of the simulation:\n")
        w("| load | req/s | requests | fitted step ms (+ guided) | real p50 s | sim p50 s | error "
          "| real p95 s | sim p95 s | error | real ttfp p50 s | sim ttfp p50 s |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in check:
            r, s = row["real"]["all"], row["sim"]["all"]
            c = row["cost"]
            w(f"| {row['load']:.2f} | {row['rate']:.1f} | {row['n']} | {c.call_s * 1e3:.1f} "
              f"(+{c.guided_s * 1e3:.1f}) | {r['p50']:.3f} | "
              f"{s['p50']:.3f} | {rel(s['p50'], r['p50'])} | {r['p95']:.3f} | {s['p95']:.3f} "
              f"| {rel(s['p95'], r['p95'])} | {r['ttfp_p50']:.3f} | {s['ttfp_p50']:.3f} |")
        w("")
        (b1, _, _), (e1, _, _) = args.load
        w(f"The machine is shared: its 1-minute load average was {b1:.1f} when this run "
          f"started and {e1:.1f} when it ended (2 cores), so the real runs' step times vary "
          "within a run, which the fit averages and the simulation does not see. "
          "tests/test_capacity.py repeats a small version: p50 within 25%, p95 within 40%.\n")

    w("## Replicas per rate\n")
    w("Interactive p95 bound per preset: " + ", ".join(
        f"`{n}` {bounds[n]:g} s" for n in presets) + f" (batch class: {args.batch_factor:g}×). "
      "GPUs = replicas × the preset's `num_gpus` per replica (1 for both GPU presets). "
      "`cells` is 1 where the whole fleet was simulated as it is.\n")
    for name, p in presets.items():
        stages = stages_of(p, costs[name])
        unit = "CPU replicas" if p.gpus_per_replica == 0 else "replicas"
        est = "" if p.gpus_per_replica == 0 else " (GPU ESTIMATE)"
        w(f"### {name}{est}\n")
        chain = " → ".join(
            f"{st.name} ({st.slots} slots"
            + (f", {st.sampler}-{st.steps}" if st.steps else
               f", {p.default_sampler}-{p.default_steps} by default") + ")" for st in stages)
        w(f"`serve_configs/{name}.yaml`: {chain}; bound p95 ≤ {bounds[name]:g} s.\n")
        head = " | ".join(f"{st.name} {unit}" for st in stages)
        gpu_col = " | GPUs" if p.gpus_per_replica else ""
        w(f"| req/s | {head}{gpu_col} | cells | interactive p50 / p95 / p99 s | batch p95 s | "
          "ttfp p95 s | images/s | runs |")
        w("|" + "---|" * (7 + len(stages) + (1 if p.gpus_per_replica else 0)))
        for s, took in sizing[name]:
            summ = s.evaluation.summary
            it = summ["interactive"]
            reps = " | ".join(f"{n:,}" for n in s.plan.replicas)
            gpus = f" | {math.ceil(sum(s.plan.replicas) * p.gpus_per_replica):,}" \
                if p.gpus_per_replica else ""
            ips = summ["images_per_s"]  # the whole fleet's (arrivals at the full rate)
            w(f"| {s.rate:g} | {reps}{gpus} | {'×'.join(map(str, s.plan.cells))} | "
              f"{fmt_s(it['p50'])} / {fmt_s(it['p95'])} / {fmt_s(it['p99'])} | "
              f"{fmt_s(summ['batch']['p95'])} | {fmt_s(summ['all']['ttfp_p95'])} | "
              f"{ips:,.0f} | {len(s.tried)} |")
        w("")
    w("`runs` counts the simulated fleets the search tried for that row (1: the smallest "
      "fleet, one replica per stage, already meets the bound); `images/s` is the fleet's "
      "measured throughput. `ttfp`: time to the first progress event. Past one cell the "
      "table's replicas are multiples of the cells per stage.\n")
    return "\n".join(L)


if __name__ == "__main__":
    main()
