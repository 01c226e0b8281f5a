"""What the dashboard shows, read from a workspace: plain JSON-able data, no web framework here
(tested on its own; app.py only serves it).

Everything is read, nothing written: the store is opened with create=False and Optuna's storage only
when its file exists. Each poll reads the light columns of the runs (never their samples), the curves
of the runs asked for, and each sweep study's trials."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.environment import placement_text
from loralab.workspace.status import Status
from loralab.workspace.store import DONE, RunRecord, Store, shown
from loralab.naming import trial_name

MAX_COMPARED = 8  # runs in "Main differences" beside the base: more columns would not read on a page
MAX_CURVE_POINTS = 400  # a curve is thinned to this many points before it is sent


@dataclass
class Dashboard:
    """One workspace, opened once per server; its reads are cheap enough to run every poll. It owns its
    store: `with Dashboard(root) as dash:`, or close() when the server shuts down."""

    root: Path | str  # a folder, or a PostgreSQL URL
    store: Store = field(init=False)
    _studies: Any = field(default=None, init=False)  # the Optuna storage, opened once it exists
    _compared: dict = field(default_factory=dict, init=False)  # (experiment, newest update) -> rows

    def __post_init__(self) -> None:
        self.store = Store(self.root, create=False)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Dashboard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the page's data --------------------------------------------------------------------------

    def state(self, experiment: str | None = None) -> dict[str, Any]:
        runs = self.runs()
        experiments = sorted({r["experiment"] for r in runs})
        if experiment not in experiments:
            experiment = runs[0]["experiment"] if runs else None  # the newest experiment's
        try:
            sweeps, sweep_error = self.sweeps(), None
        except Exception as err:  # a damaged optuna.db: the runs are still worth showing (`ls` reads them too)
            self._studies = None  # opened again on the next poll, in case it was being written
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            sweeps, sweep_error = [], f"the sweep study could not be read ({first})"
        return {"workspace": shown(self.root), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "experiments": experiments, "experiment": experiment, "runs": runs,
                "sweeps": sweeps, "sweep_error": sweep_error, "compare": self.compare(experiment, runs)}

    def runs(self) -> list[dict[str, Any]]:
        """Every named run, newest first, with its progress if it is training."""
        out = []
        records = self.store.list(light=True)  # no samples: polled every few seconds
        last = self.store.last_steps([r.id for r in records if r.status == Status.RUNNING])
        for r in records:
            row = {"experiment": r.experiment, "name": r.name, "seed": r.seed, "id": r.id, "kind": r.kind,
                   "status": r.status, "updated": r.updated_at, "eval_loss": _num(r.metrics.get("eval_loss")),
                   "step": None, "planned": None, "loss": None, "eta_s": None, "host": placement_text(r.env)}
            if r.status == Status.RUNNING:
                if not self.store.in_progress(r.id):  # its process is gone (killed), as `loralab ls` says too
                    row["status"], row["gone"] = Status.INTERRUPTED, True
                step = last.get(r.id)
                if step is not None:
                    done, planned = step["step"], step["total"]
                    row.update(step=done, planned=planned, loss=_num(step["loss"]))
                    if planned and done and row["status"] == Status.RUNNING:
                        row["eta_s"] = round((step["seconds"] or 0.0) / done * (planned - done), 1)
            elif r.status in DONE:
                row["step"] = _num(r.metrics.get("steps"))
                row["planned"] = _num(r.metrics.get("planned_steps"))
            out.append(row)
        return out

    def curves(self, ids: list[str]) -> dict[str, dict[str, list]]:
        """Loss curves (step, loss) by run id, thinned for the page."""
        out = {}
        for rid in ids[:20]:
            c = self.store.live_curve(rid)
            if c.get("step"):
                keep = _thin(len(c["step"]), MAX_CURVE_POINTS)
                out[rid] = {"step": [c["step"][i] for i in keep], "loss": [_num(c["loss"][i]) for i in keep]}
        return out

    def compare(self, experiment: str | None, runs: list[dict]) -> dict[str, Any] | None:
        """The experiment's "Main differences" table as rows of text (cached until one of its runs changes)."""
        from loralab.analysis.comparison import compare, to_rows

        mine = [r for r in runs if r["experiment"] == experiment]
        if not mine:
            return None
        key = (experiment, max(r["updated"] for r in mine), len(mine))
        if key not in self._compared:
            records = [r for r in self.store.list(experiment) if r.status in DONE and not r.damaged]
            groups: dict[str, list[RunRecord]] = {}
            for r in records:
                groups.setdefault(r.name, []).append(r)
            # As `loralab run` prints it: base first, then the runs in the order they were first trained
            # (the file's), each run's seeds in order, so the reference column and the verdicts are the CLI's.
            for g in groups.values():
                g.sort(key=lambda r: (r.seed is None, r.seed or 0))
            # created_at has whole seconds: runs started within one second keep the order they were stored in
            # (the list is newest first, so a higher position is older)
            position = {id(r): i for i, r in enumerate(records)}
            ordered = sorted(groups.values(), key=lambda g: (min(r.created_at for r in g), -max(position[id(r)] for r in g)))
            base = [g for g in ordered if g[0].kind == "base"]
            rest = [g for g in ordered if g[0].kind != "base"][-MAX_COMPARED:]  # the newest, in file order
            chosen = base[:1] + rest
            if not chosen:
                self._compared = {key: None}
            else:
                ev = chosen[-1][0].config.get("evaluation") or {}
                head, rows, legend = to_rows(compare(chosen, level=ev.get("confidence", 0.95), floors=ev.get("min_effect")))
                left = len(groups) - len(chosen)
                self._compared = {key: {"head": head, "rows": rows, "legend": legend,
                                        "left_out": f"{left} older runs not shown" if left > 0 else ""}}
        return self._compared[key]

    def sweeps(self) -> list[dict[str, Any]]:
        """Each sweep's progress from its Optuna study in the workspace (optuna.db)."""
        storage = self._storage()
        if storage is None:
            return []
        import optuna

        out = []
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            out.append(sweep_progress(summary.study_name, study.get_trials(deepcopy=False), study.directions,
                                      study.user_attrs.get("loralab_budget") or {}))
        return out

    def _storage(self):
        if self._studies is None:
            url = self.store.study_url()
            if url is not None:
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                self._studies = optuna.storages.RDBStorage(url)
        return self._studies


