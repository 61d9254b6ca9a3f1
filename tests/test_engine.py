"""The step engine (`adm.engine`) and its per-row step (`adm.diffusion.rows`), without Ray:

- every row gets exactly the float32 bits `adm.diffusion.sample` gives it (per-row seeds, a
  padded model call of the same number of rows), whether it runs alone or joins a full engine
  at any step beside rows of other samplers, steps, scales and classes, and after being paused;
- the scheduling rules: a request joins at the next step, a finished row frees its slot at
  once, interactive rows pause batch rows (state kept) and a short row pauses a much longer one
  of its class, rows age and are never starved (batch rows by interactive ones, wide
  classifier-free rows by narrow ones), cancelled rows leave at the next step, events (queued,
  progress, preview, result, error) come as documented. These use a runner that only counts
  steps on a virtual clock.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, randomized
from adm import factory
from adm.compat import openai
from adm.diffusion import sample
from adm.diffusion.rows import RowSpec, RowStepper
from adm.diffusion.seeds import index_seeds
from adm.engine import Engine, Request, StepperRunner
from adm.images import to_uint8

SLOTS = 8
BASE = {**TINY_UNET_FLAGS, "class_dropout_prob": 0.1}  # has a null class: cfg works
UPSAMPLER = {**{k: v for k, v in TINY_UNET_FLAGS.items() if k != "image_size"},
             "large_size": 16, "small_size": 8}
SETTINGS = [  # every sampler; guided, classifier-free, both; DDIM with eta; odd step counts
    RowSpec("ddim", 10),
    RowSpec("ddpm", 7, classifier_scale=2.0),
    RowSpec("dpmpp_2m", 6, lambda_min=-5.1),
    RowSpec("dpmpp_3m", 9, lambda_min=-5.1, classifier_scale=1.5),
    RowSpec("ddim", 5, cfg_scale=3.0),
    RowSpec("ddpm", 4, cfg_scale=2.0, classifier_scale=1.0),
    RowSpec("ddim", 12, eta=0.5),
    RowSpec("dpmpp_2m", 8, lambda_min=-5.1, cfg_scale=1.5),
    RowSpec("ddim", 10, classifier_scale=3.0, guidance_interval=(0.3, 3.0)),  # part of it
    RowSpec("dpmpp_2m", 7, lambda_min=-5.1, classifier_scale=2.0, guidance_interval=(1.0, 1e3)),
    RowSpec("unipc", 8, lambda_min=-5.1, classifier_scale=1.5),
    RowSpec("unipc", 5, lambda_min=-5.1, cfg_scale=2.0),
    # deep-feature reuse, each row by its own call count, beside rows that run full every call
    RowSpec("unipc", 7, lambda_min=-5.1, classifier_scale=1.5, cache_interval=2),
    RowSpec("ddim", 9, cache_interval=3, cfg_scale=2.0),
    RowSpec("ddpm", 5, classifier_scale=1.0, cache_interval=2),
]


@pytest.fixture(scope="module")
def base():
    net = randomized(openai.create_model(BASE), 1)
    clf = randomized(openai.create_classifier(TINY_CLASSIFIER_FLAGS), 2)
    diffusion = factory.create_diffusion({**BASE, "timestep_respacing": ""})
    return net, clf, diffusion


def reference(net, diffusion, s: RowSpec, label: int, seeds: list, clf=None,
              low_res=None, size: int = 8) -> torch.Tensor:
    """`sample` as a generation stage calls it: one call of SLOTS rows, the rows past the
    given seeds repeating the first (the padding rule of adm.stage)."""
    pad = [0] * (SLOTS - len(seeds))
    args = {"sampler": s.sampler, "steps": s.steps, "cfg_scale": s.cfg_scale, "eta": s.eta,
            "lambda_min": s.lambda_min, "cache_interval": s.cache_interval}
    if s.classifier_scale > 0:
        args.update(classifier=clf, classifier_scale=s.classifier_scale,
                    guidance_interval=s.guidance_interval)
    kwargs = None if low_res is None else {"low_res": low_res[list(range(len(seeds))) + pad]}
    out = sample(net, diffusion, (SLOTS, 3, size, size), y=torch.full((SLOTS,), label),
                 seeds=seeds + [seeds[0]] * len(pad), model_kwargs=kwargs, **args)
    return out[:len(seeds)]


def run_rows(stepper: RowStepper, jobs: list, rng: random.Random) -> dict:
    """Start `jobs` ((key, settings, label, seed, low_res)) at random steps in a batch kept as
    full as the slots allow; each key's final row."""
    pending, active, done = list(jobs), [], {}
    while pending or active:
        width = sum(r.settings.width for _, r in active)
        while pending and width + pending[0][1].width <= SLOTS and (
                not active or rng.random() < 0.6):
            key, s, label, seed, low = pending.pop(0)
            active.append((key, stepper.start(s, label, seed, low)))
            width += s.width
        stepper.step([r for _, r in active])
        done.update((key, r) for key, r in active if r.done)
        active = [(key, r) for key, r in active if not r.done]
    return done


