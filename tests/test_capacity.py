"""The capacity simulation (`adm.capacity`), without Ray:

- it runs the engine's own scheduling (`adm.engine.Engine`): an interactive request pauses a
  batch row at the very step it arrives, with the latencies that rule gives, to the step;
- hand-computable cases hold exactly: one request's latency is steps × step time; requests
  that fit the slots together share every step; a request enters the upsampler when its base
  rows finish; power-of-two-choices spreads simultaneous requests over idle replicas;
- the replica search returns a minimum: its answer meets the bound and one replica fewer,
  simulated again here, does not;
- the simulation, with a cost fitted from the real `RowStepper`'s measured steps, predicts the
  real engine's p50 latency under Poisson arrivals within 25% (p95 within 40%).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS
from adm import capacity as cap
from adm import factory
from adm.compat import openai
from adm.diffusion.rows import RowSpec, RowStepper
from adm.engine import Engine, StepperRunner

STEP = 0.125  # seconds: a power of two, so that sums of steps are exact


def req(i: int, arrival: float, steps: int, images: int = 1, priority: str = "interactive",
        guided: bool = False, upsample: bool = False) -> cap.SimRequest:
    return cap.SimRequest(i, arrival, priority, images, steps, guided, upsample)


def one_stage(slots: int, cost: cap.StageCost | None = None, replicas: int = 1,
              **kw) -> cap.ChainSim:
    stage = cap.StageSpec("base", slots, cost or cap.StageCost(STEP))
    return cap.ChainSim([stage], [replicas], **kw)


def test_the_simulation_runs_the_engines_own_rules_interactive_pauses_batch():
    """Slots 2, two 50-step batch requests from t=0, a 40-step interactive one at t=1 (after
    8 steps): by the engine's class rule it pauses the youngest batch row at once (by length
    alone it could not: 42 steps left is not over PAUSE_RATIO × 40), so it is done 40 steps
    later; the paused row resumes when it leaves, 40 steps late."""
    sim = one_stage(2)
    run = sim.run([req(0, 0.0, 50, priority="batch"), req(1, 0.0, 50, priority="batch"),
                   req(2, 1.0, 40)], warmup=0.0)
    engine = sim.fleet[0][0].engine
    assert type(engine) is Engine and engine.stats.preemptions == 1
    assert run.latency[2] == 40 * STEP  # never waited
    assert run.latency[0] == 50 * STEP  # the older batch row kept its slot
    assert run.latency[1] == (50 + 40) * STEP  # paused for the 40 interactive steps
    assert run.first_progress[2] == STEP


def test_one_request_takes_steps_times_the_step_time():
    cost = cap.StageCost(0.25, guided_s=0.5, per_row_s=0.0625)
    sim = one_stage(8, cost)
    run = sim.run([req(0, 3.0, 20, images=3, guided=True)], warmup=0.0)
    assert run.latency[0] == 20 * (0.25 + 0.5 + 3 * 0.0625)
    assert sim.fleet[0][0].engine.stats.steps == 20


def test_requests_that_fit_the_slots_together_share_every_step():
    """Two 2-image requests on 4 slots arriving together: one model call per step for both,
    so each takes exactly what it takes alone; a third that does not fit waits for them."""
    sim = one_stage(4)
    run = sim.run([req(0, 0.0, 12, images=2), req(1, 0.0, 12, images=2),
                   req(2, 0.0, 12, images=1)], warmup=0.0)
    assert run.latency[0] == run.latency[1] == 12 * STEP
    assert run.latency[2] == 24 * STEP
    assert sim.fleet[0][0].engine.stats.steps == 24


def test_a_request_enters_the_upsampler_when_its_base_rows_finish():
    stages = [cap.StageSpec("base", 4, cap.StageCost(STEP)),
              cap.StageSpec("upsampler", 4, cap.StageCost(0.5), sampler="ddpm", steps=6)]
    sim = cap.ChainSim(stages, [1, 1])
    run = sim.run([req(0, 2.0, 8, images=2, upsample=True), req(1, 2.0, 8)], warmup=0.0)
    assert run.stage_latency["base"][0] == 8 * STEP
    assert run.stage_latency["upsampler"][0] == 6 * 0.5
    assert run.latency[0] == 8 * STEP + 6 * 0.5
    assert run.latency[1] == 8 * STEP  # not upsampled: done after the base stage


def test_power_of_two_choices_sends_simultaneous_requests_to_idle_replicas():
    """Two replicas of 1 slot, two requests at once: the router compares both replicas'
    ongoing requests, so the second goes to the idle one and neither waits (whatever the
    seed); replicas run concurrently in virtual time."""
    for seed in range(5):
        run = one_stage(1, replicas=2, seed=seed).run([req(0, 0.0, 10), req(1, 0.0, 10)],
                                                      warmup=0.0)
        assert run.latency == {0: 10 * STEP, 1: 10 * STEP}


def test_cells_sum_stage_latencies_and_a_lone_request_gets_its_unloaded_latency():
    stages = [cap.StageSpec("base", 4, cap.StageCost(STEP)),
              cap.StageSpec("upsampler", 4, cap.StageCost(0.5), sampler="ddpm", steps=6)]
    unit = [req(i, float(i), 8, upsample=True) for i in range(1, 30)]
    run = cap.simulate_plan(stages, cap.Plan((2, 3), (1, 1)), 0.01, unit)
    assert all(v == 8 * STEP + 6 * 0.5 for v in run.latency.values())
    assert len(run.latency) == len(unit)


def test_the_replica_search_returns_the_minimum():
    """Its answer k meets the bound, and k - 1 replicas (simulated again here) do not."""
    stage = cap.StageSpec("base", 4, cap.StageCost(0.05, guided_s=0.02))
    mix = cap.RequestMix(images=((1, 0.5), (2, 0.5)), steps=((1, 0.8), (2, 0.2)))
    unit = cap.draw_requests(mix, 400, 1.0, default_steps=10, max_steps=50, seed=3,
                             has_upsampler=False)
    rate, bound = 40.0, 1.5
    sizing = cap.find_replicas([stage], rate, bound, unit, window_latencies=5)
    (k,) = sizing.plan.replicas
    assert sizing.plan.cells == (1,) and k > 2
    assert sizing.evaluation.ok and sizing.evaluation.summary["interactive"]["p95"] <= bound

    def ok(n: int) -> bool:
        run = cap.simulate_plan([stage], cap.Plan((1,), (n,)), rate, unit)
        return cap.meets(run.summary(), bound, 4.0)

    assert ok(k) and not ok(k - 1)
    assert sizing.tried[(k - 1,)] is False


def test_flops_scale_with_rows_and_gpu_costs_are_marked_estimates():
    with torch.device("meta"):
        net = openai.create_model(TINY_UNET_FLAGS)
        clf = openai.create_classifier(TINY_CLASSIFIER_FLAGS)
    m1, g1 = cap.stage_flops(net, 8, 1, classifier=clf)
    m8, g8 = cap.stage_flops(net, 8, 8, classifier=clf)
    assert m1 > 0 and g1 > 0 and (m8, g8) == (8 * m1, 8 * g1)
    cost = cap.flops_stage_cost(1e12, 5e11, peak_flops=1e15, efficiency=0.5,
                                call_overhead_s=0.001, per_row_s=0.0)
    assert cost.estimate and "estimate" in cost.source
    assert math.isclose(cost.step_s(4, guided=True), 0.002 + 0.001 + 0.001 + 0.001)


def test_the_simulation_predicts_the_real_engines_latency():
    """The real engine (a real RowStepper: a small ADM + classifier, 8 slots) in-process
    under Poisson arrivals at about half its capacity, and the simulation of the same
    arrivals with the step cost fitted from the stepper's measured steps: p50 within 25%,
    p95 within 40% (a shared 2-core machine)."""
    torch.manual_seed(0)
    net = openai.create_model(TINY_UNET_FLAGS).eval()
    clf = openai.create_classifier(TINY_CLASSIFIER_FLAGS).eval()
    diffusion = factory.create_diffusion({**TINY_UNET_FLAGS, "timestep_respacing": ""})
    stepper = RowStepper(net, diffusion, slots=8, image_size=8, classifier=clf)
    guided, plain = RowSpec("ddim", 50, classifier_scale=1.0), RowSpec("ddim", 50)
    # A first estimate of the full step, only to pick the rate (about half the capacity).
    cost = cap.fit_stage_cost(cap.measure_step_times(stepper, guided, plain, (8,), repeats=3))
    stage = cap.StageSpec("base", 8, cost)
    # DDIM-10, -20 and -50 on the 100-step chain (strides 10, 5, 2).
    mix = cap.RequestMix(steps=((1, 0.7), (2, 0.2), (5, 0.1)))
    unit = cap.draw_requests(mix, 40, 1.0, default_steps=10, max_steps=50, seed=1,
                             has_upsampler=False)
    rate = 0.5 / cap.slot_seconds(stage, 0, unit)
    reqs = cap.at_rate(unit, rate, 1.0)
    spec = lambda r: cap.base_spec(r, "ddim", 1.0)  # noqa: E731
    real, steps = cap.run_real_engine(StepperRunner(stepper), 8, reqs, spec)
    # The cost of the same run's own steps: the shared machine's speed of that minute.
    fitted = cap.StageSpec("base", 8, cap.fit_stage_cost(steps))
    sim = cap.ChainSim([fitted], [1]).run(reqs).summary()["all"]
    real = real.summary()["all"]
    assert sim["p50"] == pytest.approx(real["p50"], rel=0.25), (sim, real, fitted.cost)
    assert sim["p95"] == pytest.approx(real["p95"], rel=0.40), (sim, real, fitted.cost)
