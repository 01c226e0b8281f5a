"""The workspace: an SQLite database of runs plus one folder per run for its adapter.

A run becomes `finished` in the same transaction that writes its metrics, and only after its adapter
folder is complete on disk, so a crash or Ctrl-C never leaves a finished run without results.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, String, Text, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import Problem, RunNotFound

DB_NAME = "loralab.db"
SCHEMA_VERSION = 2  # PRAGMA user_version; bump when tables change
DEFAULT_WORKSPACE = "loralab-workspace"

STATUSES = ("running", "finished", "diverged", "pruned", "interrupted", "failed")
# Terminal outcomes. A rerun reuses finished and diverged runs; a pruned run was stopped only
# because other trials of its sweep did better, so a plain `loralab run` trains it in full.
DONE = ("finished", "diverged", "pruned")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class _Base(DeclarativeBase):
    pass


class RunRow(_Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    experiment: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))  # "base" or "lora"
    seed: Mapped[int | None] = mapped_column(nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    model: Mapped[dict] = mapped_column(JSON, default=dict)
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    curves: Mapped[dict] = mapped_column(JSON, default=dict)
    samples: Mapped[list] = mapped_column(JSON, default=list)
    env: Mapped[dict] = mapped_column(JSON, default=dict)  # package versions, machine, device
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    adapter_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, onupdate=_now)


class AliasRow(_Base):
    """A run name (and seed) in an experiment points at a run id; two names with one config share one run."""

    __tablename__ = "aliases"

    experiment: Mapped[str] = mapped_column(String(256), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    seed: Mapped[int] = mapped_column(primary_key=True, default=-1)  # -1: base (no seed)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, onupdate=_now)


@dataclass
class RunRecord:
    """A run as read from the store: plain data, detached from the database session."""

    id: str
    name: str
    experiment: str
    kind: str
    status: str
    seed: int | None
    config: dict
    model: dict
    data: dict
    metrics: dict
    curves: dict
    samples: list
    env: dict
    timings: dict
    adapter_path: str | None
    error: str | None
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, row: RunRow, name: str | None = None) -> "RunRecord":
        return cls(id=row.id, name=name or row.name, experiment=row.experiment, kind=row.kind, status=row.status,
                   seed=row.seed,
                   config=row.config or {}, model=row.model or {}, data=row.data or {}, metrics=row.metrics or {},
                   curves=row.curves or {}, samples=row.samples or [], env=row.env or {}, timings=row.timings or {},
                   adapter_path=row.adapter_path, error=row.error,
                   created_at=row.created_at.isoformat(timespec="seconds") if row.created_at else "",
                   updated_at=row.updated_at.isoformat(timespec="seconds") if row.updated_at else "")

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "seed": self.seed, "experiment": self.experiment,
                "kind": self.kind, "status": self.status, "updated_at": self.updated_at}


class Store:
    """All reads and writes of a workspace go through here."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        db = self.root / DB_NAME
        if not create and not db.is_file():
            raise RunNotFound(f"no loralab workspace at {self.root}",
                              [Problem("workspace", "no loralab.db in this folder", str(self.root),
                                       "run an experiment first, or pass --workspace DIR")])
        if create:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{db}", future=True)

        @event.listens_for(self.engine, "connect")
        def _pragmas(conn, _):  # WAL: readers never block the writer; wait on locks instead of failing
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        with self.engine.connect() as conn:
            version = conn.exec_driver_sql("PRAGMA user_version").scalar()
            has_tables = conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE type='table'").scalar()
        if has_tables and version != SCHEMA_VERSION:
            self.engine.dispose()
            raise RunNotFound(f"workspace {self.root} was written by another loralab version (schema {version}, "
                              f"this one reads {SCHEMA_VERSION})",
                              [Problem("workspace", "incompatible database schema", str(self.root / DB_NAME),
                                       "use a new --workspace folder, or the loralab version that wrote it")])
        if create:
            _Base.metadata.create_all(self.engine)
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.engine.dispose()

    # -- writes ---------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def start(self, run_id: str, *, name: str, experiment: str, kind: str, config: dict, model: dict,
              data: dict, env: dict, seed: int | None = None) -> None:
        """Mark a run as running (replacing any unfinished or forced earlier attempt)."""
        with Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            if row is None:
                row = RunRow(id=run_id)
                s.add(row)
            row.name, row.experiment, row.kind, row.status, row.seed = name, experiment, kind, "running", seed
            row.config, row.model, row.data, row.env = config, model, data, env
            row.metrics, row.curves, row.samples, row.timings = {}, {}, [], {}
            row.adapter_path, row.error = None, None
            self._alias(s, experiment, name, run_id, seed)

    def finish(self, run_id: str, *, metrics: dict, curves: dict, samples: list, timings: dict,
               adapter_path: str | None, status: str = "finished", error: str | None = None) -> None:
        """Store results and the terminal status in one transaction."""
        assert status in DONE
        with Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            row.metrics, row.curves, row.samples, row.timings = metrics, curves, samples, timings
            row.adapter_path, row.error = adapter_path, error
            row.status = status

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        assert status in STATUSES
        with Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            if row is not None:
                row.status = status
                row.error = error

    def alias(self, experiment: str, name: str, run_id: str, seed: int | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            self._alias(s, experiment, name, run_id, seed)

    @staticmethod
    def _alias(s: Session, experiment: str, name: str, run_id: str, seed: int | None) -> None:
        key = -1 if seed is None else seed
        a = s.get(AliasRow, (experiment, name, key))
        if a is None:
            s.add(AliasRow(experiment=experiment, name=name, seed=key, run_id=run_id))
        else:
            a.run_id = run_id

    # -- reads ----------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        with Session(self.engine) as s:
            row = s.get(RunRow, run_id)
            return RunRecord.from_row(row) if row else None

    def list(self, experiment: str | None = None) -> list[RunRecord]:
        """Every run, one record per (experiment, name) alias, newest first."""
        with Session(self.engine) as s:
            q = select(AliasRow, RunRow).join(RunRow, RunRow.id == AliasRow.run_id)
            if experiment:
                q = q.where(AliasRow.experiment == experiment)
            rows = s.execute(q.order_by(RunRow.updated_at.desc(), AliasRow.name)).all()
            out = []
            for alias, row in rows:
                rec = RunRecord.from_row(row, name=alias.name)
                rec.experiment = alias.experiment
                rec.seed = None if alias.seed == -1 else alias.seed
                out.append(rec)
            return out

    def find(self, ref: str, experiment: str | None = None) -> RunRecord:
        """One run: the first seed of `group(ref)`."""
        return self.group(ref, experiment)[0]

    def group(self, ref: str, experiment: str | None = None) -> list[RunRecord]:
        """A run by name with all its seeds (from the newest experiment using the name), by
        `experiment/name`, or one run by id prefix."""
        if "/" in ref and experiment is None:
            experiment, ref = ref.rsplit("/", 1)
        runs = self.list(experiment)
        by_name = [r for r in runs if r.name == ref]
        if by_name:
            done = [r for r in by_name if r.status in DONE] or by_name
            exp = done[0].experiment  # newest first
            return sorted((r for r in by_name if r.experiment == exp), key=lambda r: (r.seed is None, r.seed or 0))
        by_id = {r.id: r for r in runs if r.id.startswith(ref)}
        if len(by_id) == 1:
            return [next(iter(by_id.values()))]
        names = sorted({f"{r.name}" for r in runs})
        raise RunNotFound(f"no run {ref!r} in workspace {self.root}",
                          [Problem("run", "unknown run name or id", ref,
                                   f"use one of: {', '.join(names) if names else '(none yet: run an experiment first)'}")])