def test_every_row_gets_the_bits_sample_gives_it_alone_or_in_a_full_batch(base):
    net, clf, diffusion = base
    stepper = RowStepper(net, diffusion, slots=SLOTS, image_size=8, classifier=clf)
    seeds = {i: index_seeds(100 + i, range(3)) for i in range(len(SETTINGS))}
    want = {i: reference(net, diffusion, s, i % 10, seeds[i], clf)
            for i, s in enumerate(SETTINGS)}
    jobs = [((i, k), s, i % 10, seeds[i][k], None) for i, s in enumerate(SETTINGS)
            for k in range(3)]
    random.Random(0).shuffle(jobs)
    crowded = run_rows(stepper, jobs, random.Random(1))
    for (i, k), row in crowded.items():
        assert torch.equal(row.result, want[i][k]), (SETTINGS[i], k,
                                                     (row.result - want[i][k]).abs().max())
        assert row.steps_done == row.steps
    for i in (1, 3, 5):  # alone: one row in a padded call
        (row,) = run_rows(stepper, [(0, SETTINGS[i], i, seeds[i][2], None)],
                          random.Random(0)).values()
        assert torch.equal(row.result, want[i][2])


def test_upsampler_rows_get_the_bits_sample_gives_them():
    net = randomized(openai.create_superres_model(UPSAMPLER), 3)
    diffusion = factory.create_diffusion({**UPSAMPLER, "timestep_respacing": ""})
    stepper = RowStepper(net, diffusion, slots=SLOTS, image_size=16)
    low = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = RowSpec("ddim", 4, cache_interval=2)
    seeds = index_seeds(5, range(3), "upsampler")
    want = reference(net, diffusion, s, 2, seeds, low_res=low, size=16)
    other = RowSpec("ddpm", 6)
    jobs = [(k, s, 2, seeds[k], low[k]) for k in range(3)] + [
        (("other", k), other, 7, 99 + k, low[k % 3]) for k in range(5)]
    random.Random(2).shuffle(jobs)
    got = run_rows(stepper, jobs, random.Random(3))
    for k in range(3):
        assert torch.equal(got[k].result, want[k])


def test_a_paused_row_resumes_where_it_was(base):
    """A batch row paused for interactive ones ends with the bits it has alone."""
    net, clf, diffusion = base
    runner = StepperRunner(RowStepper(net, diffusion, slots=2, image_size=8, classifier=clf))
    engine = Engine(runner, 2)
    results = {}

    def keep(rid):
        return lambda kind, data: results.__setitem__(rid, data["images"]) \
            if kind == "result" else None

    s = SETTINGS[3]  # 3M, guided: history and gradients must survive the pause
    seeds = index_seeds(7, range(2))
    engine.submit(Request("bulk", s, [4, 4], seeds, priority="batch", on_event=keep("bulk")))
    for _ in range(3):
        engine.step()
    engine.submit(Request("now", SETTINGS[0], [1, 2], [1, 2], on_event=keep("now")))
    engine.step()
    assert engine.stats.preemptions == 2 and engine.stats.in_flight["batch"] == 0
    while engine.step():
        pass
    want = to_uint8(reference(net, diffusion, s, 4, seeds, clf))
    assert np.array_equal(results["bulk"], want)


