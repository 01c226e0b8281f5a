"""The trackers of one run, as one training step hook: opened when the run starts, fed the steps in
batches, closed with what the workspace stored."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from loralab.engine.curve import CURVE_KEYS
from loralab.track.base import REGISTRY, RunInfo, Tracker, flatten, numbers
from loralab.workspace.status import Status

# Steps go out in batches, at most one every FLUSH_S seconds and at the end, so a tracker costs a request
# per batch rather than per step (MLflow: one log_batch), far below 1% of a run.
FLUSH_S = 10.0


class Tracking:
    """A step hook (engine.train.StepHook) that copies one run to its trackers. Never stops training:
    a tracker that raises (its server down, its disk full) is named once in the log and left out of
    the rest of the run, which goes on and is stored as usual."""

    def __init__(self, trackers: dict[str, Tracker], info: RunInfo, params: dict[str, Any],
                 log: Callable[[str], None] = print, flush_s: float | None = None):
        self.live, self.info, self.log = dict(trackers), info, log
        self.flush_s = FLUSH_S if flush_s is None else flush_s
        self.rows: list[dict[str, float]] = []
        self.sent = 0  # the last step sent
        self.last = time.monotonic()
        self._call("start", info, flatten(params))

    def _call(self, method: str, *args) -> None:
        from rich.markup import escape

        for name, tracker in list(self.live.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # a copy failing must not cost the run
                del self.live[name]
                self.log(f"[yellow]{name}: tracking of {escape(self.info.name)} stopped at {method} "
                         f"({escape(type(err).__name__)}: {escape(str(err)[:300])}); the run goes on and is stored "
                         f"in the workspace[/yellow]")

    def after_step(self, step) -> None:
        self.rows.append(step.row())
        if time.monotonic() - self.last >= self.flush_s:
            self.flush()
        return None

    def flush(self) -> None:
        if self.rows:
            self._call("log_steps", self.rows)
            self.sent = self.rows[-1]["step"]
            self.rows = []
        self.last = time.monotonic()

    def close_stored(self, store, rid: str) -> None:
        """close() with the run as the workspace holds it (None when it cannot be read)."""
        try:
            record = store.get(rid)
        except Exception:
            record = None
        self.close(record)

    def close(self, record) -> None:
        """Send what is left and finish each tracker run with the stored record (workspace.RunRecord,
        or None if the run never reached the store). Steps this hook did not see come from the stored
        curve: the step at which another hook stopped training (hooks after it are not called), or all
        of them when the training was taken from a stored adapter."""
        self.flush()
        if record is None:
            self._call("finish", {}, Status.FAILED, None)
            return
        rows = [r for r in curve_rows(record.curves or {}) if r["step"] > self.sent]
        if rows:
            self._call("log_steps", rows)
        adapter = Path(record.adapter_path) if record.adapter_path and record.status == Status.FINISHED else None
        self._call("finish", numbers(record.metrics or {}), record.status, adapter)


def curve_rows(curves: dict[str, Any]) -> list[dict[str, float]]:
    """A stored curve (lists per key) as step rows."""
    steps = curves.get("step") or []
    cols = {k: curves[k] for k in CURVE_KEYS if isinstance(curves.get(k), list) and len(curves[k]) == len(steps)}
    return [{k: v[i] for k, v in cols.items()} for i in range(len(steps))]


def trial_number(exp, run_name: str) -> int | None:
    """A sweep trial's Optuna number, from its run name (naming: trial-NNNN, and its confirmation's)."""
    from loralab.naming import trial_number as number

    return number(run_name) if exp.sweep is not None else None


def open_tracking(exp, run: str, seed: int | None, run_id: str, experiment: str, workspace: Path,
                  params: dict[str, Any], log: Callable[[str], None]) -> Tracking | None:
    """The Tracking of one run (`seed` None: the untrained base) for the file's `track:` trackers,
    started; None when the file names none."""
    names = exp.track.names
    if not names:
        return None
    # The trackers are registered: importing this module ran loralab/track/__init__.py first.
    info = RunInfo(run, seed, run_id, experiment, Path(workspace), trial_number(exp, run))
    trackers = {n: REGISTRY[n].make(getattr(exp.track, n)) for n in names}
    tags = {"run": run, "run_id": run_id, "experiment": experiment}
    tags.update({k: v for k, v in (("seed", seed), ("trial", info.trial)) if v is not None})
    return Tracking(trackers, info, {**tags, **params}, log)


def track_stored(exp, run: str, run_id: str, experiment: str, workspace: Path, params: dict[str, Any], store,
                 log: Callable[[str], None]) -> None:
    """Copy a stored run that trained nothing (the untrained base) to the file's trackers in one go."""
    tracking = open_tracking(exp, run, None, run_id, experiment, workspace, params, log)
    if tracking is not None:
        tracking.close_stored(store, run_id)
