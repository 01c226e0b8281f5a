"""Progress of long work: rich bars on a terminal, plain timed lines in a log; silent when no console
is given (library use)."""

from __future__ import annotations

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

        def line(final: bool = False) -> None:
            done, elapsed = state["done"], time.monotonic() - t0
            text = f"{description}: {done}/{total} {unit}".rstrip()
            if not final and total:
                text += f" ({100 * done / total:.0f}%)"
            status = _fields(state["fields"])
            text += (f", {status}" if status else "") + f", {_clock(elapsed)} elapsed"
            if final:
                text += " (done)" if done >= total else " (stopped)"
            elif 0 < done < total:
                text += f", ETA {_clock(elapsed / done * (total - done))}"
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


def _fields(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
