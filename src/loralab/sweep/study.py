"""Sweeps: an Optuna search over lora/train/generate knobs that stops bad trials early and respects a budget.

One trial is one configuration, trained once per seed (`repeats`) as ordinary runs of the workspace,
so finished runs with the same resolved config are reused, and `loralab show/compare` read trials
like any run. The study lives in an Optuna RDB storage (`optuna.db` in a folder workspace, the same
database in a PostgreSQL one, unless `sweep.storage` names another), so Optuna's own API and
dashboard can inspect it, and running the same command again after a crash, Ctrl-C or kill -9
continues it:

- trials that finished or were pruned are kept and counted against the budget once;
- a trial left RUNNING by a dead process is marked FAIL (user attr status=interrupted, not counted)
  and its parameters are enqueued, so the same configuration runs next.

Several sweep processes, on one host or many, may share a study: each trial records its owner process
(host, pid, start time) and, on a database server, beats (Optuna's heartbeat); only trials whose owner
is gone (its pid, on this host) or silent (its heartbeat, any host) are recovered; and the next trial
is picked under a workspace lock, counting every worker's running trials against budget.trials, so
two processes never take the same grid point nor pass the budget (see docs/reliability.md).

Pruning judges trials by held-out loss every `pruner.every` steps, whatever the objective: it is the
one signal available mid-training. A pruned run is stored with status `pruned`, its eval loss at the
stop, and the steps (and estimated seconds) it did not spend.
"""

from __future__ import annotations

import math
import statistics
from datetime import datetime
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from loralab.errors import Problem, SpecError
from loralab.execute.jobs import Executor, ExecutorFactory, Job, Pruning
from loralab.sweep import _optuna
from loralab.sweep.pruning import make_pruner
from loralab.sweep.warm import warm_start
from loralab.progress import Reporter
from loralab.config.space import (Space, _budget_text, edges, experiment_start, is_grid, make_run, needs_full_eval,
                                  needs_probe, objective_key, objective_value, prior_lines, sampler_class_name)
from loralab.config.schema import Experiment, ObjectiveSpec, PrunerSpec, RunSpec, SweepSpec, config_hash, cost_of
from loralab.naming import confirm_name, trial_name
from loralab.workspace.status import Status


# ---------------------------------------------------------------------------------------------
# One trial: a configuration, trained once per seed


@dataclass
class TrialRuns:
    """What one configuration's runs came to; a plain function result a remote worker can return."""

    status: str  # finished | pruned | diverged | failed
    run_ids: list[str]
    values: list[float] | None  # the objectives, each a mean over seeds (finished only)
    reused: int  # runs taken from the store instead of trained
    steps: int = 0  # of the first seed: where it stopped
    planned_steps: int = 0
    saved_steps: int = 0
    saved_s: float = 0.0
    error: str | None = None
    rung_loss: float | None = None  # paused (sweep.halving): the held-out loss at the pause


def run_trial(prepared, exp: Experiment, knobs: dict[str, Any], store, *, name: str, executor=None,
              pruning: Pruning | None = None, reporter: Reporter | None = None, pause_at: int | None = None) -> TrialRuns:
    """Train, evaluate and store one configuration once per seed, each seed a job for `executor`
    (default: execute.local.LocalExecutor on `prepared` and `store`); execute.plan.trial_jobs makes the jobs.

    `pruning` names the Optuna trial the first seed's intermediate eval loss is reported to; a pruned,
    diverged or failed first seed ends the configuration there. `pause_at` (synchronous successive
    halving, sweep.halving): the first seed trains to that step and stops with a checkpoint; the result is
    `paused` with the held-out loss there (`rung_loss`), and a later call without it continues the run."""
    from loralab.engine.models import resolve_target_modules
    from loralab.execute.local import LocalExecutor
    from loralab.execute.plan import trial_jobs

    rep = reporter or Reporter()
    try:
        run = make_run(experiment_start(exp), knobs, name)
        resolve_target_modules(prepared.layers or prepared.base.model, run.lora.target_modules,
                               where=f"sweep: {name}.lora.target_modules")
    except (ValidationError, SpecError, ValueError) as err:  # a point the file check could not foresee
        return TrialRuns(Status.FAILED, [], None, 0, error=f"invalid trial config: {err}")
    executor = executor or LocalExecutor(prepared, store, rep)
    pruner = exp.sweep.resolved_pruner if exp.sweep else PrunerSpec(name="none")
    ids, records, reused = [], [], 0
    seeds = exp.seeds_for(run)
    full, probe = needs_full_eval(exp.sweep), needs_probe(exp.sweep)
    for i, job in enumerate(trial_jobs(exp, run, name, full_eval=full, probe=probe, pause_at=pause_at,
                                       pruning=pruning if pruner.name != "none" else None)):
        paused = _paused_at(prepared, job, store) if pause_at is not None and i == 0 else None
        if paused is not None:  # paused there before (a sweep resumed after a crash): its loss is known
            return paused
        out = executor.run(job)
        status = out.status
        ids.append(out.run_id)
        records.append(store.get(out.run_id))
        reused += out.reused
        if status == Status.PRUNED and pause_at is not None and i == 0:
            return _paused_at(prepared, job, store) or TrialRuns(Status.FAILED, ids, None, reused, error="paused without a checkpoint")
        if status != Status.FINISHED:
            break
    first = records[0].metrics
    # A trial stopped early (pruned, diverged) also skips its other seeds: their whole training is saved too.
    skipped, planned = len(seeds) - len(records), int(first.get("planned_steps", 0))
    per_step = float(first.get("train_s", 0.0)) / first["steps"] if first.get("steps") else 0.0
    out = TrialRuns(status, ids, None, reused, steps=int(first.get("steps", 0)), planned_steps=planned,
                    saved_steps=int(first.get("saved_steps", 0)) + skipped * planned,
                    saved_s=float(first.get("saved_s", 0.0)) + round(skipped * planned * per_step, 2), error=records[-1].error)
    if status == Status.FINISHED:
        objectives = exp.sweep.objective if exp.sweep else [ObjectiveSpec()]
        out.values = [statistics.fmean(objective_value(r.metrics, o, run) for r in records) for o in objectives]
    return out


