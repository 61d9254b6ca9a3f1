"""The training bar, drawn by the driver from the step that rank 0 reports.

The bar belongs on the driver's terminal, but the steps happen in a Train worker. Rank 0 sends
its step to a small named actor (at most twice a second, without waiting for an answer: no
sync in the training loop); a thread of the driver reads it and draws an `adm.progress` bar,
which is closed when `fit()` returns. (Ray's own `tqdm_ray` draws worker bars on the driver
too, but leaves bars of finished runs redrawing and moves the cursor in log files.)
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Iterator

import ray

from ..progress import progress_bar

POLL_S = 0.5


@ray.remote(num_cpus=0)
class StepCounter:
    """Per run: (first step of its latest attempt, latest step), as rank 0 last reported them.
    One per driver process, shared by its runs (an actor is a process: not one per run)."""

    def __init__(self):
        self.runs: dict[str, tuple[int | None, int]] = {}

    def report(self, run: str, step: int, first: int) -> None:
        self.runs[run] = (first, step)

    def read(self, run: str) -> tuple[int | None, int]:
        return self.runs.get(run, (None, 0))

    def forget(self, run: str) -> None:
        self.runs.pop(run, None)


_counter = None  # this driver's StepCounter, and the Ray session it lives in


def _shared_counter():
    global _counter
    session = ray.get_runtime_context().get_job_id()
    if _counter is None or _counter[0] != session:
        name = f"adm-train-progress-{uuid.uuid4().hex[:12]}"
        _counter = (session, name, StepCounter.options(name=name).remote())
    return _counter[1], _counter[2]


class StepReporter:
    """Rank 0's side: `update(step)` forwards the step, rate-limited; `close()` sends the last."""

    def __init__(self, counter: str, first: int):
        name, self.run = counter.split("/", 1)
        self.counter = ray.get_actor(name)
        self.first, self.sent_at = first, 0.0
        self.counter.report.remote(self.run, first, first)

    def update(self, step: int) -> None:
        now = time.monotonic()
        if now - self.sent_at >= POLL_S:
            self.counter.report.remote(self.run, step, self.first)
            self.sent_at = now

    def close(self, step: int) -> None:
        self.counter.report.remote(self.run, step, self.first)


def _draw(counter, run: str, bar, stop: threading.Event) -> None:
    first_seen = None
    while True:
        stopping = stop.wait(POLL_S)
        try:
            first, step = ray.get(counter.read.remote(run), timeout=10)
        except Exception:  # the actor is busy or gone: the next poll (or the end) catches up
            first, step = first_seen, bar.n
        if first is not None and first != first_seen:  # a (re)start: rate from here on
            first_seen = first
            bar.reset(total=bar.total)
            bar.initial = bar.n = bar.last_print_n = first
        if step != bar.n:
            bar.update(step - bar.n)
        if stopping:
            return


@contextlib.contextmanager
def driver_bar(kind: str, max_steps: int) -> Iterator[str]:
    """Yields "COUNTER/RUN", what the workers need to report to this bar (a `StepReporter`),
    and draws the bar meanwhile."""
    name, counter = _shared_counter()
    run = uuid.uuid4().hex[:12]
    stop = threading.Event()
    with progress_bar(total=max_steps, desc=f"[{kind}] train", unit="step") as bar:
        thread = threading.Thread(target=_draw, args=(counter, run, bar, stop), daemon=True,
                                  name="adm-train-progress")
        thread.start()
        try:
            yield f"{name}/{run}"
        finally:
            stop.set()
            thread.join(timeout=15)
            counter.forget.remote(run)
