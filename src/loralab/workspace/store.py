"""The workspace: a database of runs plus one folder per run for its adapter.

Two backends behind one Store: a local folder (SQLite `loralab.db` next to the run folders, file
locks; the default) or a PostgreSQL URL shared by many hosts, with the run folders in an `artifacts`
folder every host can read and session advisory locks instead of file locks (a dead host's locks
vanish with its connection).

A run becomes `finished` in the same transaction that writes its metrics, and only after its adapter
folder is complete on disk, so a crash or Ctrl-C never leaves a finished run without results.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import json

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, TypeDecorator, create_engine, delete,
                        event, func, insert, inspect, select, text)
from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, defer, deferred, mapped_column

from loralab.config.schema import config_hash
from loralab.engine.curve import CURVE_KEYS
from loralab.errors import Problem, RunNotFound, SpecError, WorkspaceError
from loralab.faults import fault_point
from loralab.interrupts import held
from loralab.workspace.locks import file_lock, is_locked
from loralab.workspace.status import DONE, REUSED, STATUSES, Status

DB_NAME = "loralab.db"
OPTUNA_DB = "optuna.db"  # a folder workspace's sweep studies (a database workspace keeps them in its own database)
LOCKS = "locks"  # one lock file per run in progress (see locks.py); never deleted, so never raced
SCHEMA_VERSION = 4  # PRAGMA user_version; bump when tables change (and add the step to _migrate)
READABLE = (2, 3, SCHEMA_VERSION)  # versions read as they are; an older one is migrated when opened for writing
DEFAULT_WORKSPACE = "loralab-workspace"



PG_INSTALL = "pip install 'loralab[postgres]'"
META = MetaData()
# PostgreSQL only (SQLite keeps PRAGMA user_version): schema_version, and the artifacts folder, so that
# `loralab ls/show/doctor --workspace postgresql://...` find the adapters without being told again.
META_TABLE = Table("loralab_meta", META, Column("key", String(64), primary_key=True), Column("value", Text))


def is_url(workspace: object) -> bool:
    """Whether a workspace is a database URL (postgresql://...) rather than a folder."""
    return isinstance(workspace, str) and "://" in workspace


def workspace_path(workspace: str | Path | None = None) -> Path | str:
    """A workspace folder as given, else ./loralab-workspace, absolute; a database URL as it is."""
    if is_url(workspace):
        return str(workspace)
    return Path(workspace or DEFAULT_WORKSPACE).expanduser().resolve()


def shown(workspace: str | Path) -> str:
    """A workspace as printed: a URL without its password."""
    if is_url(workspace):
        from sqlalchemy.engine import make_url

        try:
            return make_url(str(workspace)).render_as_string(hide_password=True)
        except Exception:
            return str(workspace).split("@")[-1]
    return str(workspace)


def engine_url(url: str) -> str:
    """A PostgreSQL URL as SQLAlchemy should open it: plain `postgresql://` means psycopg2 to SQLAlchemy
    2.0 (and to Optuna, which passes URLs on); loralab installs psycopg 3, so it is used unless psycopg2 is there."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")):
        driver = "postgresql://" if importlib.util.find_spec("psycopg2") else "postgresql+psycopg://"
        return driver + url.split("://", 1)[1]
    return url


def default_study_url(workspace: str | Path) -> str:
    """Where a workspace keeps its sweeps' Optuna studies: optuna.db in a folder, the same PostgreSQL
    database as the runs for a database workspace (sweep.storage may name another)."""
    return engine_url(str(workspace)) if is_url(workspace) else f"sqlite:///{Path(workspace) / OPTUNA_DB}"


def url_problem(url: str) -> tuple[str, str] | None:
    """(why, fix) when a workspace URL cannot be a loralab workspace, else None."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(engine_url(url))
    except Exception as err:
        return f"not a database URL ({str(err).splitlines()[0][:120]})", "write postgresql://USER:PASSWORD@HOST:5432/DB"
    if parsed.get_backend_name() != "postgresql":
        return (f"a {parsed.get_backend_name()} URL: a shared workspace is a PostgreSQL database",
                "write postgresql://USER:PASSWORD@HOST:5432/DB, or give a folder for a local SQLite workspace")
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        return "the PostgreSQL driver (psycopg) is not installed", PG_INSTALL
    return None


def lock_key(*parts: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, from names (the schema keeps tests and tenants apart)."""
    return int.from_bytes(hashlib.blake2b(":".join(parts).encode(), digest_size=8).digest(), "big", signed=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# A PostgreSQL server restarting (seconds) or a short network cut is waited for: each store call (one
# transaction, safe to run again) is retried with backoff for up to DB_RETRY_S; longer is an outage,
# said in one line (exit 1). Finished runs are committed already; the one in hand is not stored finished.
DB_RETRY_S = 60.0
LOCK_CHECK_S = 5.0  # how often a held advisory lock's connection is checked (and the lock taken again if lost)


def unreachable(err: BaseException) -> bool:
    """Whether a database error is the server or network being away (worth waiting for), not the query."""
    return isinstance(err, (OperationalError, InterfaceError))


def with_db_retries(call, where: str, transient=unreachable):
    """call() retried with backoff while `transient(error)`, for up to DB_RETRY_S; then one WorkspaceError."""
    deadline, pause = time.monotonic() + DB_RETRY_S, 0.5
    while True:
        try:
            return call()
        except Exception as err:
            if not transient(err):
                raise
            if time.monotonic() + pause > deadline:
                cause = getattr(err, "orig", None) or err.__cause__ or err
                first = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(err).__name__])[0]
                raise WorkspaceError(
                    f"workspace {where}: the database did not answer for {DB_RETRY_S:.0f} s ({first[:160]})",
                    [Problem("workspace", "database unreachable", where,
                             "start the database server again (or mend the network), then run the same command "
                             "again; finished runs are kept, and a run cut short is not stored as finished")]) from None
            time.sleep(pause)
            pause = min(pause * 2, 8.0)


def _db_retried(method):
    """A Store method retried while a PostgreSQL workspace's server cannot be reached (SQLite: as is)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.url is None:
            return method(self, *args, **kwargs)
        return with_db_retries(lambda: method(self, *args, **kwargs), self.where)

    return call


class _LockKeeper(threading.Thread):
    """Keeps a session advisory lock through a database restart: the lock dies with its connection, so its
    connection is checked every LOCK_CHECK_S and, once the server is back, the lock is taken again on a
    new one (else `doctor --repair` or another host would take a live run for a dead one)."""

    def __init__(self, engine, key: int, conn):
        super().__init__(daemon=True, name="loralab-lock-keeper")
        self.engine, self.key, self.conn = engine, key, conn
        self.done = threading.Event()
        self.retaken = 0  # times the lock was taken again
        self.lost = False  # another session took it while the server was away
        self.replacement = None

    def run(self) -> None:
        while not self.done.wait(LOCK_CHECK_S):
            try:
                self.conn.execute(text("SELECT 1"))
            except Exception:
                self._retake()

    def _retake(self) -> None:
        pause = 0.2
        while not self.done.is_set():
            try:
                conn = self.engine.connect()
            except Exception:
                self.done.wait(pause)
                pause = min(pause * 2, 4.0)
                continue
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar():
                if self.replacement is not None:
                    self.replacement.close()
                self.conn = self.replacement = conn
                self.retaken += 1
                return
            conn.close()
            self.lost = True  # someone else holds it now: nothing to take back
            return

    def stop(self) -> None:
        """Release the lock now: left to the connection's close, the server frees it only once it has seen
        the socket go, so a reader of pg_locks (`in_progress`, another host's try) could still find it held."""
        self.done.set()
        self.join()
        try:
            self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        except Exception:  # the connection is gone (a server restart): so is its lock
            pass
        if self.replacement is not None:
            try:
                self.replacement.close()
            except Exception:
                pass


class _Base(DeclarativeBase):
    pass


class Damaged:
    """A column value that cannot be read back (not JSON): kept as its raw text, so one bad row is
    reported by `loralab doctor` instead of crashing every command that lists runs."""

    def __init__(self, raw: object):
        self.raw = raw

    def __repr__(self) -> str:
        return f"Damaged({str(self.raw)[:40]!r})"


class JSON(TypeDecorator):
    """JSON in a text column, as SQLAlchemy's JSON stores it on SQLite, read leniently (see Damaged)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return json.dumps(value)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        try:
            return json.loads(value)
        except (TypeError, ValueError, RecursionError):
            return Damaged(value)


class When(TypeDecorator):
    """A UTC time in a text column, in SQLAlchemy's own SQLite format, read leniently (see Damaged)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, dt.datetime) else value

    def process_result_value(self, value, dialect):
        if value is None or isinstance(value, dt.datetime):
            return value
        try:
            return dt.datetime.fromisoformat(str(value))
        except ValueError:
            return Damaged(value)


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
    created_at: Mapped[dt.datetime] = mapped_column(When, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(When, default=_now, onupdate=_now)
    # What the adapter is (see adapter_identity); schema 3. Deferred, so a schema-2 workspace opened
    # read-only, which lacks the column, still reads: only Store.adapter_runs asks for it.
    adapter_id: Mapped[str | None] = deferred(mapped_column(String(32), nullable=True, index=True))


class AliasRow(_Base):
    """A run name (and seed) in an experiment points at a run id; two names with one config share one run."""

    __tablename__ = "aliases"

    experiment: Mapped[str] = mapped_column(String(256), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    seed: Mapped[int] = mapped_column(primary_key=True, default=-1)  # -1: base (no seed)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(When, default=_now, onupdate=_now)


class StepRow(_Base):
    """One optimizer step of a run's training curve, written while it trains (schema 4): a watcher
    sees the curve grow, and a run that crashes keeps all of it but the last few seconds. A finished
    run's curve moves into its row and these are deleted in the same transaction."""

    __tablename__ = "steps"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)  # NaN is stored as NULL
    grad_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    lr: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the steps planned (for an ETA)




@dataclass(frozen=True)
class RunRecord:
    """A run as read from the store: plain data, detached from the database session. Frozen: a caller
    that needs it changed makes a copy (`dataclasses.replace`); writes go through the Store."""

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

    damaged: list[str] = field(default_factory=list)  # what of its row cannot be read (see `loralab doctor`)

    @classmethod
    def from_row(cls, row: RunRow, name: str | None = None, skip: tuple[str, ...] = (),
                 alias: AliasRow | None = None) -> "RunRecord":
        """`skip`: columns left unread (deferred by the query), given as empty; `alias`: the name the run
        was read under (its experiment and seed are the record's)."""
        damaged = []

        def read(col: str, empty: Any) -> Any:
            if col in skip:
                return empty
            v = getattr(row, col)
            ok = isinstance(v, type(empty))
            if v is not None and not ok:
                damaged.append(f"{col} is not " + ("readable JSON" if isinstance(v, Damaged) else f"a JSON {type(empty).__name__}"))
            return v if ok else empty

        fields = {c: read(c, {}) for c in ("config", "model", "data", "metrics", "curves", "env", "timings")}
        fields["samples"] = read("samples", [])
        seed = row.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            damaged.append(f"seed {str(seed)[:40]!r} is not a whole number")
            seed = None
        when = {}
        for col in ("created_at", "updated_at"):
            v = getattr(row, col)
            if isinstance(v, Damaged):
                damaged.append(f"{col} {str(v.raw)[:40]!r} is not a time")
            when[col] = v.isoformat(timespec="seconds") if isinstance(v, dt.datetime) else ""
        status = row.status
        if status not in STATUSES:
            damaged.append(f"status {str(status)[:40]!r} is not one of {', '.join(STATUSES)}")
        experiment = row.experiment
        if alias is not None:
            name, experiment, seed = alias.name, alias.experiment, None if alias.seed == -1 else alias.seed
        return cls(id=row.id, name=name or row.name, experiment=experiment, kind=row.kind,
                   status="damaged" if damaged else status, seed=seed, **fields,
                   adapter_path=row.adapter_path, error=row.error, **when, damaged=damaged)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "seed": self.seed, "experiment": self.experiment,
                "kind": self.kind, "status": self.status, "updated_at": self.updated_at}


def adapter_identity(config: Any, model: Any, data: Any) -> str | None:
    """The id of a LoRA run's adapter, from what its row stores: base model, data, system prompt,
    LoRA and train settings (seed included), resolved target modules, device kind and dtype (a CPU
    fp32 adapter is not a GPU bf16 one). Eval caps and evaluation and generation settings are not
    in it: runs that differ only there share one adapter, which is evaluated again, not retrained.
    None when the row lacks a part (a damaged or hand-made row), so it is never taken for another."""
    try:
        parts = {"model": model["fingerprint"], "data": data["fingerprint"], "system_prompt": data.get("system_prompt"),
                 "device": str(config["device"]).split(":")[0], "dtype": config["dtype"], "lora": config["lora"],
                 "train": config["train"], "targets": config["resolved_target_modules"]}
    except (KeyError, TypeError, AttributeError):
        return None
    return "adapter-" + config_hash(parts)


def _unfinished_creation(conn) -> bool:
    """Whether a schema-0 SQLite database is a creation cut short: only loralab's own tables, all empty
    (nothing a finished creation, another program or a user could have put there)."""
    names = [r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")]
    ours = set(_Base.metadata.tables)
    return all(n in ours for n in names) and not any(
        conn.exec_driver_sql(f'SELECT 1 FROM "{n}" LIMIT 1').first() for n in names)


def _migrate(conn, version: int) -> None:
    """Bring a schema-2 database to this version in place, in the caller's transaction.

    2 -> 3: the runs table gains adapter_id, filled for old LoRA rows from their stored config, so their
    adapters are evaluated again under new settings instead of retrained; a row whose config cannot
    give it (damaged) keeps NULL and is simply never reused that way.
    3 -> 4: the steps table (streamed curves); create_all adds it, nothing to fill."""
    if version == 2:
        # pysqlite may commit DDL on its own: a crash after this line leaves schema 2 with the column, so check
        if "adapter_id" not in {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(runs)")}:
            conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN adapter_id VARCHAR(32)")
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_runs_adapter_id ON runs (adapter_id)")
        rows = conn.exec_driver_sql("SELECT id, config, model, data FROM runs WHERE kind = 'lora'").fetchall()
        for rid, *cols in rows:
            try:
                aid = adapter_identity(*(json.loads(c) for c in cols))
            except (TypeError, ValueError, RecursionError):
                aid = None
            if aid is not None:
                conn.exec_driver_sql("UPDATE runs SET adapter_id = ? WHERE id = ?", (aid, rid))


class Store:
    """All reads and writes of a workspace go through here: a SQLite folder or a PostgreSQL database
    (several hosts), and the run folders beside it (`run_dir`: the folder, or `artifacts:`).

    The contract, for callers and for another backend:

    - Open it as a context manager (`with Store(ws) as store:`), or call `close()`: either releases its
      connections. Nothing else is held between calls: every method opens and ends its own transaction.
    - Writes are atomic, one transaction each. `start` makes a run `running` (resetting an earlier
      attempt's results; a resumed run keeps its streamed steps up to its checkpoint); `finish` writes
      results and a terminal status (DONE) together, so no run is ever finished without its metrics;
      `mark` changes only status and error; `append_steps` adds streamed steps, each step once.
    - Safe across processes and hosts: SQLite in WAL mode waits on a lock rather than failing, and
      `run_lock`/`named_lock` is the one exclusive lock every process of the workspace sees. One Store
      may be shared by threads (the executor's slots share one): each call has a session of its own.
    - Reads return RunRecords: plain data, detached from the database, never refreshed, and frozen (a
      caller wanting another value makes a copy with `dataclasses.replace`; their dicts are not to be
      changed either). Changing one changes nothing stored: write through `finish`, `mark`, `alias`, ...
    - A row that cannot be read comes back with status "damaged" and `damaged` saying why, never as an
      exception; the store never deletes a run's files (that is `doctor --repair`'s, under the run's lock).
    """

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __init__(self, root: str | Path, create: bool = True, artifacts: str | Path | None = None):
        """`root`: a folder (SQLite) or a PostgreSQL URL; `artifacts`: the run folders' folder of a URL
        workspace (read from the database when omitted; required the first time)."""
        self.url: str | None = None  # the PostgreSQL URL, or None for a SQLite folder
        self._steps_seen = False  # see _has_steps
        if is_url(root):
            self._open_pg(str(root), create, artifacts)
            return
        self.root = Path(root)
        self.where = str(self.root)
        db = self.root / DB_NAME
        if not create and self.root.exists() and not self.root.is_dir():
            raise RunNotFound(f"workspace {self.root} is a file, not a folder",
                              [Problem("workspace", "a file, not a folder", str(self.root),
                                       "pass --workspace the folder loralab created (it holds loralab.db)")])
        if not create and not db.is_file():
            raise RunNotFound(f"no loralab workspace at {self.root}",
                              [Problem("workspace", "no loralab.db in this folder", str(self.root),
                                       "run an experiment first, or pass --workspace DIR")])
        try:
            if create:
                (self.root / "runs").mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(f"sqlite:///{db}", future=True)

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _):  # WAL: readers never block the writer; wait on locks instead of failing
                cur = conn.cursor()
                cur.execute("PRAGMA busy_timeout=30000")  # first: switching to WAL itself may wait on a lock
                cur.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit survives a power cut too; one fsync per run written costs nothing next to training
                cur.execute("PRAGMA synchronous=FULL")
                cur.close()

            with self.engine.connect() as conn:
                version = conn.exec_driver_sql("PRAGMA user_version").scalar()
                has_tables = conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE type='table'").scalar()
                unfinished = has_tables and version == 0 and _unfinished_creation(conn)
        except (OSError, DatabaseError) as err:
            raise storage_error(err, self.root, opening=True) or err from None
        if unfinished:  # pysqlite commits each CREATE TABLE: a crash or full disk mid-creation left some
            if not create:
                self.engine.dispose()
                raise RunNotFound(f"workspace {self.root} was never completely created (its tables are partly made "
                                  "and empty: a full disk or a crash while it was set up)",
                                  [Problem("workspace", "incompletely created, holds no runs", str(self.root / DB_NAME),
                                           "run an experiment with this --workspace: it finishes creating it")])
            has_tables = 0  # nothing in it to keep: created as new below
        if has_tables and version not in READABLE:
            self.engine.dispose()
            raise RunNotFound(f"workspace {self.root} was written by another loralab version (schema {version}, "
                              f"this one reads {SCHEMA_VERSION})",
                              [Problem("workspace", "incompatible database schema", str(self.root / DB_NAME),
                                       "use a new --workspace folder, or the loralab version that wrote it")])
        if create:
            try:
                # Two processes starting on a new workspace would both find no tables and both create them.
                with file_lock(self.root / LOCKS / "schema.lock"):
                    with self.engine.begin() as conn:
                        version = conn.exec_driver_sql("PRAGMA user_version").scalar()  # again, under the lock
                        if has_tables and version != SCHEMA_VERSION:
                            _migrate(conn, version)
                        _Base.metadata.create_all(conn)
                        conn.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")
            except (OSError, DatabaseError) as err:
                self.engine.dispose()
                raise storage_error(err, self.root, opening=True) or err from None

    def _open_pg(self, url: str, create: bool, artifacts: str | Path | None) -> None:
        """Open (and with `create`, set up) a PostgreSQL workspace; its schema version and artifacts
        folder live in the loralab_meta table, written under an advisory lock so two hosts starting
        at once create the tables once."""
        from sqlalchemy.pool import NullPool

        self.url, self.where = url, shown(url)
        self._keepers: dict[str, _LockKeeper | None] = {}  # named locks held now (see _LockKeeper)
        bad = url_problem(url)
        if bad is not None:
            raise SpecError(f"workspace {self.where}: {bad[0]}", [Problem("workspace", bad[0], self.where, bad[1])])
        self.engine = create_engine(engine_url(url), future=True, pool_pre_ping=True)
        # Locks each hold a connection of their own, closed (not pooled) when released: a lock can never
        # outlive its holder in a pooled connection, and a dead process's locks die with its socket.
        self.lock_engine = create_engine(engine_url(url), future=True, poolclass=NullPool,
                                         isolation_level="AUTOCOMMIT")
        try:
            with self.engine.connect() as conn:
                self.schema = conn.execute(text("SELECT current_schema()")).scalar() or "public"
                has_meta = inspect(conn).has_table(META_TABLE.name)
                meta = dict(conn.execute(select(META_TABLE.c.key, META_TABLE.c.value)).all()) if has_meta else {}
            if not has_meta and not create:
                raise RunNotFound(f"no loralab workspace in {self.where}",
                                  [Problem("workspace", "no loralab tables in this database", self.where,
                                           "run an experiment or sweep with this workspace first")])
            version = int(meta.get("schema_version", SCHEMA_VERSION))
            if version not in READABLE:
                raise RunNotFound(f"workspace {self.where} was written by another loralab version (schema {version}, "
                                  f"this one reads {SCHEMA_VERSION})",
                                  [Problem("workspace", "incompatible database schema", self.where,
                                           "use another database (or schema), or the loralab version that wrote it")])
            where = meta.get("artifacts")
            if artifacts is None and where is None:
                raise SpecError(f"workspace {self.where} has no artifacts folder for its adapters",
                                [Problem("artifacts", "missing: a database workspace keeps adapters in a "
                                         "folder every host can read", None,
                                         "add `artifacts: /shared/loralab-artifacts` (a folder every host "
                                         "mounts at that path) to the experiment file", False)])
            self.root = Path(artifacts if artifacts is not None else where).expanduser().resolve()
            if where is not None and Path(where) != self.root:  # doctor and every host look for adapters there
                raise SpecError(f"workspace {self.where} keeps its adapters in {where}, not {self.root}",
                                [Problem("artifacts", "not the folder this workspace was created with", str(artifacts),
                                         f"use `artifacts: {where}` (the same path on every host), or leave it out")])
            if create:
                (self.root / "runs").mkdir(parents=True, exist_ok=True)
                with self.engine.begin() as conn:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(self.schema, "schema")})
                    _Base.metadata.create_all(conn)
                    META.create_all(conn)
                    have = dict(conn.execute(select(META_TABLE.c.key, META_TABLE.c.value)).all())
                    # An older readable version needs nothing but create_all's new tables (PostgreSQL
                    # workspaces began at schema 3, after the one migration with data to fill).
                    conn.execute(META_TABLE.delete().where(META_TABLE.c.key == "schema_version"))
                    conn.execute(META_TABLE.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                    if "artifacts" not in have:
                        conn.execute(META_TABLE.insert().values(key="artifacts", value=str(self.root)))
        except OperationalError as err:
            self.close()
            first = str(getattr(err, "orig", None) or err).strip().splitlines()
            raise WorkspaceError(f"workspace {self.where}: cannot reach the database ({first[0] if first else err})",
                                 [Problem("workspace", "database unreachable", self.where,
                                          "check the host, port, user, password and database name, and that the "
                                          "server is running")]) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for engine in (getattr(self, "engine", None), getattr(self, "lock_engine", None)):
            if engine is not None:
                engine.dispose()

    def study_url(self) -> str | None:
        """default_study_url of this workspace once a sweep made its study database; None before, so
        that reading it (doctor, the dashboard) never creates one."""
        if self.url is None:
            return default_study_url(self.root) if (self.root / OPTUNA_DB).is_file() else None
        with self.engine.connect() as conn:
            return default_study_url(self.url) if inspect(conn).has_table("studies") else None

    @property
    def location(self) -> tuple[str, str | None]:
        """What another process (a Ray actor) passes to Store to open this workspace: (folder or URL, artifacts)."""
        return (self.url, str(self.root)) if self.url else (str(self.root), None)

    @contextmanager
    def named_lock(self, name: str, *, blocking: bool = True, on_wait=None):
        """An exclusive lock every process of this workspace sees (hosts too, on PostgreSQL); yields
        whether it was taken. SQLite: locks/NAME.lock in the folder."""
        if self.url is None:
            with file_lock(self.root / LOCKS / f"{name}.lock", blocking=blocking, on_wait=on_wait) as taken:
                yield taken
            return
        key = lock_key(self.schema, name)
        with self.lock_engine.connect() as conn:  # closed on exit, which also releases the lock
            taken = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            if not taken and blocking:
                if on_wait is not None:
                    on_wait()
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                taken = True
            keeper = _LockKeeper(self.lock_engine, key, conn) if taken else None
            if keeper is not None:
                keeper.start()
            self._keepers[name] = keeper
            try:
                yield taken
            finally:
                self._keepers.pop(name, None)
                if keeper is not None:
                    keeper.stop()

    @_db_retried
    def _held(self, name: str) -> bool:
        """Whether another process (or another connection of this one) holds `named_lock(name)` now."""
        if self.url is None:
            return is_locked(self.root / LOCKS / f"{name}.lock")
        # Read from pg_locks rather than tried: a try would hold the lock for a moment, and a non-blocking
        # taker (doctor --repair, a second worker) could then find it taken by nobody at work.
        key = lock_key(self.schema, name)
        with self.engine.connect() as conn:
            return bool(conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND classid::bigint = :hi AND objid::bigint = :lo"),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).scalar())

    # -- writes ---------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def run_lock(self, run_id: str, *, blocking: bool = True, on_wait=None):
        """Held while a run is trained or repaired: a second process wanting the same run waits,
        then finds it stored; a `running` row whose lock is free was left by a dead process."""
        return self.named_lock(run_id, blocking=blocking, on_wait=on_wait)

    def in_progress(self, run_id: str) -> bool:
        """Whether a live process holds the run's lock (is training or storing it now)."""
        return self._held(run_id)

    @_db_retried
    def start(self, run_id: str, *, name: str, experiment: str, kind: str, config: dict, model: dict,
              data: dict, env: dict, seed: int | None = None, resume_from: int | None = None) -> None:
        """Mark a run as running (replacing any unfinished or forced earlier attempt). `resume_from`: the
        step of the checkpoint the run continues from; its streamed curve up to that step is kept."""
        with Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            if row is None:
                row = RunRow(id=run_id)
                s.add(row)
            row.name, row.experiment, row.kind, row.status, row.seed = name, experiment, kind, Status.RUNNING, seed
            row.config, row.model, row.data, row.env = config, model, data, env
            row.metrics, row.curves, row.samples = {}, {}, []
            row.timings = {"resumed_at": [resume_from]} if resume_from else {}  # the whole list comes with finish
            row.adapter_path, row.error = None, None
            row.adapter_id = adapter_identity(config, model, data) if kind == "lora" else None
            self._alias(s, experiment, name, run_id, seed)
            # An earlier attempt's partial curve; a resumed run keeps it up to its checkpoint.
            s.execute(delete(StepRow).where(StepRow.run_id == run_id, StepRow.step > (resume_from or 0)))

    @_db_retried
    def append_steps(self, run_id: str, steps: list[dict]) -> None:
        """Add streamed training steps (dicts with CURVE_KEYS) to a running run's curve, in one transaction."""
        if not steps:
            return
        with Session(self.engine) as s, s.begin():  # one INSERT for the batch (a step is sent once)
            # a retry after a commit whose answer was lost (see _db_retried) must not insert the steps twice
            if self.url is not None:
                s.execute(delete(StepRow).where(StepRow.run_id == run_id, StepRow.step.in_([one["step"] for one in steps])))
            s.execute(insert(StepRow), [{"run_id": run_id, "total": one.get("total"),
                                         **{k: _finite(one.get(k)) for k in CURVE_KEYS}} for one in steps])

    @_db_retried
    def finish(self, run_id: str, *, metrics: dict, curves: dict, samples: list, timings: dict,
               adapter_path: str | None, status: str = Status.FINISHED, error: str | None = None) -> None:
        """Store results and the terminal status in one transaction."""
        assert status in DONE
        # a Ctrl-C or SIGTERM meanwhile waits for the commit: a run whose results exist is not lost to it
        with held(), Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            row.metrics, row.curves, row.samples, row.timings = metrics, curves, samples, timings
            row.adapter_path, row.error = adapter_path, error
            row.status = status
            s.execute(delete(StepRow).where(StepRow.run_id == run_id))  # the curve is in the row now
            s.flush()
            fault_point("store.finish")  # a crash here rolls the whole result back: never finished without metrics

    @_db_retried
    def mark(self, run_id: str, status: str, error: str | None = None) -> str | None:
        """Set a run's status and return the one it has now (None: no such run). `interrupted` never
        replaces a terminal one: a stop that waited for a run's results to be committed (interrupts.held)
        leaves that run stored as it ended."""
        assert status in STATUSES
        with Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            if row is None:
                return None
            if not (status == Status.INTERRUPTED and row.status in DONE):
                row.status = status
                row.error = error
            return row.status

    @_db_retried
    def set_adapter_path(self, run_id: str, path: str | None) -> None:
        """Point a run at its adapter again (a workspace moved or copied elsewhere keeps absolute paths)."""
        with Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            if row is not None:
                row.adapter_path = path

    @_db_retried
    def drop_alias(self, experiment: str, name: str, seed: int | None) -> None:
        with Session(self.engine) as s, s.begin():
            a = s.get(AliasRow, (experiment, name, -1 if seed is None else seed))
            if a is not None:
                s.delete(a)

    @_db_retried
    def drop_aliases(self, experiment: str, name: str) -> None:
        """Every seed of a name."""
        with Session(self.engine) as s, s.begin():
            for a in s.scalars(select(AliasRow).where(AliasRow.experiment == experiment, AliasRow.name == name)):
                s.delete(a)

    @_db_retried
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

    @_db_retried
    def get(self, run_id: str) -> RunRecord | None:
        with Session(self.engine) as s:
            row = s.get(RunRow, run_id)
            return RunRecord.from_row(row) if row else None

    @_db_retried
    def live_curve(self, run_id: str) -> dict[str, list]:
        """A run's training curve as far as it got: streamed steps while it trains (or where it stopped,
        if it crashed or was interrupted), with `planned` steps, else the curve stored with its result."""
        with Session(self.engine) as s:
            if self._has_steps(s):
                rows = s.scalars(select(StepRow).where(StepRow.run_id == run_id).order_by(StepRow.step)).all()
                if rows:
                    return {**{k: [float("nan") if getattr(r, k) is None else getattr(r, k) for r in rows]
                               for k in CURVE_KEYS}, "planned": rows[-1].total}
            row = s.get(RunRow, run_id)
            curves = row.curves if row is not None else None
            return {k: list(curves.get(k, [])) for k in CURVE_KEYS} if isinstance(curves, dict) else {}

    @_db_retried
    def last_steps(self, run_ids: list[str]) -> dict[str, dict]:
        """The newest streamed step of each run (CURVE_KEYS and `total`), in one query: a run's progress
        without reading its whole curve."""
        with Session(self.engine) as s:
            if not run_ids or not self._has_steps(s):
                return {}
            newest = (select(StepRow.run_id, func.max(StepRow.step).label("step"))
                      .where(StepRow.run_id.in_(run_ids)).group_by(StepRow.run_id).subquery())
            rows = s.scalars(select(StepRow).join(newest, (StepRow.run_id == newest.c.run_id)
                                                  & (StepRow.step == newest.c.step))).all()
            return {r.run_id: {k: getattr(r, k) for k in (*CURVE_KEYS, "total")} for r in rows}

    def _has_steps(self, s: Session) -> bool:
        """Whether the steps table exists: a schema-3 workspace opened read-only has none. Asked of the
        database until it says yes (a later writer may add it), then remembered."""
        if not self._steps_seen:
            self._steps_seen = inspect(s.connection()).has_table(StepRow.__tablename__)
        return self._steps_seen

    def _with_partial_curves(self, records: list[RunRecord]) -> list[RunRecord]:
        """Runs still training, or cut short, get the curve streamed so far (finished ones have theirs)."""
        return [replace(r, curves=self.live_curve(r.id))
                if r.status not in DONE and not r.damaged and not r.curves.get("step") else r for r in records]

    @_db_retried
    def adapter_runs(self, adapter_id: str) -> list[RunRecord]:
        """Finished and diverged runs of one adapter (see adapter_identity), newest first."""
        with Session(self.engine) as s:
            q = (select(RunRow).where(RunRow.adapter_id == adapter_id, RunRow.status.in_(REUSED))
                 .order_by(RunRow.updated_at.desc()))
            return [RunRecord.from_row(row) for row in s.scalars(q)]

    @_db_retried
    def all_runs(self, light: bool = False) -> list[RunRecord]:
        """Every run row once, named as stored (no alias join): what `loralab doctor` checks. `light`: as
        in `list`, without samples and curves."""
        skip = ("samples", "curves") if light else ()
        q = select(RunRow).order_by(RunRow.id)
        if light:
            q = q.options(defer(RunRow.samples), defer(RunRow.curves))
        with Session(self.engine) as s:
            return [RunRecord.from_row(row, skip=skip) for row in s.scalars(q)]

    @_db_retried
    def alias_rows(self) -> list[tuple[str, str, int | None, str]]:
        """(experiment, name, seed, run id) of every name in the workspace."""
        with Session(self.engine) as s:
            return [(a.experiment, a.name, None if a.seed == -1 else a.seed, a.run_id)
                    for a in s.scalars(select(AliasRow))]

    @_db_retried
    def list(self, experiment: str | None = None, light: bool = False) -> list[RunRecord]:
        """Every run, one record per (experiment, name) alias, newest first. `light`: without samples
        and curves (the bulk of a row), for what polls the list (the dashboard)."""
        skip = ("samples", "curves") if light else ()
        with Session(self.engine) as s:
            q = select(AliasRow, RunRow).join(RunRow, RunRow.id == AliasRow.run_id)
            if light:
                q = q.options(defer(RunRow.samples), defer(RunRow.curves))
            if experiment:
                q = q.where(AliasRow.experiment == experiment)
            rows = s.execute(q.order_by(RunRow.updated_at.desc(), AliasRow.name)).all()
            return [RunRecord.from_row(row, skip=skip, alias=alias) for alias, row in rows]

    def find(self, ref: str, experiment: str | None = None) -> RunRecord:
        """One run: the first seed of `group(ref)`."""
        return self.group(ref, experiment)[0]

    def readable_group(self, ref: str) -> list[RunRecord]:
        """`group(ref)`, refusing a run whose row is damaged (what show and compare need to read)."""
        group = self.group(ref)
        bad = next((r for r in group if r.damaged), None)
        if bad is not None:
            raise WorkspaceError(f"run {ref!r} ({bad.id}) in workspace {self.where} cannot be read: {bad.damaged[0]}",
                                 [Problem("run", "its database row is damaged", ref,
                                          "`loralab doctor` reports it; run its experiment again, which trains "
                                          "and stores it anew")])
        return group

    def group(self, ref: str, experiment: str | None = None) -> list[RunRecord]:
        """A run by name with all its seeds (from the newest experiment using the name), by
        `experiment/name`, or one run by id prefix."""
        if "/" in ref and experiment is None:
            experiment, ref = ref.rsplit("/", 1)
        runs = self.list(experiment)
        by_name = [r for r in runs if r.name == ref]
        if not by_name and experiment is not None and not runs:  # `exp/name` of an experiment the workspace lacks
            known = sorted({r.experiment for r in self.list()})
            raise RunNotFound(f"no experiment {experiment!r} in workspace {self.where}",
                              [Problem("run", "unknown experiment", f"{experiment}/{ref}",
                                       f"use one of: {', '.join(known)}" if known else "run an experiment first")])
        if by_name:
            done = [r for r in by_name if r.status in DONE] or by_name
            exp = done[0].experiment  # newest first
            return self._with_partial_curves(sorted((r for r in by_name if r.experiment == exp),
                                                    key=lambda r: (r.seed is None, r.seed or 0)))
        by_id = {r.id: r for r in runs if r.id.startswith(ref)}
        if len(by_id) == 1:
            return self._with_partial_curves([next(iter(by_id.values()))])
        names = sorted({f"{r.name}" for r in runs}) or sorted({r.name for r in self.list()})
        raise RunNotFound(f"no run {ref!r} in workspace {self.where}",
                          [Problem("run", "unknown run name or id", ref,
                                   f"use one of: {', '.join(names) if names else '(none yet: run an experiment first)'}")])



def _finite(v: Any) -> Any:
    """None for NaN (SQLite has no NaN; PostgreSQL would keep it, so both read back the same)."""
    return None if isinstance(v, float) and v != v else v


def storage_error(err: BaseException, root: Path | str, opening: bool = False) -> WorkspaceError | None:
    """The user-facing error for a failure of the disk or database under the workspace, or None
    when `err` is something else (a bug, a bad tensor) that should surface as it is. `opening`:
    the workspace folder itself is being created, so a missing or non-folder path is its fault too."""
    import errno as errno_mod

    from sqlalchemy.exc import DatabaseError as SADatabaseError

    kept = "; finished runs are kept, and a run cut short is not stored as finished"
    text = str(getattr(err, "orig", None) or err)
    low = text.lower()
    if isinstance(err, OSError) and err.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT) or (
            isinstance(err, SADatabaseError) and "disk is full" in low):
        what, fix = "the disk is full", "free some space (or use a --workspace on another disk) and run the same command again" + kept
    elif isinstance(err, OSError) and err.errno in (errno_mod.EROFS, errno_mod.EACCES, errno_mod.EPERM) or (
            isinstance(err, SADatabaseError) and any(m in low for m in ("readonly database", "unable to open database"))):
        what, fix = "the workspace is not writable", "use a --workspace folder you can write to" + kept
    elif opening and isinstance(err, OSError) and err.errno in (errno_mod.ENOTDIR, errno_mod.EEXIST, errno_mod.ENOENT):
        what, fix = "the workspace path is not a folder loralab can create", "give --workspace a folder (new or existing), not a file"
    elif isinstance(err, SADatabaseError) and any(m in low for m in ("not a database", "malformed", "disk i/o error")):
        what, fix = f"{DB_NAME} is not a readable loralab database", ("restore it from a backup, or use another "
                                                                       "--workspace (`loralab doctor` says more)")
    else:
        return None
    return WorkspaceError(f"workspace {shown(root)}: {what} ({text.splitlines()[0] if text else type(err).__name__})",
                          [Problem("workspace", what, shown(root), fix)])