# ---------------------------------------------------------------- scheduling (virtual runner)

@dataclass(frozen=True)
class Fake:
    steps: int
    width: int = 1


class CountingRow:
    def __init__(self, rid: str, steps: int):
        self.rid, self.steps, self.index = rid, steps, steps - 1
        self.result = self.pred_xstart = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def steps_done(self) -> int:
        return self.steps if self.done else self.steps - 1 - self.index


class CountingRunner:
    """Rows that only count their steps; each step takes `step_s` on a virtual clock."""

    def __init__(self, step_s: float = 0.1):
        self.now, self.step_s, self.started, self.batches = 0.0, step_s, [], []

    def clock(self) -> float:
        return self.now

    def width(self, s: Fake) -> int:
        return s.width

    def steps(self, s: Fake) -> int:
        return s.steps

    def start(self, request: Request, k: int) -> CountingRow:
        self.started.append((request.id, k))
        return CountingRow(request.id, request.settings.steps)

    def step(self, rows: list) -> None:
        self.batches.append([r.rid for r in rows])
        self.now += self.step_s
        for r in rows:
            r.pred_xstart = 0
            if r.index == 0:
                r.result = 1
            else:
                r.index -= 1

    def images(self, rows: list) -> np.ndarray:
        return np.zeros((len(rows), 1, 1, 3), np.uint8)

    previews = images


def engine_with(slots: int, **kw) -> tuple[Engine, CountingRunner]:
    runner = CountingRunner()
    return Engine(runner, slots, clock=runner.clock, **kw), runner


class Events:
    def __init__(self):
        self.log = []

    def __call__(self, rid: str):
        return lambda kind, data: self.log.append((rid, kind, data))

    def of(self, rid: str, kind: str) -> list:
        return [d for r, k, d in self.log if r == rid and k == kind]


def test_a_short_request_joins_at_the_next_step_and_is_not_held_by_a_long_one():
    engine, runner = engine_with(4)
    events = Events()
    engine.submit(Request("long", Fake(250), [0], [0], on_event=events("long")))
    for _ in range(5):
        engine.step()
    engine.submit(Request("short", Fake(10), [0, 0], [1, 2], on_event=events("short")))
    steps = 0
    while not events.of("short", "result"):
        engine.step()
        steps += 1
    assert steps == 10  # it ran its 10 steps from the step after it came
    assert not events.of("long", "result") and engine.stats.in_flight["interactive"] == 1


def test_a_finished_row_frees_its_slot_before_its_request_ends():
    """A request of more rows than slots: each row leaves as soon as it is done, so the next
    takes its slot (a finished row that held its slot until its request ended would block the
    request's own waiting rows for ever)."""
    engine, runner = engine_with(2)
    events = Events()
    engine.submit(Request("wide", Fake(3), [0] * 5, list(range(5)), on_event=events("wide")))
    for _ in range(12):
        if not engine.step():
            break
    assert len(events.of("wide", "result")) == 1
    assert len(runner.batches) == 9  # rows 0-1, 2-3, then 4: 3 steps each
    assert all(len(b) <= 2 for b in runner.batches)
    assert engine.stats.row_steps == 15  # each of the 5 rows stepped exactly 3 times


