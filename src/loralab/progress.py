"""Progress of long work: rich bars on a terminal, plain timed lines in a log; silent when no console
is given (library use)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

LOG_EVERY_S = 30.0  # a progress line this often when the output is not a terminal (--log-every)


class Reporter:
    def __init__(self, console: Console | None = None, every_s: float = LOG_EVERY_S):
        self.console, self.every_s = console, every_s

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)

    @contextmanager
    def task(self, description: str, total: int, unit: str = "") -> Iterator[Callable[..., None]]:
        """Yield `update(advance=1, **fields)`; shown as step/total, the fields (loss, ...) and an ETA."""
        if self.console is None:
            yield lambda advance=1, **fields: None
        elif not self.console.is_terminal:  # a log file, CI, nohup: a bar redrawn in place would print nothing
            with self._lines(description, total, unit) as update:
                yield update
        else:
            with self._bar(description, total, unit) as update:
                yield update

    @contextmanager
    def _bar(self, description: str, total: int, unit: str) -> Iterator[Callable[..., None]]:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False, refresh_per_second=4,  # steps take ~1 s: 4 Hz is smooth
        ) as bar:
            tid = bar.add_task(description, total=total, status="")

            def update(advance: int = 1, **fields) -> None:
                bar.update(tid, advance=advance, status=_fields(fields))

            yield update

    @contextmanager
    def _lines(self, description: str, total: int, unit: str) -> Iterator[Callable[..., None]]:
        """One line when the phase starts, one every `every_s` seconds with the rate and ETA, one at its end."""
        t0 = last = time.monotonic()
        state = {"done": 0, "fields": {}}
        self.log(escape(f"{description}: {total} {unit}".rstrip()))

        # The ETA comes from the rate of the last minute or so, not since the start: under load (other
        # processes on the CPU) or in a phase whose items slow down, the average since the start is too hopeful.
        marks = [(t0, 0)]

        def line(final: bool = False) -> None:
            done, now = state["done"], time.monotonic()
            elapsed = now - t0
            text = f"{description}: {done}/{total} {unit}".rstrip()
            if not final and total:
                text += f" ({100 * done / total:.0f}%)"
            status = _fields(state["fields"])
            text += (f", {status}" if status else "") + f", {_clock(elapsed)} elapsed"
            if final:
                text += " (done)" if done >= total else " (stopped)"
            elif 0 < done < total:
                text += f", ETA {_clock(recent_eta(marks, now, done, total, max(RECENT_S, 2 * self.every_s)))}"
            marks.append((now, done))
            self.log(escape(text))

        def update(advance: int = 1, **fields) -> None:
            nonlocal last
            state["done"] += advance
            state["fields"].update(fields)
            now = time.monotonic()
            if now - last >= self.every_s and state["done"] < total:
                last = now
                line()

        try:
            yield update
        finally:
            line(final=True)


RECENT_S = 60.0  # the window whose rate an ETA extrapolates


def recent_eta(marks: list[tuple[float, int]], now: float, done: int, total: int, window: float = RECENT_S) -> float:
    """Seconds left at the rate measured since the last mark at least `window` seconds old (the start
    when none is): `marks` are (time, items done), oldest first."""
    since = next(((t, d) for t, d in reversed(marks) if now - t >= window), marks[0])
    t, d = since
    rate = (done - d) / (now - t) if now > t and done > d else None
    if rate is None:  # nothing finished in the window: the average since the start
        t, d = marks[0]
        rate = (done - d) / (now - t) if now > t and done > d else 0.0
    return (total - done) / rate if rate > 0 else float("nan")


class Overall:
    """The whole command's progress, one line as each job starts: "run 3 of 6 (B (seed 1)), 2 done in
    0:01:20, ETA 0:02:40". The ETA is the measured mean of the jobs that trained here times the jobs
    left; jobs reused from the workspace take no time and do not count in the mean. Safe to call from
    the threads of an executor with several slots."""

    def __init__(self, rep: "Reporter", noun: str, total: int | None, clock: Callable[[], float] = time.monotonic):
        self.rep, self.noun, self.total, self.clock = rep, noun, total, clock
        self.started = self.finished = 0
        self.spent: list[float] = []
        self.t0 = clock()
        self.lock = threading.Lock()

    def start(self, label: str) -> float:
        """Log the line for the job starting now; returns its start time (for `finish`)."""
        with self.lock:
            self.started += 1
            of = f" of {self.total}" if self.total else ""
            text = f"{self.noun} {self.started}{of} ({label})"
            if self.finished:
                text += f", {self.finished} done in {_clock(self.clock() - self.t0)}"
            eta = self.eta()
            if eta is not None:
                text += f", ETA {duration(eta)}"
        self.rep.log(escape(text))
        return self.clock()

    def finish(self, started: float, reused: bool = False) -> None:
        with self.lock:
            self.finished += 1
            if not reused:
                self.spent.append(self.clock() - started)

    def eta(self) -> float | None:
        """Seconds until the last job ends, or None before any job has trained (no rate yet) or without a total."""
        if not self.spent or not self.total:
            return None
        return sum(self.spent) / len(self.spent) * max(self.total - self.finished, 0)


def duration(seconds: float) -> str:
    """A time to come, as a person reads it: "45 s", "12 min", "2.5 h"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _fields(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