def _paused_at(prepared, job: Job, store) -> TrialRuns | None:
    """The first seed's run as paused at `job.pause_at` (stored `pruned` there, with its checkpoint), else None."""
    from loralab.execute.checkpoint import Checkpoints
    from loralab.execute.identity import adapter_id, run_id

    rid = run_id(prepared, job.run, job.full_eval, job.probe)
    rec = store.get(rid)
    if rec is None or rec.status != Status.PRUNED or rec.metrics.get("pruned_step") != job.pause_at:
        return None
    parked = getattr(prepared, "parked", {}).get(rid)  # kept in memory (execute.parking.park), else on disk
    found = parked.state["step"] if parked is not None else \
        getattr(Checkpoints(store.run_dir(rid), adapter_id(prepared, job.run)).latest(), "step", None)
    if found != job.pause_at:
        return None
    m = rec.metrics
    return TrialRuns("paused", [rid], None, 0, steps=int(m.get("steps", 0)), planned_steps=int(m.get("planned_steps", 0)),
                     rung_loss=float(m["pruned_loss"]))


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class TrialSummary:
    """One trial of the study as stored in Optuna (params resolved to knob values)."""

    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    status: str  # loralab's: finished, pruned, diverged, failed, interrupted, running, waiting
    knobs: dict[str, Any]
    values: list[float] | None
    run_ids: list[str]
    spent_s: float
    saved_steps: int
    saved_s: float

    @classmethod
    def from_frozen(cls, t, space: Space) -> "TrialSummary":
        ua = t.user_attrs
        knobs = ua.get("knobs")
        if knobs is None:
            try:
                knobs = space.knobs(t.params)
            except KeyError:
                knobs = dict(t.params)
        return cls(t.number, t.state.name, ua.get("status", t.state.name.lower()), knobs,
                   list(t.values) if t.values is not None else None, list(ua.get("run_ids", [])),
                   float(ua.get("spent_s", 0.0)), int(ua.get("saved_steps", 0)), float(ua.get("saved_s", 0.0)))


@dataclass
class DryRun:
    """What --dry-run prints: the trials (a grid's full expansion) and the estimated time."""

    strategy: str
    points: list[dict[str, Any]] | None  # the grid, knob values resolved; None for other strategies
    trials: int | None  # how many the sweep would run (grid size, capped by budget.trials)
    seeds: int
    train_tokens: list[int]  # per trial (grid) or [at the start settings]
    tokens_per_s: float
    throughput_from: str
    eval_s: float | None
    per_trial_s: list[float]
    total_s: float | None
    budget: dict[str, Any]
    lines: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    workspace: Path
    study_name: str
    storage: str
    trials: list[TrialSummary] = field(default_factory=list)  # every trial of the study, by number
    ran: list[int] = field(default_factory=list)  # trial numbers this call ran
    best: list[TrialSummary] = field(default_factory=list)  # the best trial, or the Pareto set
    stopped: str = ""  # why the sweep ended
    spent_s: float = 0.0  # trials counted against the budget, this and earlier sessions
    saved_steps: int = 0
    saved_s: float = 0.0
    cost: float | None = None
    plan: DryRun | None = None
    close_to_best: list[int] = field(default_factory=list)  # finished trials within noise of the best
    # sweep.confirm: trial number -> {seeds, run_ids, status, spent_s, searched, value, lo, hi}
    confirmed: dict[int, dict] = field(default_factory=dict)
    confirm_s: float = 0.0  # seconds the confirmation trained this call (not in the budget: it comes after)


def counts_in_budget(t) -> bool:
    """Trials the budget counts: completed, pruned, or failed on their own (not interrupted)."""
    from optuna.trial import TrialState

    if t.user_attrs.get("from_workspace"):  # measured before the sweep (sweep.warm): counts for the search only
        return False
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and t.user_attrs.get("status") == Status.FAILED)


def spent_in_budget(counted: list) -> float:
    """The seconds the budget's trials (counts_in_budget) spent, as each recorded it: what time and money
    budgets are measured against (the sweep, and what the dashboard shows left)."""
    return sum(float(t.user_attrs.get("spent_s", 0.0)) for t in counted)


def budget_reason(trials: list, sweep: SweepSpec, per_hour: float | None, in_flight: int = 0) -> str | None:
    """Why no further trial may start, or None while the budget lasts. `in_flight` trials count against
    budget.trials (they will be counted once done), and against time and money at the mean cost of the
    trials counted so far (theirs is known only when they end): N workers then stop where one would,
    not N−1 trials later."""
    done = [t for t in trials if counts_in_budget(t)]
    spent = spent_in_budget(done)
    b = sweep.budget
    if b.trials is not None and len(done) + in_flight >= b.trials:
        return f"budget of {b.trials} trials reached"
    expected = spent + (in_flight * spent / len(done) if done else 0.0)
    ahead = f", {in_flight} trial(s) still running" if expected > spent else ""
    if b.minutes is not None and expected >= b.minutes * 60:
        return f"time budget of {b.minutes:g} min reached ({spent / 60:.2f} min spent{ahead})"
    if b.money is not None and per_hour is not None and cost_of(expected, per_hour) >= b.money:
        return f"money budget of {b.money:g} reached ({cost_of(spent, per_hour):.4f} spent{ahead})"
    return None


def storage_url(exp: Experiment, ws: Path | str) -> str:
    """The study's SQLAlchemy URL: sweep.storage, else the workspace's own database (optuna.db in a
    folder; the same PostgreSQL database as the runs for a database workspace)."""
    from loralab.workspace.store import default_study_url, engine_url

    if exp.sweep and exp.sweep.storage:
        from loralab.config.space import storage_location

        return engine_url(storage_location(exp.sweep.storage, exp.base_dir))
    return default_study_url(ws)


# Trials on a database server (many hosts) beat every HEARTBEAT_S seconds; one silent for GRACE_S is
# failed and its configuration runs again (see recover_interrupted). LORALAB_HEARTBEAT=INTERVAL[,GRACE]
# (whole seconds) changes both: tests use 1,3 to see a dead worker within seconds.
HEARTBEAT_S, GRACE_S = 20, 60
HEARTBEAT_ENV = "LORALAB_HEARTBEAT"


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds, from LORALAB_HEARTBEAT or the defaults."""
    import os

    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_S, GRACE_S
    try:
        parts = [int(x) for x in raw.split(",")]
        interval = parts[0]
        grace = parts[1] if len(parts) > 1 else 3 * interval
        if interval < 1 or grace <= interval or len(parts) > 2:
            raise ValueError
    except ValueError:
        raise SpecError(f"{HEARTBEAT_ENV}={raw!r} is not INTERVAL[,GRACE] in whole seconds",
                        [Problem(HEARTBEAT_ENV, "not INTERVAL[,GRACE] with 1 <= INTERVAL < GRACE", raw,
                                 f"e.g. {HEARTBEAT_S},{GRACE_S}, or unset it")]) from None
    return interval, grace


class _KeptHeartbeat(threading.Thread):
    """Optuna's heartbeat thread, kept beating through a database restart or a network cut: Optuna's own
    (storages._heartbeat.HeartbeatThread) ends at the first failed write, and the live trial then looks dead
    to every other host, which trains it a second time. A failed beat is counted and tried again."""

    def __init__(self, trial_id: int, storage):
        super().__init__(daemon=True, name="loralab-heartbeat")
        self.trial_id, self.storage = trial_id, storage
        self.interval = storage.get_heartbeat_interval()
        self.done = threading.Event()
        self.failures = 0

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception:  # the server is away: the next beat tries again (pool_pre_ping reconnects)
            self.failures += 1

    def __enter__(self) -> "_KeptHeartbeat":
        self._beat()  # the first beat before the work starts, as Optuna's thread does
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self._beat()


def _retrying_storage(url: str, **kw):
    """Optuna's RDBStorage whose calls wait for a database server that went away (a restart, a network cut)
    as the workspace's store does (workspace.store.with_db_retries), instead of failing the sweep at once."""
    import functools
    import inspect

    import optuna
    from optuna.exceptions import StorageInternalError

    from loralab.workspace.store import shown, unreachable, with_db_retries

    def transient(err: BaseException) -> bool:  # Optuna wraps SQLAlchemy's error in its own
        return unreachable(err) or (isinstance(err, StorageInternalError) and unreachable(err.__cause__))

    def retried(fn):
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            return with_db_retries(lambda: fn(self, *args, **kwargs), shown(url), transient)
        return call

    skip = {"remove_session", "upgrade", "get_current_version", "get_head_version", "get_all_versions",
            "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback"}
    names = [n for n, v in vars(optuna.storages.RDBStorage).items() if inspect.isfunction(v) and not n.startswith("__")
             and (not n.startswith("_") or n in _optuna.RETRIED_PRIVATE_METHODS) and n not in skip]
    cls = type("RetryingRDBStorage", (optuna.storages.RDBStorage,),
               {n: retried(getattr(optuna.storages.RDBStorage, n)) for n in names})
    return cls(url, **kw)