def test_interactive_rows_pause_batch_rows_which_resume_with_their_state():
    engine, runner = engine_with(3)
    events = Events()
    engine.submit(Request("bulk", Fake(20), [0] * 3, [0, 1, 2], priority="batch",
                          on_event=events("bulk")))
    for _ in range(4):
        engine.step()
    engine.submit(Request("now", Fake(5, width=2), [0], [0], on_event=events("now")))
    engine.step()
    paused = [e for e in engine._waiting]
    # The two youngest batch rows made room (a classifier-free row is two wide).
    assert [e.k for e in paused] == [1, 2] and engine.stats.preemptions == 2
    assert all(e.row.index == 20 - 1 - 4 for e in paused)  # kept where they stopped
    while not events.of("now", "result"):
        engine.step()
    assert len(runner.batches) == 9  # 4 + its 5 steps: it never waited
    while engine.step():
        pass
    assert events.of("bulk", "result") and engine.stats.requests_done == 2
    assert runner.started.count(("bulk", 1)) == 1  # resumed, not restarted


def test_batch_rows_age_and_are_never_starved():
    """One slot, and always two interactive requests of 3 steps (a new one whenever one is
    done), so one always waits for the slot: the batch row waits until it has waited
    max_wait_steps steps (here fewer than 4x its 8 steps), then holds the slot for itself: it
    runs when the interactive row running then ends, and runs its 8 steps without a pause."""
    wait = 19  # it ages in the middle of an interactive row (steps 18-20)
    engine, runner = engine_with(1, max_wait_steps=wait)
    events = Events()
    sent = 0

    def keep_two_interactive():
        nonlocal sent
        while sent - sum(bool(events.of(f"i{k}", "result")) for k in range(sent)) < 2:
            engine.submit(Request(f"i{sent}", Fake(3), [0], [0], on_event=events(f"i{sent}")))
            sent += 1

    keep_two_interactive()
    engine.step()
    engine.submit(Request("bulk", Fake(8), [0], [0], priority="batch",
                          on_event=events("bulk")))
    for n in range(1, 100):
        keep_two_interactive()
        engine.step()
        if events.of("bulk", "result"):
            break
    bulk_steps = [i for i, rids in enumerate(runner.batches) if rids == ["bulk"]]
    # It came after step 0 and waited `wait` steps (1..wait), then the rest of step 18-20's
    # interactive row.
    assert bulk_steps == list(range(21, 21 + 8))
    assert engine.stats.preemptions == 0


def test_a_short_request_pauses_a_long_one_of_its_class_but_not_a_similar_one():
    """Every slot held by a 250-step interactive request: a 10-step one pauses one of its rows
    and is done ten steps later (it never waits for the long one to finish); a 200-step one is
    not short enough to pause anything and waits its turn."""
    engine, runner = engine_with(4)
    events = Events()
    engine.submit(Request("long", Fake(250), [0] * 4, list(range(4)), on_event=events("long")))
    for _ in range(5):
        engine.step()
    engine.submit(Request("similar", Fake(200), [0], [0], on_event=events("similar")))
    engine.submit(Request("short", Fake(10), [0], [0], on_event=events("short")))
    for _ in range(10):
        engine.step()
    assert events.of("short", "result") and engine.stats.preemptions == 1
    assert ("similar", 0) not in runner.started
    while engine.step():
        pass
    assert events.of("long", "result") and events.of("similar", "result")


def test_a_row_ages_after_four_times_its_chain_or_max_wait_steps():
    """Ageing scales with a row's own length, up to max_wait_steps: a 2-step row ages after 8
    steps of waiting, a 10-step one after 40, a 50-step one after max_wait_steps (100)."""
    engine, _ = engine_with(4, max_wait_steps=100)
    engine.submit(Request("hog", Fake(1000), [0] * 4, list(range(4))))
    engine.step()
    for rid, steps in (("2", 2), ("10", 10), ("50", 50)):
        engine.submit(Request(rid, Fake(steps), [0], [0], priority="batch"))
    aged = {}
    for n in range(1, 121):
        engine.step()
        for e in engine._waiting + engine._running:
            if e.aged and e.request.req.id not in aged:
                aged[e.request.req.id] = n
    assert aged == {"2": 8, "10": 40, "50": 100}


