"""The step-level engine of a model replica: a fixed number of model-call rows ("slots") that
every request's images share step by step, as LLM servers share a batch token by token (Orca,
vLLM). At each step the engine re-forms the batch: finished and cancelled rows leave, waiting
rows take the free slots, and one model call advances every row by one step of its own chain
(`adm.diffusion.rows`). So a 10-step request that arrives behind a 250-step one starts at the
next step and is done ten steps later.

No Ray and no threads of its own: `Engine.step()` does one step; a Serve replica calls it in a
loop in a worker thread (`adm.serve.deployments`), and the capacity simulation
(`adm.capacity`, benchmarks/capacity.py) calls it with a runner that only advances a virtual
clock (`VirtualRunner`). What runs
the networks is the `runner` (`StepperRunner` for a real stage).

Scheduling, each step (the rules of `_admit`):
- Order. Waiting rows are taken aged rows first (in the order they aged), then interactive
  rows, then batch rows, each class shortest remaining chain first (ties by arrival: request,
  then image). A row's width is its model-call rows: 2 with classifier-free guidance.
- Admission. Each waiting row in that order takes free slots if its width fits; if not, a
  narrower or shorter row behind it may (so slots do not idle behind a wide row).
- Pausing. A waiting row that does not fit may pause running rows to make room: batch rows for
  an interactive row, and rows of its own class whose remaining steps exceed PAUSE_RATIO times
  its own (a 250-step row for a 10-step one); never a protected aged row (below). Victims go
  batch first, then the longest remaining. A paused row keeps its state and waits again, by
  the same order.
- Never starved. A row ages once it has waited min(`max_wait_steps`, AGE_STRETCH x its chain's
  steps) engine steps in all (queued or paused): a 10-step row after 40, a 250-step one after
  `max_wait_steps`. Aged rows go first, in the order they aged. The oldest running aged rows,
  up to `aged_share` of the slots (at least one row), are protected: never paused. An aged row
  that would be protected but does not fit yet holds the slots it needs as they free (nothing
  else takes them); later aged rows do not go ahead of it into the share. Aged rows past the
  share still take free slots first, but may be paused like any row. So a row waits at most
  its ageing time, plus the chains of the protected rows ahead of it, plus the remaining steps
  of the rows running when it entered the share; and even when everything has aged (past
  capacity) the slots past the share can still pause a 250-step row for a 10-step one. Only
  the slots held that way idle while a row waits that could use them.
Cancelled requests (`cancel`) leave at the next step's start: their slots are free for that
step.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .diffusion.rows import Row, RowSpec, RowStepper, rows_to_images
from .images import from_uint8, to_uint8

PRIORITIES = ("interactive", "batch")
PROGRESS_EVERY_S = 0.25  # progress events: every step, but at most one per this many seconds
# A waiting row pauses a running row of its own class only when that row has more than this
# many times its remaining steps left: enough to stop a 10-step request waiting out a 250-step
# one, not so little that two rows of similar length pause each other back and forth.
PAUSE_RATIO = 2.0
# A row ages after waiting this many times its own chain, or max_wait_steps if that is sooner:
# a short row's wait is bounded by its own length (a batch-class 10-step row behind a stream of
# interactive work waits 40 steps, not max_wait_steps), a long row's by max_wait_steps.
AGE_STRETCH = 4


@dataclass
class Request:
    """One request's images for one stage. `settings` is what the runner needs to start a row
    (a `RowSpec` for `StepperRunner`); image k has class labels[k] and seed seeds[k] (and
    low_res[k], [h, w, 3] uint8, for an upsampler). `on_event(kind, data)` receives the
    request's events, from the thread that calls `Engine.step`:

    - ("queued", {"position": n}): no image of it runs yet; n requests are ahead of it;
    - ("progress", {"step": k, "steps": n}): k of its n steps done (the mean over its images);
      at most one per PROGRESS_EVERY_S, and always the last;
    - ("preview", {"step": k, "images": uint8 [m, H, W, 3]}): the current x_0 predictions of
      its m started images, each time k passes a multiple of `preview_every` (0: none);
    - ("result", {"images": uint8 [N, H, W, 3], "shared": {"requests": r, "images": m}}): done;
      r and m are the most requests and rows that shared one of its steps;
    - ("error", {"detail": str}): the runner failed on a step it was in.
    """

    id: str
    settings: Any
    labels: list
    seeds: list
    low_res: np.ndarray | None = None
    priority: str = "interactive"
    preview_every: int = 0
    on_event: Callable[[str, dict], None] = lambda kind, data: None

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority {self.priority!r}: expected one of {PRIORITIES}")
        if len(self.labels) != len(self.seeds) or not self.labels:
            raise ValueError(f"{len(self.labels)} labels for {len(self.seeds)} seeds")


class Runner(Protocol):
    """What an engine steps: rows it starts, and one step of all running rows at a time."""

    def width(self, settings) -> int: ...  # model-call rows one row of `settings` takes

    def steps(self, settings) -> int: ...  # steps of a row's chain

    def start(self, request: Request, k: int) -> Any: ...  # a row with .index, .done

    def step(self, rows: list) -> None: ...

    def images(self, rows: list) -> np.ndarray: ...  # finished rows' images

    def previews(self, rows: list) -> np.ndarray: ...  # started rows' x_0 predictions


@dataclass(eq=False)
class _Entry:
    """One image of a request inside the engine."""

    request: "_Tracked"
    k: int
    seq: int  # arrival order
    width: int
    row: Any = None  # the runner's row, once started
    waited: int = 0  # steps spent waiting (queued or paused)
    aged_at: int | None = None  # the engine step at which it aged

    @property
    def aged(self) -> bool:
        return self.aged_at is not None

    @property
    def rank(self) -> int:
        """0 interactive, 1 batch."""
        return PRIORITIES.index(self.request.req.priority)

    @property
    def remaining(self) -> int:
        """Steps left in its chain."""
        return self.request.steps if self.row is None else self.row.index + 1

    def order(self) -> tuple:
        """The waiting order: aged rows in the order they aged, then by class, shortest
        remaining first."""
        if self.aged:
            return (0, 0, self.aged_at, self.seq)
        return (1, self.rank, self.remaining, self.seq)

    def may_pause(self, running: "_Entry") -> bool:
        """Whether this waiting row may take `running`'s slots (unless `running` is a protected
        aged row, which the engine checks)."""
        return running.rank > self.rank or (
            running.rank == self.rank and running.remaining > PAUSE_RATIO * self.remaining)


@dataclass(eq=False)
class _Tracked:
    req: Request
    entries: list
    steps: int
    last_progress: float = -1.0
    reported_step: int = -1
    last_preview: int = 0
    position: int | None = None
    shared: tuple = (0, 0)  # most requests and rows in one of its steps


@dataclass
class Stats:
    """Counters and gauges an engine exports (metrics: `adm.serve.metrics`)."""

    slots: int
    queued: dict = field(default_factory=lambda: {p: 0 for p in PRIORITIES})  # rows waiting
    in_flight: dict = field(default_factory=lambda: {p: 0 for p in PRIORITIES})  # rows running
    slots_used: int = 0  # model-call rows of the running rows
    queued_slots: int = 0  # model-call rows the waiting rows need
    steps: int = 0  # engine steps made
    row_steps: int = 0  # rows advanced, summed over steps
    images: int = 0  # images finished
    requests_done: int = 0
    requests_cancelled: int = 0
    rows_cancelled: int = 0
    preemptions: int = 0
    last_step_s: float = 0.0
    step_seconds: float = 0.0  # summed step times


class Engine:
    """The scheduler around a `runner`: `submit` and `cancel` from any thread, `step` from
    one. `slots`: model-call rows per step; `max_wait_steps`: the longest a waiting row waits
    before it ages, and `aged_share`: the fraction of the slots aged rows may hold (see the
    module's rules); `clock`: seconds (a virtual clock in simulation)."""

    def __init__(self, runner: Runner, slots: int, *, max_wait_steps: int = 500,
                 aged_share: float = 0.5, clock: Callable[[], float] = time.monotonic):
        if slots < 1 or max_wait_steps < 0 or not 0 < aged_share <= 1:
            raise ValueError(f"slots={slots} (>= 1), max_wait_steps={max_wait_steps} (>= 0), "
                             f"aged_share={aged_share} (in (0, 1])")
        self.runner, self.slots, self.clock = runner, int(slots), clock
        self.max_wait_steps = int(max_wait_steps)
        self.aged_slots = max(1, round(aged_share * self.slots))
        self.stats = Stats(self.slots)
        self._lock = threading.Condition()
        self._inbox: deque = deque()
        self._cancelled: set = set()
        self._requests: dict[str, _Tracked] = {}
        self._waiting: list[_Entry] = []
        self._running: list[_Entry] = []
        self._seq = 0

    # -- from any thread ------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (its rows join at the next step). A ValueError if a row of it could
        never fit (wider than the slots) or its settings are refused by the runner."""
        width = self.runner.width(request.settings)
        if width > self.slots:
            raise ValueError(f"a row of these settings takes {width} model rows; the engine "
                             f"has {self.slots} slots")
        steps = self.runner.steps(request.settings)
        with self._lock:
            self._inbox.append((request, width, steps))
            self._lock.notify_all()

    def cancel(self, request_id: str) -> None:
        """Drop a request: its rows leave at the next step (queued ones never start)."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (or `timeout`); whether there is."""
        with self._lock:
            return self._lock.wait_for(lambda: self._inbox or self._cancelled or self._waiting
                                       or self._running, timeout)

    @property
    def busy(self) -> bool:
        return bool(self._inbox or self._waiting or self._running)

    # -- the engine thread -------------------------------------------------------------------

    def step(self) -> bool:
        """One step: take new and cancelled requests in, re-form the batch, advance it, send
        the events. False when there was nothing to run."""
        self._take_inbox()
        self._admit()
        self._count()
        self._send_positions()
        if not self._running:
            return False
        start = self.clock()
        rows = [e.row for e in self._running]
        try:
            self.runner.step(rows)
        except Exception as exc:  # the step's requests fail; the engine keeps serving
            self._fail([e.request for e in self._running], exc)
            self._count()
            return True
        elapsed = self.clock() - start
        self.stats.steps += 1
        self.stats.row_steps += len(rows)
        self.stats.last_step_s = elapsed
        self.stats.step_seconds += elapsed
        for e in self._waiting:
            e.waited += 1
            if not e.aged and e.waited >= min(self.max_wait_steps,
                                              AGE_STRETCH * e.request.steps):
                e.aged_at = self.stats.steps
        self._report()
        self._count()
        return True

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            cancelled, self._cancelled = self._cancelled, set()
        for request, width, steps in new:
            tracked = _Tracked(request, [], steps)
            for k in range(len(request.labels)):
                tracked.entries.append(_Entry(tracked, k, self._seq, width))
                self._seq += 1
            self._requests[request.id] = tracked
            self._waiting.extend(tracked.entries)
        for rid in cancelled:
            tracked = self._requests.pop(rid, None)
            if tracked is None:
                continue
            self.stats.requests_cancelled += 1
            gone = [e for e in tracked.entries if e.row is None or not e.row.done]
            self.stats.rows_cancelled += len(gone)
            self._waiting = [e for e in self._waiting if e.request is not tracked]
            self._running = [e for e in self._running if e.request is not tracked]

    def _admit(self) -> None:
        """Re-form the batch by the module's rules."""
        self._waiting.sort(key=_Entry.order)
        free = self.slots - sum(e.width for e in self._running)
        protected = self._protected()
        share = sum(e.width for e in protected)  # slots the protected rows hold
        reserved = 0  # free slots held for aged rows of the share that do not fit yet
        share_closed = False
        for e in list(self._waiting):
            if self._requests.get(e.request.req.id) is not e.request:
                continue  # its request failed meanwhile
            in_share = False
            if e.aged and not share_closed:
                in_share = share + reserved == 0 or share + reserved + e.width <= self.aged_slots
                share_closed = not in_share
            if e.width > free - reserved:
                victims = sorted((r for r in self._running
                                  if r not in protected and e.may_pause(r)),
                                 key=lambda r: (-r.rank, -r.remaining, -r.seq))
                if free - reserved + sum(v.width for v in victims) >= e.width:
                    for v in victims:
                        if free - reserved >= e.width:
                            break
                        self._running.remove(v)
                        self._waiting.append(v)
                        free += v.width
                        self.stats.preemptions += 1
            if e.width > free - reserved:
                if in_share:
                    reserved += e.width
                continue
            if e.row is None:
                try:
                    e.row = self.runner.start(e.request.req, e.k)
                except Exception as exc:  # its request fails; the others go on
                    self._fail([e.request], exc)
                    continue
            self._waiting.remove(e)
            self._running.append(e)
            free -= e.width
            if in_share:
                share += e.width
                protected.add(e)
        self._waiting.sort(key=_Entry.order)

    def _protected(self) -> set:
        """The running aged rows no row may pause: the oldest aged, up to the aged share."""
        out, used = set(), 0
        for e in sorted((e for e in self._running if e.aged), key=_Entry.order):
            if used and used + e.width > self.aged_slots:
                break
            out.add(e)
            used += e.width
        return out

    def _count(self) -> None:
        s = self.stats
        s.queued = {p: 0 for p in PRIORITIES}
        s.in_flight = {p: 0 for p in PRIORITIES}
        for e in self._waiting:
            s.queued[e.request.req.priority] += 1
        for e in self._running:
            s.in_flight[e.request.req.priority] += 1
        s.slots_used = sum(e.width for e in self._running)
        s.queued_slots = sum(e.width for e in self._waiting)

    def _send_positions(self) -> None:
        """`queued` events: each request none of whose rows runs, its place among those."""
        position, seen = 0, set()
        for e in self._waiting:
            tracked = e.request
            if id(tracked) in seen:
                continue
            seen.add(id(tracked))
            if any(x.row is not None for x in tracked.entries):
                continue
            if tracked.position != position:
                tracked.position = position
                tracked.req.on_event("queued", {"position": position})
            position += 1

    def _report(self) -> None:
        """Progress, previews and results of the requests that ran this step."""
        now = self.clock()
        ran = list(dict.fromkeys(e.request for e in self._running))
        for tracked in ran:
            req, n = tracked.req, len(tracked.entries)
            tracked.shared = max(tracked.shared, (len(ran), len(self._running)))
            step = sum(e.row.steps_done if e.row is not None else 0
                       for e in tracked.entries) // n
            finished = all(e.row is not None and e.row.done for e in tracked.entries)
            if step != tracked.reported_step and (
                    finished or now - tracked.last_progress >= PROGRESS_EVERY_S):
                tracked.reported_step, tracked.last_progress = step, now
                req.on_event("progress", {"step": step, "steps": tracked.steps})
            every = req.preview_every
            if every and not finished and step // every > tracked.last_preview:
                tracked.last_preview = step // every
                started = [e.row for e in tracked.entries if e.row is not None
                           and e.row.pred_xstart is not None]
                if started:
                    req.on_event("preview", {"step": step,
                                             "images": self.runner.previews(started)})
            if finished:
                self._requests.pop(req.id, None)
                self.stats.requests_done += 1
                self.stats.images += n
                req.on_event("result", {
                    "images": self.runner.images([e.row for e in tracked.entries]),
                    "shared": {"requests": tracked.shared[0], "images": tracked.shared[1]}})
        # A finished row leaves at once, even while its request's other rows still run or
        # wait: it must not hold its slots (or be stepped again).
        self._running = [e for e in self._running if not e.row.done]

    def _fail(self, tracked: list[_Tracked], exc: Exception) -> None:
        for t in dict.fromkeys(tracked):
            self._requests.pop(t.req.id, None)
            self._waiting = [e for e in self._waiting if e.request is not t]
            self._running = [e for e in self._running if e.request is not t]
            t.req.on_event("error", {"detail": f"{type(exc).__name__}: {exc}"})


class StepperRunner:
    """A real stage's runner: rows of a `RowStepper` (requests' settings are `RowSpec`)."""

    def __init__(self, stepper: RowStepper):
        self.stepper = stepper

    def width(self, settings: RowSpec) -> int:
        self.stepper.chain(settings)  # refuses what the stage cannot run, before it queues
        return settings.width

    def steps(self, settings: RowSpec) -> int:
        return self.stepper.chain(settings).num_timesteps

    def start(self, request: Request, k: int) -> Row:
        low = None
        if request.low_res is not None:
            low = from_uint8(request.low_res[k:k + 1], self.stepper.device)[0]
        return self.stepper.start(request.settings, request.labels[k], request.seeds[k], low)

    def step(self, rows: list[Row]) -> None:
        self.stepper.step(rows)

    def images(self, rows: list[Row]) -> np.ndarray:
        return rows_to_images(rows)

    def previews(self, rows: list[Row]) -> np.ndarray:
        return to_uint8(torch.stack([r.pred_xstart for r in rows]).clamp(-1, 1))
