"""Rich progress bars and messages for long work; silent when no console is given (library use)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class Reporter:
    def __init__(self, console: Console | None = None):
        self.console = console

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)

    @contextmanager
    def task(self, description: str, total: int, unit: str = "") -> Iterator[Callable[..., None]]:
        """Yield `update(advance=1, **fields)`; the bar shows step/total, loss (if given) and ETA."""
        if self.console is None:
            yield lambda advance=1, **fields: None
            return
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False, refresh_per_second=4,  # steps take ~1 s: 4 Hz is smooth
        ) as bar:
            tid = bar.add_task(description, total=total, status="")

            def update(advance: int = 1, **fields) -> None:
                status = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
                bar.update(tid, advance=advance, status=status)

            yield update