def test_aged_rows_past_their_share_run_but_a_short_row_may_pause_them():
    """Four slots, aged_share 0.5: four 250-step rows that aged while 20-step rows held the
    slots take all four slots when those end (no slot idles), but only the two oldest are
    protected: a 10-step request that comes then pauses one of the other two, joins at the
    next step and is done ten steps later. With every aged row protected it would wait ~230
    steps for a 250-step row to finish."""
    engine, runner = engine_with(4, max_wait_steps=5, aged_share=0.5)
    events = Events()
    engine.submit(Request("first", Fake(20), [0] * 4, list(range(4))))
    engine.step()
    engine.submit(Request("long", Fake(250), [0] * 4, list(range(4))))
    for _ in range(29):
        engine.step()
    assert [e.request.req.id for e in engine._running] == ["long"] * 4
    assert all(e.aged for e in engine._running) and len(engine._protected()) == 2
    engine.submit(Request("short", Fake(10), [0], [0], on_event=events("short")))
    for n in range(1, 300):
        engine.step()
        if events.of("short", "result"):
            break
    assert n == 10 and engine.stats.preemptions == 1


def test_aged_rows_go_in_the_order_they_aged():
    """Two slots, aged_share 0.5 (one slot), both held by interactive rows until step 300: a
    200-step batch row (it ages at 100 and holds the share's slot), a 250-step one that came at
    step 30 (it ages at 130), then a 10-step one that came at step 75 but ages sooner (after 40
    steps: at 115). When the slots free, the 200-step row takes the share's slot and the 10-step
    row the other (the 250-step row follows it): the order they aged, not the order they came."""
    engine, runner = engine_with(2, max_wait_steps=100, aged_share=0.5)
    engine.submit(Request("blockers", Fake(300), [0, 0], [0, 1]))
    engine.submit(Request("first", Fake(200), [0], [0], priority="batch"))
    for n in range(1, 320):
        engine.step()
        if n == 30:
            engine.submit(Request("long", Fake(250), [0], [0], priority="batch"))
        if n == 75:
            engine.submit(Request("short", Fake(10), [0], [0], priority="batch"))
    order = [rid for rid, _ in runner.started]
    assert order == ["blockers", "blockers", "first", "short", "long"], order


def test_a_wide_row_is_never_starved_by_narrow_ones():
    """Narrow rows fill a slot a wide (classifier-free) row cannot use yet; once the wide row
    has waited max_wait_steps (more than 4x its 2 steps) it holds its place, nothing behind it
    is admitted, and it runs as soon as the rows before it finish."""
    wait = 9
    engine, runner = engine_with(2, max_wait_steps=wait)
    events = Events()
    engine.submit(Request("n0", Fake(3), [0], [0]))
    engine.step()
    engine.submit(Request("wide", Fake(2, width=2), [0], [0], on_event=events("wide")))
    for n in range(1, 40):
        engine.submit(Request(f"n{n}", Fake(3), [0], [0]))  # one more narrow row each step
        engine.step()
        if events.of("wide", "result"):
            break
    started = [rid for rid, _ in runner.started]
    assert started.index("wide") > started.index("n2")  # narrow rows used the free slot first
    # it aged after `wait` steps of waiting, then waited for at most one narrow row (3 steps)
    # and ran its 2 steps
    assert n <= 1 + wait + 3 + 2, n


def test_cancelled_rows_leave_at_the_next_step_and_queued_ones_never_start():
    engine, runner = engine_with(2)
    engine.submit(Request("a", Fake(50), [0, 0], [0, 1]))
    engine.submit(Request("b", Fake(50), [0], [0]))
    engine.step()
    assert engine.stats.in_flight["interactive"] == 2 and engine.stats.queued["interactive"] == 1
    engine.cancel("a")
    engine.cancel("b")
    assert not engine.step()  # nothing left to run at the very next step
    assert engine.stats.in_flight["interactive"] == 0 and engine.stats.queued["interactive"] == 0
    assert engine.stats.requests_cancelled == 2 and engine.stats.rows_cancelled == 3
    assert ("b", 0) not in runner.started and len(runner.batches) == 1
    engine.cancel("gone")  # unknown or finished: nothing happens
    assert not engine.step() and engine.stats.requests_cancelled == 2


