"""A run's own step hooks for its training (engine.train calls each one's after_step): the progress bar,
and the curve streamed to the workspace as it grows."""

from __future__ import annotations

import time

from loralab.workspace.store import Store


class _Progress:
    """A training step hook: the progress bar, and the step an error would strike after."""

    def __init__(self, reached: dict, update):
        self.reached, self.update = reached, update

    def after_step(self, step) -> None:
        self.reached["step"] = step.step
        self.update(loss=step.loss)


class CurveWriter:
    """A training step hook that streams the curve to the workspace (Store.append_steps) while the run
    trains: the first step at once, then a batch every `every_s` seconds, so a watcher sees it grow, a
    crash loses at most the last batch, and the writes (one transaction each) cost far below 1% of
    training (BENCHMARKS.md). A write that fails (disk full) is dropped, not fatal: the run's result is
    stored, or refused, on its own terms."""

    def __init__(self, store: Store, run_id: str, every_s: float = 5.0):
        self.store, self.run_id, self.every_s = store, run_id, every_s
        self.pending: list[dict] = []
        self.last = None  # when the last batch was written
        self.broken = False

    def after_step(self, step) -> None:
        self.pending.append({**step.row(), "total": step.total})
        if self.last is None or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.last = time.monotonic()
        if batch and not self.broken:
            try:
                self.store.append_steps(self.run_id, batch)
            except Exception:  # the curve is a by-product: never the reason a run is lost
                self.broken = True