def kept_heartbeat(trial_id: int, storage):
    """The trial's heartbeat as a context manager: _KeptHeartbeat on a storage with heartbeat, else nothing."""
    from contextlib import nullcontext

    return _KeptHeartbeat(trial_id, storage) if _optuna.heartbeat_enabled(storage) else nullcontext()


def study_storage(url: str):
    """Optuna's storage for the study. A server database gets Optuna's heartbeat: a trial whose worker
    (process or host) stops beating for the grace period is taken for dead (_Loop.recover). A local
    SQLite file does not: its processes are all on this machine and judged by process id."""
    from sqlalchemy.exc import DatabaseError

    optuna = _optuna.checked()  # an unsupported Optuna is refused before a study is touched

    kw = {}
    if not url.startswith("sqlite"):
        interval, grace = heartbeat_settings()
        # pool_pre_ping: a connection the server dropped (a restart) is replaced, not used and failed
        kw = {"heartbeat_interval": interval, "grace_period": grace, "engine_kwargs": {"pool_pre_ping": True}}
    # Optuna creates its tables when they are missing: a check, then CREATE TABLE. Another process doing
    # the same at that moment (a second host's sweep, `loralab report`, optuna-dashboard) makes one of the
    # two creates fail on a table the other just made; by the next try they all exist.
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _retrying_storage(url, **kw) if kw else optuna.storages.RDBStorage(url, **kw)
        except DatabaseError as err:
            text = str(getattr(err, "orig", err)).lower()
            if attempt == 2 or not ("already exists" in text or "duplicate key" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def _make_sampler(sweep: SweepSpec, space: Space):
    import optuna

    name = sampler_class_name(sweep.strategy)
    if name == "GridSampler":
        return _GridSampler(space.grid(), seed=sweep.seed)
    try:
        return getattr(optuna.samplers, name)(seed=sweep.seed)
    except ImportError as err:  # CmaEsSampler and friends need an optional package
        raise SpecError(f"sweep.strategy {sweep.strategy} needs a package that is not installed",
                        [Problem("sweep.strategy", str(err), sweep.strategy,
                                 "install it with pip, or use tpe or random")]) from None


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid, minus its `study.stop()` after the last point: that works only inside
        `study.optimize`, and the sweep's ask/tell loop checks `is_exhausted` itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

        def before_trial(self, study, trial) -> None:
            """Optuna gives trial k grid point k while k is below the grid's size, visited or not: with
            points added from the workspace (sweep.warm) that would repeat one. Trial k still gets point k
            when it is unvisited (so a fresh grid runs in the same order); else the first unvisited one."""
            if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
                return
            unvisited = sorted(_optuna.unvisited_grid_ids(self, study))
            if not unvisited or trial.number in unvisited:
                return super().before_trial(study, trial)
            _optuna.set_trial_attr(study, trial, "search_space", _optuna.grid_search_space(self), system=True)
            _optuna.set_trial_attr(study, trial, "grid_id", unvisited[0], system=True)

        def unstarted(self, study) -> bool:
            """Whether a grid point is neither done nor being run (by this or another process)."""
            from optuna.trial import TrialState

            trials = _optuna.all_trials(study)
            taken = {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs
                     and (t.state.is_finished() or t.state == TrialState.RUNNING)}
            return len(taken) < len(_optuna.grid_points(self))

        def point(self, grid_id: int) -> dict:
            """The parameters of a grid id (the grid as the parent class shuffled it)."""
            return dict(zip(_optuna.grid_param_names(self), _optuna.grid_points(self)[grid_id]))

        def grid_attrs(self, params: dict) -> dict | None:
            """The system attributes that mark a trial added by hand (sweep.warm) as this grid point's,
            so the grid counts it as visited; None when the parameters are no point of the grid."""
            grid_id = next((i for i in range(len(_optuna.grid_points(self))) if self.point(i) == params), None)
            return None if grid_id is None else {"grid_id": grid_id, "search_space": _optuna.grid_search_space(self)}

    return GridSampler


def _GridSampler(search_space: dict, seed: int):
    return _grid_sampler_class()(search_space, seed=seed)


def open_study(exp: Experiment, url: str, space: Space, fingerprint: str, storage=None, restart=None):
    """Create or load the experiment's study (in `storage`, default the URL itself). One made by a
    different sweep section (another space, strategy, objective, seeds...) is started anew when
    `restart(old_study)` agrees (no live process runs it); the workspace's runs then bring back every
    point still inside the new space (sweep.warm). Without `restart`, or when it refuses: an error."""
    import optuna

    sw = exp.sweep
    study = optuna.create_study(storage=storage or url, sampler=_make_sampler(sw, space),
                                pruner=make_pruner(sw.resolved_pruner), study_name=exp.name, directions=sw.directions,
                                load_if_exists=True)
    done = len(study.get_trials(deepcopy=False))
    if done and not is_grid(sw):  # resumed: a sampler seeded as before would first propose the points it began with
        study.sampler = _make_sampler(sw.model_copy(update={"seed": (sw.seed + done) % 2**31}), space)
    budget = {**sw.budget.model_dump(exclude_none=True), "per_hour": exp.cost.per_hour if exp.cost else None}
    if study.user_attrs.get("loralab_budget") != budget:  # what `loralab dashboard` shows as left (a resumed sweep may raise it)
        study.set_user_attr("loralab_budget", budget)
    had = study.user_attrs.get("loralab_sweep")
    if had is None:
        study.set_user_attr("loralab_sweep", fingerprint)
    elif had != fingerprint:
        from loralab.workspace.store import shown

        if restart is not None and restart(study):
            optuna.delete_study(study_name=exp.name, storage=storage or url)
            return open_study(exp, url, space, fingerprint, storage)
        if restart is not None:
            raise SpecError(f"study {exp.name!r} in {shown(url)} was made by a different sweep section, and another "
                            "process is running it", [Problem("sweep", "changed while another process runs the sweep",
                                                              exp.name, "wait for it (or stop it), then run again")])
        raise SpecError(f"study {exp.name!r} in {shown(url)} was made by a different sweep (space, strategy, objective, "
                        "seeds, model or data changed); its trials would not mean the same thing",
                        [Problem("sweep", "changed since the study began", exp.name,
                                 "give the experiment another `name:`, or use another workspace or sweep.storage")])
    return study


def recover_interrupted(study, space: Space, rep: Reporter, alive: Callable[[Any], bool] | None = None,
                        forget: Callable[[int], None] | None = None) -> list[int]:
    """Trials left RUNNING by a process that died: mark them FAIL (status interrupted, not counted)
    and enqueue their parameters, once, so the same configuration runs next. `alive(trial)` tells a
    trial another sweep process is still running (left alone) from a dead one; None: all are dead.

    A process killed between `ask` and the last `suggest` leaves some parameters unset: a grid trial
    still knows its grid point (the grid counts it as visited, so it must be re-enqueued); any other
    strategy just samples a new point. `forget(number)` drops the trial's run names, so a FAIL trial
    never names a run its retry finishes."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if alive is not None and alive(t):
            continue
        # Through the storage: optuna.Trial(study, id) would run the sampler's before_trial, and a
        # grid trial killed before it got its grid point would then take (and waste) one.
        def set_attr(key: str, value: Any, t=t) -> None:
            _optuna.set_trial_attr(study, t, key, value)

        params = t.system_attrs.get("fixed_params") or dict(t.params)
        if len(params) < len(space.dims):
            point = getattr(study.sampler, "point", None)
            params = point(t.system_attrs["grid_id"]) if point and "grid_id" in t.system_attrs else None
        if params is not None:
            if t.number not in retried:
                study.enqueue_trial(dict(params), user_attrs={"retry_of": t.number})
            set_attr("knobs", space.knobs(params))
        set_attr("status", Status.INTERRUPTED)
        study.tell(t.number, state=TrialState.FAIL)
        if forget is not None:
            forget(t.number)
        out.append(t.number)
    if out:
        rep.log(f"Resuming: trial(s) {', '.join(map(str, out))} were interrupted; their configurations run again.")
    return out


# A sampler proposing only configurations already trained this many times in a row has run out of
# new ones (a small discrete space): the sweep stops instead of asking for ever.
MAX_REPEATED_PROPOSALS = 50


def duplicate_of(trials: list, knobs: dict[str, Any], alive: Callable[[Any], bool]) -> int | None:
    """The number of a trial that already has these knob values (finished, pruned, failed on its
    own, or running in a live process), or None. Every trial the budget counts is a new configuration:
    a resumed TPE sampler re-proposes its first points, and two processes may propose the same one."""
    from optuna.trial import TrialState

    for t in trials:
        if t.user_attrs.get("knobs") != knobs or t.user_attrs.get("status") == "duplicate":
            continue
        if counts_in_budget(t) or t.user_attrs.get("from_workspace") or (t.state == TrialState.RUNNING and alive(t)):
            return t.number
    return None


def _fmt(knobs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items())


def _values_text(sw: SweepSpec, values: list[float] | None) -> str:
    if values is None:
        return ""
    return ", ".join(f"{o.metric} {v:.4f}" for o, v in zip(sw.objective, values))


def run_sweep(exp: Experiment, *, workspace: str | Path | None = None, reporter: Reporter | None = None,
              dry_run: bool = False, executor: ExecutorFactory | None = None) -> SweepResult:
    """Search the file's `sweep:` space with Optuna within its budget; returns the whole study's
    trials, the best configuration(s), and the compute spent and saved by pruning.

    The base model is loaded once; each seed of each trial is a job for `executor(prepared, store,
    reporter)` (default execute.local.LocalExecutor: a fresh adapter trained, evaluated, stored and removed).
    Running it again continues the study (see the module docstring)."""
    import optuna

    from loralab.execute.prepare import open_workspace, prepare, resolve_workspace

    if exp.sweep is None:
        raise SpecError(f"{exp.source or 'experiment'}: no `sweep:` section",
                        [Problem("sweep", "missing", None, "add `sweep: {space: {lora.r: [4, 8]}, budget: {trials: 4}}`", False)])
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one progress line per trial is ours
    rep = reporter or Reporter()
    sw = exp.sweep
    space = Space(sw)
    prepared = prepare(exp, reporter=rep)  # everything checked before the workspace is touched
    ws = resolve_workspace(exp, workspace)
    url = storage_url(exp, ws)
    start = experiment_start(exp)
    fingerprint = config_hash({"space": {k: v.model_dump() for k, v in sw.space.items()}, "strategy": sw.strategy,
                               "seed": sw.seed, "start": start, "objective": [o.model_dump() for o in sw.objective],
                               "seeds": exp.seeds_for(make_run(start, {}, "start")), "model": prepared.base.fingerprint,
                               "data": prepared.dataset.fingerprint})
    if dry_run:
        plan = dry_run_plan(exp, prepared, ws, space)
        for line in plan.lines:
            rep.log(line)
        _dry_warm(exp, prepared, ws, space, url, rep, fingerprint)
        return SweepResult(ws, exp.name, url, plan=plan)
    store = open_workspace(exp, ws)
    from loralab.execute.local import LocalExecutor
    from loralab.workspace.store import shown

    result = SweepResult(ws, exp.name, shown(url))

    with store:
        loop = _Loop(exp, space, store, url, ws, rep, (executor or LocalExecutor)(prepared, store, rep))
        with loop.study_lock():
            loop.study = open_study(exp, url, space, fingerprint, study_storage(url), restart=loop.restart)
            loop.recover()
            warm_start(loop.study, exp, prepared, store, space, rep)
        rep.log(f"Sweep {exp.name!r}: strategy {sw.strategy}, {len(space.dims)} knob(s), study in {shown(url)}")
        result.stopped = loop.drive(prepared, result.ran)
        _finish(result, loop.study, space, sw, loop.per_hour, exp, rep)
        if result.best and len(sw.objective) == 1 and sw.confirm.top > 0:
            _confirm(result, loop.study, prepared, store, exp, loop.worker, rep)
        _announce(result, space, sw, exp, rep)
        loop.worker.close()
        result.close_to_best = _close_to_best(result, store, exp, rep)
        if len(sw.objective) == 1 and result.best:  # at an edge, and better than the trials inside it beyond noise
            others = [(t.knobs, t.number in result.close_to_best) for t in result.trials
                      if t.status == Status.FINISHED and t.number != result.best[0].number]
            at_edge = edges(space, result.best[0].knobs, others)
            if at_edge:
                rep.log("The best point sits at an edge of the space (" + "; ".join(at_edge) + "): the best may lie "
                        "outside it; widen the space there.")
    return result


def _dry_warm(exp: Experiment, prepared, ws, space: Space, url: str, rep: Reporter, fingerprint: str) -> None:
    """The dry run's line on points the workspace measured already (nothing written)."""
    import optuna

    from loralab.errors import RunNotFound
    from loralab.execute.prepare import open_workspace

    try:
        store = open_workspace(exp, ws, create=False)
    except RunNotFound:
        return
    with store:
        try:
            study = optuna.load_study(study_name=exp.name, storage=url)
        except Exception:  # no study yet (KeyError), or none readable: every measured point would be added
            study = None
        if study is None or study.user_attrs.get("loralab_sweep") != fingerprint:  # it would start anew
            study = optuna.create_study(storage=None, directions=exp.sweep.directions)
        warm_start(study, exp, prepared, store, space, rep, add=False)


class _Loop:
    """The sweep's ask -> execute -> tell loop, shared safely with other processes and hosts: proposals
    are made under a workspace lock (an advisory lock on PostgreSQL), a trial records its owner and,
    on a database server, beats (Optuna's heartbeat), and a trial left by a dead owner is recovered
    (run again), never taken over while its owner lives."""

    def __init__(self, exp: Experiment, space: Space, store, url: str, ws: Path, rep: Reporter, worker: Executor):
        from loralab.workspace.locks import process_identity

        self.exp, self.sw, self.space, self.store, self.url, self.ws, self.rep = exp, exp.sweep, space, store, url, ws, rep
        self.worker = worker  # every seed of every trial is a job for it
        self.owner = process_identity()
        self.study = None
        self.per_hour = exp.cost.per_hour if exp.cost else None
        self.sign = {"minimize": 1.0, "maximize": -1.0}[self.sw.directions[0]]  # pruners read the loss in the objective's sense
        self.repeats = 0  # proposals in a row that repeated a configuration already trained
        self.waited = False
        self.stale: set[int] = set()  # trial ids whose heartbeat stopped, as of the last recover()

    def alive(self, t) -> bool:
        """A trial's worker still works on it: its heartbeat (database server) is fresh, and, when it
        runs on this host, its process exists (known at once, without waiting for the grace period)."""
        return _optuna.worker_alive(t, self.stale)

    def recover(self) -> list[int]:
        """Under the study lock: run again the trials whose worker died (recover_interrupted)."""
        # Optuna's own test of a heartbeat older than the grace period (what its fail_stale_trials uses);
        # the failing itself is recover_interrupted's, which first records why (status interrupted).
        self.stale = _optuna.stale_trial_ids(self.study)
        return recover_interrupted(self.study, self.space, self.rep, self.alive, self.forget)

    def beat(self, trial):
        """A trial's heartbeat (a no-op without heartbeat): `with loop.beat(trial): ...` (see kept_heartbeat)."""
        return kept_heartbeat(_optuna.trial_id(trial), _optuna.storage(self.study))

    def restart(self, old) -> bool:
        """The sweep section changed since the study began: start anew unless a live process runs a trial."""
        from optuna.trial import TrialState

        if any(self.alive(t) for t in old.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            return False
        for t in old.get_trials(deepcopy=False):
            self.store.drop_aliases(self.exp.name, trial_name(t.number))
        self.rep.log("The sweep section changed since the study began: a new study, started from the runs the "
                     "workspace already has (points outside the new space are left out).")
        return True

    def forget(self, number: int) -> None:  # an interrupted trial names no run: its retry owns the configuration's run
        self.store.drop_aliases(self.exp.name, trial_name(number))

    def study_lock(self):
        """Creating the study, recovering and asking: one process at a time, of every host sharing the
        workspace (a file lock in a folder workspace, an advisory lock on PostgreSQL)."""
        return self.store.named_lock(f"study-{config_hash([self.url, self.exp.name])}")

    def propose(self) -> tuple[str | None, bool, tuple | None]:
        """(why the sweep ends, whether to wait for other workers, (trial, params, knobs) to run).
        budget.trials counts the trials running in every process and host: a new one starts only while
        finished + running stay under it, decided under the study lock, so N workers never overshoot;
        while the running ones might still fail or die (and need a retry), the sweep waits instead of ending."""
        from optuna.trial import TrialState

        sw, study = self.sw, self.study
        while True:
            with self.study_lock():
                trials = study.get_trials(deepcopy=False)
                reason = budget_reason(trials, sw, self.per_hour)
                in_flight = sum(t.state == TrialState.RUNNING for t in trials)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if reason is None and is_grid(sw) and not waiting and study.sampler.is_exhausted(study):
                    reason = "every grid point done"
                # The last grid points are being run by other processes: wait for them rather than repeat one.
                busy = reason is None and is_grid(sw) and not waiting and not study.sampler.unstarted(study)
                busy = busy or (reason is None and in_flight > 0
                                and budget_reason(trials, sw, self.per_hour, in_flight) is not None)
                if reason or busy:
                    return reason, busy, None
                with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": beat() does it here
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = study.ask()
                with self.beat(trial):  # a first beat while the lock is held: never taken for dead meanwhile
                    pass
                trial.set_user_attr("owner", self.owner)
                params = {d.param: d.suggest(trial) for d in self.space.dims}
                knobs = self.space.knobs(params)
                trial.set_user_attr("knobs", knobs)
                twin = duplicate_of(trials, knobs, self.alive)
                if twin is None:
                    self.repeats = 0
                    return None, False, (trial, params, knobs)
                # A configuration trained (or training) already: not a new trial.
                trial.set_user_attr("status", "duplicate")
                trial.set_user_attr("duplicate_of", twin)
                study.tell(trial, state=TrialState.FAIL)
                self.repeats += 1
                if self.repeats >= MAX_REPEATED_PROPOSALS:
                    return (f"the search space looks exhausted: the last {self.repeats} proposals were all "
                            "configurations already trained"), False, None

    def drive(self, prepared, ran: list[int]) -> str:
        """Propose and execute trials until the budget, the grid or the space ends; returns why. Up to the
        executor's `slots` trials are in flight at once (a thread each), and proposals count them against
        the budget, so N slots never run more trials than budget.trials."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from loralab.sweep.halving import drive_synchronous, synchronous

        if synchronous(self):
            return drive_synchronous(self, prepared, ran, run_trial, _fmt)
        slots = max(1, int(getattr(self.worker, "slots", 1)))
        running: set = set()
        # threads are made as trials need them: an executor's slots grow when a node joins (ray_executor)
        with ThreadPoolExecutor(max_workers=max(slots, 256), thread_name_prefix="trial") as pool:
            while True:
                reason, busy = None, False
                slots = max(slots, int(getattr(self.worker, "slots", 1)))
                while len(running) < slots and not (reason or busy):
                    reason, busy, proposal = self.propose()
                    if proposal is not None and slots == 1:  # one slot: in this thread, as before
                        ran.append(self.execute(prepared, *proposal))
                    elif proposal is not None:
                        running.add(pool.submit(self.execute, prepared, *proposal))
                if not running:
                    if reason:
                        return reason
                    if busy:
                        self.wait_for_others()
                    continue
                try:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:  # the trials in flight are interrupted too: each runs again next time
                    self.worker.close()
                    raise
                ran.extend(f.result() for f in done)  # a trial's error (a SpecError) stops the sweep

    def progress(self):
        """The sweep's overall line ("trial 4 of 12 (...), 3 done in ..., ETA 6 min"), counting the
        trials an earlier process already ran; no total under a time or money budget alone."""
        if getattr(self, "_overall", None) is None:
            from loralab.progress import Overall

            b = self.sw.budget
            total = min(x for x in (b.trials, len(self.space.expand()) if is_grid(self.sw) else None) if x) \
                if (b.trials or is_grid(self.sw)) else None
            self._overall = Overall(self.rep, "trial", total)
            self._overall.started = self._overall.finished = sum(
                t.state.is_finished() and t.user_attrs.get("status") != Status.INTERRUPTED for t in self.study.get_trials(deepcopy=False))
        return self._overall

    def wait_for_others(self) -> None:
        if not self.waited:
            self.rep.log("Waiting for another sweep process to finish its trial(s) (the last grid points, or the "
                         "last of the trial budget: one may fail or die and need its retry).")
            self.waited = True
        time.sleep(1.0)
        with self.study_lock():
            self.recover()  # in case one died meanwhile

    def execute(self, prepared, trial, params: dict, knobs: dict, *, prune: bool = True, earlier_s: float = 0.0) -> int:
        """Run one trial's jobs and tell Optuna how it ended; returns the trial's number. `prune=False`:
        no pruner judges it (a synchronous rung already did); `earlier_s`: seconds its rungs took."""
        from optuna.trial import TrialState

        exp, study = self.exp, self.study
        t0 = time.perf_counter() - earlier_s
        try:
            pruning = Pruning(self.url, exp.name, trial.number, self.sign) if len(self.sw.objective) == 1 and prune else None
            started = self.progress().start(f"{trial_name(trial.number)}: {_fmt(knobs)}")
            with self.beat(trial):
                tr = run_trial(prepared, exp, knobs, self.store, name=trial_name(trial.number), reporter=self.rep,
                               executor=self.worker, pruning=pruning)
        except KeyboardInterrupt:  # same as a dead process: this configuration runs again next time
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            trial.set_user_attr("status", Status.INTERRUPTED)
            study.tell(trial, state=TrialState.FAIL)
            self.forget(trial.number)
            raise
        except SpecError:  # objective names no recorded metric: not the trial's fault, not counted
            trial.set_user_attr("status", Status.INTERRUPTED)
            study.tell(trial, state=TrialState.FAIL)
            raise
        spent = time.perf_counter() - t0
        self.progress().finish(started, reused=bool(tr.run_ids) and tr.reused >= len(tr.run_ids))
        if _optuna.stored_trial(study, trial).state.is_finished():
            # Its heartbeat stopped long enough (a stalled or cut-off host) that another worker took it for
            # dead: that worker recorded it interrupted and queued its configuration, whose run counts instead.
            self.rep.log(f"trial {trial.number}: taken for dead by another worker meanwhile; its retry counts instead")
            return trial.number
        for k, v in {"status": tr.status, "run_ids": tr.run_ids, "spent_s": round(spent, 3), "reused": tr.reused,
                     "steps": tr.steps, "planned_steps": tr.planned_steps, "saved_steps": tr.saved_steps,
                     "saved_s": tr.saved_s}.items():
            trial.set_user_attr(k, v)
        what = self.tell(trial, tr)
        reused = f", reused {tr.reused} stored run(s)" if tr.reused else ""
        self.rep.log(f"trial {trial.number}: {_fmt(knobs)} -> {tr.status}: {what} ({spent:.1f} s{reused})")
        return trial.number

    def tell(self, trial, tr: TrialRuns) -> str:
        """Optuna's state for how the trial's runs ended (loralab's status kept as a user attr); a phrase."""
        from optuna.trial import TrialState

        if tr.status == Status.FINISHED:
            self.study.tell(trial, tr.values)
            return _values_text(self.sw, tr.values)
        if tr.status in (Status.PRUNED, Status.DIVERGED):  # stopped early because it was bad: Optuna's PRUNED
            self.study.tell(trial, state=TrialState.PRUNED)
            return (f"pruned at step {tr.steps}/{tr.planned_steps}, saved {tr.saved_steps} steps (~{tr.saved_s:.1f} s)"
                    if tr.status == Status.PRUNED else f"diverged at step {tr.steps}")
        if tr.error:
            trial.set_user_attr("error", tr.error[-2000:])
        self.study.tell(trial, state=TrialState.FAIL)
        return Status.FAILED + (f": {tr.error.strip().splitlines()[-1]}" if tr.error else "")


def _close_to_best(result: SweepResult, store, exp: Experiment, rep: Reporter) -> list[int]:
    """The finished trials whose objective is within noise of the best trial's, by the report's rule
    (an interval over seeds and eval examples): the best mean alone can be a lucky seed."""
    from loralab.analysis.findings import against_best

    sw = exp.sweep
    if len(sw.objective) != 1 or not result.best:
        return []
    runs = {r.id: r for r in store.list(exp.name) if r.status == Status.FINISHED}
    groups = {t.number: [runs[i] for i in t.run_ids if i in runs] for t in result.trials if t.status == Status.FINISHED}
    best = groups.get(result.best[0].number)
    if not best:
        return []
    key = _objective_key(exp, best[0])
    level = exp.evaluation.confidence
    others = {n: g for n, g in groups.items() if g and n != result.best[0].number}
    # one family of questions, adjusted as the report's are: no trial called apart that the report calls close
    vs = against_best(best, list(others.values()), key, level, floors=exp.evaluation.min_effect)
    close = [n for n, g in others.items() if (v := vs.get(g[0].name)) is not None and v.label in ("within noise", "negligible")]
    if close:
        rep.log(f"Within noise of the best ({level:.0%} intervals over seeds and eval examples): "
                + ", ".join(f"trial {n}" for n in sorted(close)) + ". `loralab report` compares them.")
    return sorted(close)


def _finish(result: SweepResult, study, space: Space, sw: SweepSpec, per_hour: float | None, exp: Experiment,
            rep: Reporter) -> None:
    """Fill the result from the whole study and print the best configuration(s) and the compute."""
    frozen = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") != "duplicate"]
    result.trials = [TrialSummary.from_frozen(t, space) for t in frozen]
    counted = [TrialSummary.from_frozen(t, space) for t in frozen if counts_in_budget(t)]
    result.spent_s = sum(t.spent_s for t in counted)
    result.saved_steps = sum(t.saved_steps for t in counted)
    result.saved_s = sum(t.saved_s for t in counted)
    result.cost = cost_of(result.spent_s, per_hour) if per_hour is not None else None
    best_numbers = {t.number for t in study.best_trials}
    result.best = [t for t in result.trials if t.number in best_numbers]
    n = {s: sum(t.status == s for t in counted) for s in (Status.FINISHED, Status.PRUNED, Status.DIVERGED, Status.FAILED)}
    rep.log(f"Sweep stopped: {result.stopped}. Trials: {n['finished']} finished, {n['pruned']} pruned, "
            f"{n['diverged']} diverged, {n['failed']} failed.")
    money = f" ({result.cost:.4f} {exp.cost.currency})" if result.cost is not None else ""
    rep.log(f"Spent {result.spent_s / 60:.2f} min{money}; stopping trials early (pruned or diverged) saved "
            f"{result.saved_steps} steps (~{result.saved_s:.1f} s).")


def _objective_key(exp: Experiment, rec) -> str:
    """The stored metric behind the (single) objective; a per-cap metric at the run's largest cap."""
    return objective_key(exp.sweep.objective[0].metric, rec.metrics, rec.config["generate"]["max_new_tokens"])


def _confirm(result: SweepResult, study, prepared, store, exp: Experiment, worker, rep: Reporter) -> None:
    """Train the best `confirm.top` finished trials again on fresh seeds (train.seed + 1000, ...) and
    put the winner by its confirmed value first: the best searched value among many trials is partly luck
    (the winner's curse). Stored runs are reused, so a rerun costs nothing; the time counts in the sweep's."""
    from loralab.analysis.comparison import cell_estimate
    from loralab.config.schema import CONFIRM_SEED_OFFSET

    sw = exp.sweep
    sign = -1.0 if sw.directions[0] == "maximize" else 1.0
    done = sorted((t for t in result.trials if t.status == Status.FINISHED and t.values), key=lambda t: sign * t.values[0])
    top = done[: sw.confirm.top]
    if not top:
        return
    first = make_run(experiment_start(exp), {}, "start").train.seed
    fresh = [first + CONFIRM_SEED_OFFSET + i for i in range(sw.confirm.seeds)]
    confirming = exp.model_copy(update={"seeds": fresh, "repeats": len(fresh)})
    confirming.resolved_runs, confirming.source = exp.resolved_runs, exp.source
    rep.log(f"Confirming the best {len(top)} trial(s) on {len(fresh)} fresh seed(s) ({', '.join(map(str, fresh))}): "
            "the best of many searched values is optimistic")
    level = exp.evaluation.confidence
    for t in top:
        t0 = time.perf_counter()
        tr = run_trial(prepared, confirming, t.knobs, store, name=confirm_name(t.number), executor=worker, reporter=rep)
        spent = time.perf_counter() - t0
        info: dict[str, Any] = {"seeds": fresh, "run_ids": tr.run_ids, "status": tr.status, "spent_s": round(spent, 2),
                                "searched": t.values[0]}
        if tr.status == Status.FINISHED and tr.values:
            info["value"] = tr.values[0]
            group = [r for r in (store.get(i) for i in tr.run_ids) if r is not None]
            e = cell_estimate(_objective_key(exp, group[0]), group, level) if group else None
            if e is not None and not math.isnan(e.lo):
                info["lo"], info["hi"] = e.lo, e.hi
        result.confirmed[t.number] = info
        result.confirm_s += spent if tr.reused < len(tr.run_ids) else 0.0
        study.set_user_attr(f"confirmed:{t.number}", info)
    ranked = sorted((t for t in top if "value" in result.confirmed[t.number]),
                    key=lambda t: sign * result.confirmed[t.number]["value"])
    if ranked:
        result.best = [ranked[0]]


def _announce(result: SweepResult, space: Space, sw: SweepSpec, exp: Experiment, rep: Reporter) -> None:
    """The best configuration(s), with the confirmed value beside the searched one when there is one."""
    if result.confirm_s:
        per_hour = exp.cost.per_hour if exp.cost else None
        money = f", {cost_of(result.confirm_s, per_hour):.4f} {exp.cost.currency}" if per_hour else ""
        rep.log(f"Confirmation took {result.confirm_s:.1f} s{money}; the sweep in all: "
                f"{(result.spent_s + result.confirm_s) / 60:.2f} min")
    title = "Best configuration" if len(sw.objective) == 1 else f"Pareto set ({len(result.best)})"
    for t in result.best:
        c = result.confirmed.get(t.number)
        confirmed = ""
        if c and "value" in c:
            span = f" [{c['lo']:.4g}, {c['hi']:.4g}]" if "lo" in c else ""
            confirmed = f"; confirmed on fresh seeds {', '.join(map(str, c['seeds']))}: {c['value']:.4g}{span}"
        elif c:
            confirmed = f"; its confirmation on fresh seeds {c['status']}"
        elif len(sw.objective) == 1 and len(result.trials) > 1:
            confirmed = f" (searched value, best of {len(result.trials)}: optimistic; sweep.confirm re-trains it on fresh seeds)"
        rep.log(f"{title}: trial {t.number}: {_fmt(t.knobs)} -> {_values_text(sw, t.values)} searched{confirmed} "
                f"(loralab show {exp.name}/{trial_name(t.number)})")


# ---------------------------------------------------------------------------------------------
# Dry run: what would run, and about how long it would take


def _throughput(ws: Path, model_fingerprint: str, sweep=None, n_eval: int | None = None) -> tuple[float, str, float] | None:
    """Train tokens/s and eval seconds per run measured by finished runs of this model in the workspace.

    The eval seconds are what a trial does: a loss-only objective's trials skip generation and drift, so
    stored runs that generated count only their loss pass (`timings.eval_loss_s`); scaled per eval example
    to `n_eval` (another experiment's eval set may be larger)."""
    from loralab.errors import RunNotFound
    from loralab.workspace.store import Store, shown

    try:
        store = Store(ws, create=False)
    except RunNotFound:  # nothing stored yet
        return None
    with store:
        runs = [r for r in store.list() if r.kind == "lora" and r.status == Status.FINISHED
                and r.model.get("fingerprint") == model_fingerprint and r.metrics.get("tokens_per_s")]
    runs = list({r.id: r for r in runs}.values())
    if not runs:
        return None
    full = needs_full_eval(sweep)

    def overhead(r) -> float:
        """What a run spent outside training and evaluation (its adapter made and saved, the store): its
        row's wall time (start to finish, whole seconds) less both."""
        try:
            wall = (datetime.fromisoformat(r.updated_at) - datetime.fromisoformat(r.created_at)).total_seconds()
        except (TypeError, ValueError):
            return 0.0
        return max(wall - float(r.metrics.get("total_s") or 0.0), 0.0)

    def eval_s(r) -> float:
        generated = "generate_s" in r.timings
        if full and not generated:  # a loss-only trial's time says nothing of generation: not counted
            return float("nan")
        s = r.metrics.get("eval_s", 0.0) if full or not generated else r.timings.get("eval_loss_s", 0.0)
        n = r.data.get("n_eval")
        return (s * n_eval / n if n_eval and n else s) + overhead(r)

    tps = statistics.median(r.metrics["tokens_per_s"] for r in runs)
    evals = [e for e in map(eval_s, runs) if e == e]
    if not evals:
        return None
    return tps, f"measured: median of {len(runs)} finished run(s) in {shown(ws)}", statistics.median(evals)


MEASURE_STEPS = 4  # a dry run with nothing stored trains this many steps (the first is warm-up, not timed)
MEASURE_EXAMPLES = 4  # and evaluates this many eval examples (and drift prompts), scaled to the whole set


def measure_here(exp: Experiment, prepared, run: RunSpec) -> tuple[float, str, float]:
    """Train tokens/s and eval seconds per run, measured on this machine now: a throwaway adapter of the
    start settings trains a few steps, and a trial's evaluation runs on a few eval examples (what its
    objective needs: the losses only, or generation and drift too), scaled to the whole eval set.
    Nothing is stored; the base model is left without the adapter."""
    import dataclasses

    from loralab.engine.train import train_lora
    from loralab.execute.evaluate import evaluate
    from loralab.execute.runner import restore_base, train_encoded, with_lora

    k = min(MEASURE_EXAMPLES, len(prepared.eval_encoded))
    spec = run.train.model_copy(update={"max_steps": MEASURE_STEPS})
    # How the adapter starts does not change a step's speed, and EVA's data pass alone would take longer
    # than this whole measurement (a minute on the built-in model): measured from PEFT's default start.
    run = run.model_copy(update={"lora": run.lora.model_copy(update={"init": "default"})})
    model = with_lora(prepared, run)
    try:
        tok = prepared.base.tokenizer
        res = train_lora(model, train_encoded(prepared, run), spec, pad_id=tok.pad_token_id)
        timed = res.curve["seconds"][-1] - res.curve["seconds"][0]
        tps = (res.curve["tokens"][-1] - res.curve["tokens"][0]) / timed if timed > 0 else res.tokens_per_s
        small = dataclasses.replace(
            prepared, dataset=dataclasses.replace(prepared.dataset, eval=prepared.dataset.eval[:k]),
            eval_encoded=prepared.eval_encoded[:k], eval_prompts=prepared.eval_prompts[:k],
            reference_tokens=prepared.reference_tokens[:k], train_probe=prepared.train_probe[:k],
            drift_prompts=prepared.drift_prompts[:k], drift_base=None)
        t0 = time.perf_counter()
        evaluate(model, small, "dry run", Reporter(), run.generate.batch_size, full=needs_full_eval(exp.sweep),
                 probe=needs_probe(exp.sweep))
        eval_s = (time.perf_counter() - t0) * max(len(prepared.eval_encoded), 1) / max(k, 1)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # every run of a trial saves its adapter (timed warm: the
            model.save_pretrained(tmp)              # first save also imports and allocates once per process)
            t0 = time.perf_counter()
            model.save_pretrained(tmp)
            eval_s += time.perf_counter() - t0
    finally:
        restore_base(prepared, model)
    what = "losses, generation and drift" if needs_full_eval(exp.sweep) else "losses only"
    return tps, (f"measured here now: {MEASURE_STEPS - 1} timed training steps at the start settings, a run's adapter saved, and a trial's "
                 f"evaluation ({what}) on {k} eval example(s) scaled to {len(prepared.eval_encoded)}"), eval_s


def train_tokens(prepared, run: RunSpec) -> int:
    """About how many non-padding tokens a run trains on: planned examples x their mean length."""
    from loralab.engine.train import plan_steps
    from loralab.execute.runner import train_encoded

    lengths = [len(e.input_ids) for e in train_encoded(prepared, run)]
    steps = plan_steps(len(lengths), run.train)
    return int(steps * run.train.gradient_accumulation * min(run.train.batch_size, len(lengths)) * statistics.fmean(lengths))


def dry_run_plan(exp: Experiment, prepared, ws: Path, space: Space) -> DryRun:
    sw = exp.sweep
    start = experiment_start(exp)
    seeds = len(exp.seeds_for(make_run(start, {}, "start")))
    measured = _throughput(ws, prepared.base.fingerprint, sw, len(prepared.eval_encoded))
    tps, source, eval_s = measured or measure_here(exp, prepared, make_run(start, {}, "start"))
    budget = sw.budget.model_dump(exclude_none=True)
    points = space.expand() if is_grid(sw) else None
    runs = [make_run(start, pt, "trial") for pt in points] if points is not None else [make_run(start, {}, "start")]
    tokens = [train_tokens(prepared, r) for r in runs]
    per_trial = [seeds * (t / tps + eval_s) for t in tokens]
    eval_note = f" + {eval_s:.1f} s per run for its evaluation, adapter and store"
    lines = []
    if points is not None:
        n = min(len(points), sw.budget.trials or len(points))
        total = sum(per_trial[:n])
        lines.append(f"Dry run of sweep {exp.name!r}: grid of {len(points)} trial(s) x {seeds} seed(s)"
                     + (f", budget runs the first {n}" if n < len(points) else "") + "; nothing is trained or written.")
        for i, (pt, t) in enumerate(zip(points, tokens)):
            lines.append(f"  {i + 1:>3}. {_fmt(pt)}  (~{t:,} train tokens)")
    else:
        n = sw.budget.trials
        total = n * per_trial[0] if n else None
        lines.append(f"Dry run of sweep {exp.name!r}: strategy {sw.strategy}, budget "
                     + _budget_text(budget) + "; nothing is trained or written.")
        lines.append(f"  Per trial at the start settings: ~{tokens[0]:,} train tokens x {seeds} seed(s) "
                     f"= about {per_trial[0]:.1f} s")
    lines.append(f"  Throughput {tps:,.0f} train tokens/s ({source}){eval_note}.")
    lines += prior_lines(sw)
    if total is not None:
        lines.append(f"  Estimated total: about {total / 60:.1f} min for {n} trial(s), before pruning saves any.")
    if sw.budget.minutes is not None and per_trial[0] > 0:
        lines.append(f"  budget.minutes {sw.budget.minutes:g} fits about {int(sw.budget.minutes * 60 // per_trial[0])} "
                     "trial(s) at that rate.")
    return DryRun(sw.strategy, points, n, seeds, tokens, tps, source, eval_s, per_trial, total, budget, lines)
