"""Progress bars that suit where the output goes.

On a terminal, `progress_bar` is tqdm's live bar: one per running stage, redrawn in place, and
left as one finished line when the stage ends. Anywhere else (CI, a log file, `| tee`) a bar
drawn in place is debris: carriage returns, cursor-up codes, a redraw per update. There the
same bar writes its state as one plain line at most every `log_interval_s` seconds, and one
line at its end.
"""
from __future__ import annotations

import re
import sys
from typing import IO, Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 10.0  # off a terminal: the least seconds between two lines of one bar

_CURSOR_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A bar's timings ("[00:10<00:00, 1.05s/step]"): two lines that differ only there say the same.
_TIMINGS = re.compile(r"\s*\[[^\]]*\]$")


class _Lines:
    """A file for tqdm off a terminal: each redraw becomes one line, without the carriage
    return, the padding or the cursor moves that tqdm uses to draw in place."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = _CURSOR_CODES.sub("", text).replace("\r", "").strip()
        state = _TIMINGS.sub("", line)
        # close() redraws the final state once more, a moment later: its count is the last
        # line's, only its timings differ.
        if line and state != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = state

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # not a real file, or closed
        return False


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None,
                 desc: str | None = None, unit: str = "it", initial: float = 0,
                 disable: bool = False, log_interval_s: float = LOG_INTERVAL_S,
                 stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar on `stream` (stderr by default): live on a terminal, else one plain line at
    most every `log_interval_s` seconds and one at the end. Use it as a context manager (or
    call `close()`), so that a finished stage's bar stops drawing."""
    stream = stream if stream is not None else sys.stderr
    common = dict(total=total, desc=desc, unit=unit, initial=initial, disable=disable)
    if is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    return tqdm(iterable, file=_Lines(stream), mininterval=log_interval_s,
                maxinterval=max(log_interval_s, 10.0), ascii=True, ncols=100, **common)