def test_events_queued_progress_preview_result():
    engine, runner = engine_with(1)
    events = Events()
    engine.submit(Request("a", Fake(3), [0], [0], on_event=events("a")))
    engine.step()  # a runs; then two more wait, the shorter first
    engine.submit(Request("b", Fake(4), [0], [0], preview_every=2, on_event=events("b")))
    engine.submit(Request("c", Fake(2), [0], [0], on_event=events("c")))
    while engine.step():
        pass
    assert events.of("a", "queued") == [] and events.of("c", "queued") == [{"position": 0}]
    assert events.of("b", "queued") == [{"position": 1}, {"position": 0}]
    assert [rid for rid, _ in runner.started] == ["a", "c", "b"]
    assert [d["step"] for d in events.of("b", "preview")] == [2]  # 4 is the result
    assert len(events.of("b", "result")) == 1
    kinds = [k for r, k, _ in events.log if r == "b"]
    assert kinds.index("queued") < kinds.index("progress") < kinds.index("result")
    assert kinds[-1] == "result"
    # Progress: every step, at most one per PROGRESS_EVERY_S (steps of 0.1 s: every third),
    # and the last always.
    engine, runner = engine_with(1)
    engine.submit(Request("d", Fake(10), [0], [0], on_event=events("d")))
    while engine.step():
        pass
    progress = events.of("d", "progress")
    assert [d["step"] for d in progress] == [1, 4, 7, 10]
    assert all(d["steps"] == 10 for d in progress)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    engine, runner = engine_with(1)
    events = Events()
    engine.submit(Request("a", Fake(3), [0], [0], on_event=events("a")))
    engine.submit(Request("b", Fake(3), [0], [0], on_event=events("b")))
    real = runner.step

    def boom(rows):
        runner.step = real
        raise RuntimeError("out of memory")

    runner.step = boom
    engine.step()
    assert events.of("a", "error") == [{"detail": "RuntimeError: out of memory"}]
    while engine.step():
        pass
    assert len(events.of("b", "result")) == 1 and not events.of("a", "result")
    # A row that cannot start fails its request alone.
    start = runner.start
    runner.start = lambda request, k: start(request, k) if request.id != "c" or k == 0 else \
        (_ for _ in ()).throw(ValueError("bad low_res"))
    engine.submit(Request("c", Fake(3), [0, 0], [0, 1], on_event=events("c")))
    engine.submit(Request("d", Fake(3), [0], [0], on_event=events("d")))
    while engine.step():
        pass
    assert events.of("c", "error") == [{"detail": "ValueError: bad low_res"}]
    assert len(events.of("d", "result")) == 1 and not events.of("c", "result")


def test_requests_that_cannot_run_are_refused_at_submit(base):
    net, clf, diffusion = base
    runner = StepperRunner(RowStepper(net, diffusion, slots=1, image_size=8))
    engine = Engine(runner, 1)
    with pytest.raises(ValueError, match="takes 2 model rows"):
        engine.submit(Request("w", RowSpec("ddim", 5, cfg_scale=2.0), [0], [0]))
    with pytest.raises(ValueError, match="needs a classifier"):
        engine.submit(Request("g", RowSpec("ddim", 5, classifier_scale=1.0), [0], [0]))
    with pytest.raises(ValueError, match="eta"):
        engine.submit(Request("e", RowSpec("dpmpp_2m", 5, eta=0.5), [0], [0]))
    with pytest.raises(ValueError, match="priority"):
        Request("p", RowSpec(), [0], [0], priority="urgent")
    assert not engine.busy
