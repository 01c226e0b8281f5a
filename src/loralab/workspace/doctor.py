"""`loralab doctor`: does the workspace database agree with the files on disk, and did a crash leave
anything behind? `--repair` fixes what can be fixed without retraining.

A kill -9, a power cut or a full disk can leave: a run `running` with no process behind it, an
adapter written but not recorded (or recorded but gone), temporary folders, folders of runs the
database does not know, names pointing at nothing, and sweep trials still RUNNING. Each becomes a
Issue saying where, what, and what the repair does. Runs that a live process holds (their lock is
taken) are never touched, so doctor is safe to run next to a training process.

The next `loralab run` or `loralab sweep` handles crashed work by itself (it retrains unfinished
runs and resumes interrupted trials); doctor is for seeing that the workspace is sound, and for
cleaning it up without running anything.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loralab.execute.checkpoint import FOLDER as CHECKPOINTS, found_in  # torch is imported only to load one
from loralab.workspace.status import Status
from loralab.workspace.store import DB_NAME, DONE, OPTUNA_DB, RunRecord, Store
from loralab.naming import trial_name

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Issue:
    """One thing wrong (or worth knowing) about the workspace."""

    kind: str  # interrupted, no-metrics, no-adapter, moved, leftovers, orphan, stale-alias, damaged-row, database,
    # trial, trial-run, checkpoint
    where: str  # the run (experiment/name and id), a path, or study/trial
    problem: str
    repair: str  # what --repair does, or how to fix it by hand
    severity: str = "problem"  # "note": nothing is wrong yet (a sweep to resume)
    repaired: bool = False
    repairable: bool = True  # by --repair; a damaged database is not


@dataclass
class Checkup:
    workspace: Path | str  # a folder, or a database URL without its password
    repair: bool
    findings: list[Issue] = field(default_factory=list)
    runs: int = 0
    folders: int = 0
    trials: int = 0

    @property
    def problems(self) -> list[Issue]:
        """Problems still there (not repaired)."""
        return [f for f in self.findings if f.severity == "problem" and not f.repaired]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"workspace": str(self.workspace), "ok": self.ok, "repair": self.repair, "runs": self.runs,
                "folders": self.folders, "trials": self.trials, "findings": [asdict(f) for f in self.findings]}


def adapter_complete(folder: Path) -> bool:
    """A PEFT adapter as loralab writes it: config and safetensors weights (never a pickle)."""
    return all((folder / f).is_file() for f in ADAPTER_FILES)


def check_workspace(workspace: str | Path, repair: bool = False) -> Checkup:
    """Check (and with `repair`, fix) one workspace; raises RunNotFound when there is none."""
    from sqlalchemy.exc import DatabaseError

    from loralab.workspace.store import storage_error

    from loralab.errors import WorkspaceError

    try:
        store = Store(workspace, create=False)
    except WorkspaceError as err:  # `ls` said it cannot read loralab.db and sent the user here: say more
        if store_is_folder(workspace) and "not a readable loralab database" in str(err):
            return _unreadable_database(Path(workspace), str(err))
        raise
    with store:
        try:
            out = Checkup(Path(workspace) if store.url is None else store.where, repair)
            if store.url is None:  # PostgreSQL checks its own pages; there is no file to run an integrity check on
                _check_database(store, out)
            if out.findings:  # a damaged database: what it says about runs cannot be trusted (or even read)
                return out
            _check_runs(store, out, repair)
            try:
                _check_studies(store, out)
            except Exception as err:  # a damaged optuna.db: a finding, the run checks above still stand
                first = str(err).splitlines()[0][:120] if str(err) else ""
                out.findings.append(Issue("study", str(store.root / OPTUNA_DB) if store.url is None else store.where,
                                          f"the sweep study database cannot be read ({type(err).__name__}: {first})",
                                          "restore optuna.db from a backup, or move it away and run the sweep again "
                                          "(finished runs are reused)", repairable=False))
            return out
        except DatabaseError as err:
            raise storage_error(err, store.root) or err from None


def store_is_folder(workspace: str | Path) -> bool:
    return not (isinstance(workspace, str) and "://" in workspace)


SQLITE_HEADER = b"SQLite format 3\0"


def _unreadable_database(root: Path, why: str) -> Checkup:
    """A loralab.db SQLite cannot open: what the file is, what beside it may hold its last writes, and
    which adapters survive on disk, with the recovery to try (what `ls` cannot tell)."""
    db = root / DB_NAME
    out = Checkup(root, repair=False)
    with open(db, "rb") as f:
        head = f.read(100)
    size = db.stat().st_size
    if head[:16] != SQLITE_HEADER:
        what = (f"{DB_NAME} ({size} bytes) does not start with the SQLite header (it begins {head[:16]!r}): "
                "overwritten or not a database at all")
        fix = "restore loralab.db from a backup; if there is none, start a new --workspace"
    else:
        what = f"{DB_NAME} ({size} bytes) is a SQLite file whose pages are damaged ({why.split('(')[-1].rstrip(')')})"
        fix = ("keep a copy, then try `sqlite3 loralab.db .recover | sqlite3 fixed.db` and move fixed.db to "
               "loralab.db; else restore it from a backup")
    wal = root / (DB_NAME + "-wal")
    if wal.is_file() and wal.stat().st_size:
        what += f"; {wal.name} beside it holds {wal.stat().st_size} bytes of its last writes (keep it with the copy)"
    out.findings.append(Issue("database", str(db), what, fix, repairable=False))
    runs = root / "runs"
    folders = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    out.folders = len(folders)
    kept = [p.name for p in folders if adapter_complete(p / "adapter")]
    if kept:
        out.findings.append(Issue("adapters", str(runs), f"{len(kept)} complete adapter(s) survive on disk, each in "
                                  f"runs/RUN_ID/adapter (e.g. {', '.join(kept[:3])})",
                                  "they load with PEFT as they are; a recovered database points at them again",
                                  severity="note", repairable=False))
    return out


def _check_database(store: Store, out: Checkup) -> None:
    with store.engine.connect() as conn:
        result = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").fetchall()]
    if result != ["ok"]:
        lines = [x for r in result for x in str(r).splitlines() if not x.startswith("***")]
        out.findings.append(Issue("database", str(store.root / DB_NAME), "SQLite integrity check: " + "; ".join(lines[:3]),
                                    "restore loralab.db from a backup, or try "
                                    "`sqlite3 loralab.db .recover | sqlite3 fixed.db`", repairable=False))


def _check_runs(store: Store, out: Checkup, repair: bool) -> None:
    runs_dir = store.root / "runs"
    # Folders before rows: a run's row is written before its folder, so a folder seen here whose row
    # is missing below is a real orphan, not a run that started in between.
    folders = sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []
    rows = store.all_runs()
    names: dict[str, list[str]] = {}
    aliases = store.alias_rows()
    for experiment, name, seed, rid in aliases:
        names.setdefault(rid, []).append(f"{experiment}/{name}" + (f" (seed {seed})" if seed is not None else ""))
    out.runs, out.folders = len(rows), len(folders)
    by_id = {r.id: r for r in rows}

    def where(rec: RunRecord) -> str:
        return f"{', '.join(sorted(names.get(rec.id, []))) or rec.name} [{rec.id}]"

    for rec in rows:
        if not store.in_progress(rec.id):  # else a live process is training or storing it
            _check_run(store, rec, where(rec), out, repair)
    for path in folders:
        if path.name in by_id or store.in_progress(path.name):
            continue
        f = Issue("orphan", str(path), "no run in the database owns this " + ("folder" if path.is_dir() else "file"),
                    "remove it")
        out.findings.append(f)
        if repair:
            f.repaired = _remove(store, path.name, [path])
    for experiment, name, seed, rid in aliases:
        if rid not in by_id:
            f = Issue("stale-alias", f"{experiment}/{name}", f"points at run {rid}, which the database does not hold",
                        "remove the name")
            out.findings.append(f)
            if repair:
                store.drop_alias(experiment, name, seed)
                f.repaired = True


def _check_run(store: Store, rec: RunRecord, where: str, out: Checkup, repair: bool) -> None:
    """One run's row against its folder: damaged, left running, finished without metrics or adapter, moved,
    or with leftover files."""
    folder = store.run_dir(rec.id)
    if rec.damaged:  # never repaired by deleting: its adapter may be a finished run's only copy
        out.findings.append(Issue("damaged-row", where, "its database row cannot be read: " + "; ".join(rec.damaged),
                                    f"run its experiment again, which trains and stores it anew; its files in {folder} "
                                    "are kept", repairable=False))
        return
    saved = _checkpoint(folder)
    if rec.status == Status.RUNNING:
        again = (f"the next `loralab run` resumes it from its checkpoint at step {saved.step} (kept)" if saved
                 else "the next `loralab run` trains it again")
        f = Issue("interrupted", where, "left `running` by a process that stopped without finishing it "
                    "(kill -9, crash, power cut or full disk)",
                    f"mark it interrupted and remove its unfinished files; {again}")
        out.findings.append(f)
        if repair:
            f.repaired = _repair_run(store, rec.id, Status.INTERRUPTED, "left running by a process that died "
                                     "(found by loralab doctor)", remove=True)
        return
    if saved and rec.status in (Status.INTERRUPTED, Status.FAILED):
        out.findings.append(Issue("checkpoint", where, f"{rec.status} with a checkpoint at step {saved.step} of "
                                  f"{saved.total} ({_mb(saved.path)} MB)", "nothing: the next `loralab run` or "
                                  "`loralab sweep` of it continues from there (remove the folder to start over)",
                                  "note"))
    if rec.status == Status.FINISHED:
        rec = _check_finished(store, rec, where, folder, out, repair)
        if rec is None:
            return
    leftovers = _leftovers(rec, folder)
    if leftovers:
        f = Issue("leftovers", where, f"{rec.status} run has files no finished result uses: "
                    + ", ".join(p.name for p in leftovers), "remove them")
        out.findings.append(f)
        if repair:
            f.repaired = _remove(store, rec.id, leftovers)


def _check_finished(store: Store, rec: RunRecord, where: str, folder: Path, out: Checkup,
                    repair: bool) -> RunRecord | None:
    """A finished run has metrics and its complete adapter in this workspace: the record as checked (its
    adapter path this workspace's); None when it is not finished after all (nothing else is checked)."""
    if "eval_loss" not in rec.metrics:
        f = Issue("no-metrics", where, "marked finished but has no metrics",
                    "mark it failed; the next `loralab run` trains it again")
        out.findings.append(f)
        if repair:
            f.repaired = _repair_run(store, rec.id, Status.FAILED, "finished without metrics (found by loralab doctor)",
                                     remove=True)
        return None
    local = folder / "adapter"  # where the runner always saves it
    if rec.kind != "lora" or (rec.adapter_path and Path(rec.adapter_path).resolve() == local.resolve()
                              and adapter_complete(local)):
        return rec
    if adapter_complete(local):
        f = Issue("moved", where, f"its adapter path {rec.adapter_path} is not this workspace's "
                    "(the workspace was moved or copied)", f"point the run at {local}")
        out.findings.append(f)
        if repair:
            store.set_adapter_path(rec.id, str(local))
            f.repaired = True
        return replace(rec, adapter_path=str(local))  # so the adapter is not taken for a leftover
    stored = Path(rec.adapter_path) if rec.adapter_path else None
    if stored is not None and stored.resolve() != local.resolve():  # the database was moved or copied alone
        there = "still complete there" if adapter_complete(stored) else "not there either"
        f = Issue("no-adapter", where, f"the workspace was moved or copied without its run folders: the adapter is "
                  f"missing at {local}, and its stored path {stored} is {there}",
                  f"copy the old workspace's runs/{rec.id} folder to {folder}, then run doctor again; --repair instead "
                  "marks it failed and the next `loralab run` trains it again")
    else:
        f = Issue("no-adapter", where, f"finished, but its adapter {rec.adapter_path} is missing "
                    "or incomplete", "mark it failed; the next `loralab run` trains it again")
    out.findings.append(f)
    if repair:
        f.repaired = _repair_run(store, rec.id, Status.FAILED, "adapter missing on disk (found by "
                                 "loralab doctor)", remove=True)
    return None


def _leftovers(rec: RunRecord, folder: Path) -> list[Path]:
    """Files under the run's folder that its stored result does not point at (the checkpoints of a run
    still to finish are what its next attempt resumes from: not leftovers)."""
    if not folder.is_dir():
        return []
    keep = Path(rec.adapter_path) if rec.status == Status.FINISHED and rec.adapter_path else None
    resumable = rec.status not in DONE
    return [p for p in sorted(folder.iterdir()) if (keep is None or p.resolve() != keep.resolve())
            and not (resumable and p.name == CHECKPOINTS)]


def _checkpoint(folder: Path):
    """The run's newest complete checkpoint (execute.checkpoint.Found), or None."""
    every = found_in(folder / CHECKPOINTS)
    return every[-1] if every else None


def _mb(path: Path) -> str:
    return f"{sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20:.1f}"


def _repair_run(store: Store, run_id: str, status: str, error: str, remove: bool) -> bool:
    """Change a run's status under its lock (so no process starts it meanwhile) and drop its files; an
    interrupted run keeps its checkpoints, which its next attempt resumes from."""
    with store.run_lock(run_id, blocking=False) as taken:
        if not taken:
            return False
        store.mark(run_id, status, error)
        folder = store.run_dir(run_id)
        if remove and folder.is_dir():
            for p in folder.iterdir():
                if status == Status.INTERRUPTED and p.name == CHECKPOINTS:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()
    return True


def _remove(store: Store, run_id: str, paths: list[Path]) -> bool:
    with store.run_lock(run_id, blocking=False) as taken:
        if not taken:
            return False
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return True


def _check_studies(store: Store, out: Checkup) -> None:
    """Sweep trials of the workspace's own study database (optuna.db in a folder, the same database on
    PostgreSQL): interrupted ones, and complete ones whose runs the workspace no longer holds as finished.
    A trial is left behind when its process (this host) is gone or, on PostgreSQL, its heartbeat stopped."""
    import optuna
    from optuna.trial import TrialState

    from loralab.sweep import _optuna

    stale: set[int] = set()
    storage = store.study_url()
    if storage is None:  # no sweep has run here
        return
    if store.url is not None:
        from loralab.sweep.study import study_storage

        storage = study_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for summary in optuna.get_all_study_summaries(storage=storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if store.url is not None:
            stale = _optuna.stale_trial_ids(study)
        for t in study.get_trials(deepcopy=False):
            out.trials += 1
            where = f"{summary.study_name}/{trial_name(t.number)}"
            if t.state == TrialState.RUNNING and not _optuna.worker_alive(t, stale):
                out.findings.append(Issue("trial", where, "left RUNNING by a sweep process that stopped",
                                            f"run `loralab sweep FILE` for experiment {summary.study_name!r}: it "
                                            "marks the trial interrupted and runs its configuration again", "note"))
            elif t.state == TrialState.COMPLETE:
                for rid in t.user_attrs.get("run_ids", []):
                    rec = store.get(rid)
                    if rec is None or rec.status not in DONE:
                        out.findings.append(Issue(
                            "trial-run", where, f"complete in the study, but its run {rid} is "
                            + ("missing" if rec is None else rec.status) + " in the workspace",
                            "the trial's value stands; `loralab show` cannot show that run until it is trained "
                            "again (same settings in a `loralab run` file)", "note"))