def sweep_progress(name: str, trials: list, directions: list, budget: dict) -> dict[str, Any]:
    """Done / pruned / running / failed trials, the best so far, the budget left and an ETA.

    The ETA is the mean counted trial's duration times the trials the budget (or the time budget)
    still allows, shared among the trials running now; unknown without a trial or a budget."""
    from optuna.trial import TrialState

    from loralab.config.schema import cost_of
    from loralab.sweep.study import counts_in_budget, spent_in_budget

    by = {s: [t for t in trials if t.state == s] for s in TrialState}
    counted = [t for t in trials if counts_in_budget(t)]
    spent = spent_in_budget(counted)
    best = None
    if len(directions) == 1 and by[TrialState.COMPLETE]:
        pick = min if directions[0].name == "MINIMIZE" else max
        t = pick(by[TrialState.COMPLETE], key=lambda t: t.value)
        best = {"trial": trial_name(t.number), "value": _num(t.value), "params": {k: str(v) for k, v in t.params.items()}}
    running = len(by[TrialState.RUNNING])
    left: dict[str, Any] = {}
    if budget.get("trials") is not None:
        left["trials"] = max(budget["trials"] - len(counted) - running, 0)
    if budget.get("minutes") is not None:
        left["minutes"] = round(max(budget["minutes"] - spent / 60, 0.0), 2)
    if budget.get("money") is not None and budget.get("per_hour"):
        left["money"] = round(max(budget["money"] - cost_of(spent, budget["per_hour"]), 0.0), 4)
    eta = None
    per_trial = spent / len(counted) if counted else None
    if per_trial and left:
        seconds = []
        if "trials" in left:
            seconds.append(per_trial * (left["trials"] + running) / max(running, 1))
        if "minutes" in left:
            seconds.append(left["minutes"] * 60)
        eta = round(min(seconds), 1) if seconds else None
    # Failed as `loralab sweep` counts it: trials that failed on their own; a trial whose process was
    # killed (Optuna's FAIL too) is interrupted, and its configuration runs again.
    failed = sum(t.user_attrs.get("status") == Status.FAILED for t in counted)
    interrupted = sum(t.state == TrialState.FAIL and t.user_attrs.get("status") == Status.INTERRUPTED for t in trials)
    return {"name": name, "done": len(by[TrialState.COMPLETE]), "pruned": len(by[TrialState.PRUNED]),
            "running": running, "failed": failed, "interrupted": interrupted, "trials": len(trials), "best": best,
            "direction": directions[0].name.lower() if len(directions) == 1 else "multi",
            "budget": budget, "left": left, "spent_s": round(spent, 1), "eta_s": eta}


def _thin(n: int, most: int) -> list[int]:
    """Indices of at most `most` evenly spread points, the last one always kept."""
    if n <= most:
        return list(range(n))
    step = n / most
    return sorted({int(i * step) for i in range(most)} | {n - 1})


def _num(x: Any) -> Any:
    return None if isinstance(x, float) and (math.isnan(x) or math.isinf(x)) else x
