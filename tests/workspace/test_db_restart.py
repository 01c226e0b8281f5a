"""A PostgreSQL workspace through a database restart, on a private server this module starts, stops and
starts again itself (127.0.0.1, a temporary folder): store calls wait and retry with backoff, then give up
in one line; a run's advisory lock and a sweep trial's Optuna heartbeat are taken up again once the server
is back. Skipped only where no PostgreSQL binaries are installed and CI does not require them."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from loralab.errors import WorkspaceError
from loralab.workspace import store as store_mod
from loralab.workspace.store import Store


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary folder, on a free port of 127.0.0.1 (as .ci/run starts one)."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in p.split("/")[-2].split(".") if x.isdigit()])
        if not bins:
            if os.environ.get("LORALAB_REQUIRE_PG") == "1" or os.environ.get("CI"):
                pytest.fail("PostgreSQL binaries are required here: apt-get install postgresql")
            pytest.skip("no PostgreSQL binaries (apt-get install postgresql)")
        self.bin = bins[-1]
        self.dir = tempfile.mkdtemp(prefix="loralab-pg-restart-")
        self.root = os.getuid() == 0  # initdb refuses root: run the server as the postgres user
        if self.root:
            shutil.chown(self.dir, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.pg(f"{self.bin}/initdb -D {self.dir}/data -A trust -U loralab")
        self.start()
        self.pg(f"{self.bin}/createdb -h 127.0.0.1 -p {self.port} -U loralab restart_test")
        self.url = f"postgresql://loralab@127.0.0.1:{self.port}/restart_test"

    def pg(self, cmd: str) -> None:
        argv = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if self.root else ["sh", "-c", cmd]
        subprocess.run(argv, cwd="/", check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self.pg(f"{self.bin}/pg_ctl -D {self.dir}/data -l {self.dir}/log -w -t 30 "
                f"-o '-h 127.0.0.1 -p {self.port} -k {self.dir}' start")

    def stop(self) -> None:
        self.pg(f"{self.bin}/pg_ctl -D {self.dir}/data -m fast -w -t 30 stop")

    def restart_after(self, seconds: float) -> threading.Thread:
        """Stop now; start again `seconds` later, in a thread (the caller's database calls meanwhile fail)."""
        self.stop()
        t = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), daemon=True)
        t.start()
        return t

    def close(self) -> None:
        try:
            self.pg(f"{self.bin}/pg_ctl -D {self.dir}/data -m immediate stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    pg = PrivatePostgres()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def url(server):
    """A schema of its own per test (as conftest's pg_url): tests never see each other's runs."""
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(store_mod.engine_url(server.url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    return f"{server.url}?options=-csearch_path%3D{schema}"


def until(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def start(store, rid, name="A"):
    store.start(rid, name=name, experiment="e", kind="lora", config={"lora": {"r": 4}}, model={}, data={}, env={})


def test_a_store_call_during_a_restart_waits_for_the_server_and_loses_nothing(server, url, tmp_path):
    store = Store(url, artifacts=tmp_path / "art")
    try:
        start(store, "r1")
        store.append_steps("r1", [{"step": 1, "loss": 2.0}])
        back = server.restart_after(3.0)  # a 3 s restart, as the issue measured
        store.append_steps("r1", [{"step": 2, "loss": 1.5}])  # waits, then goes in once
        store.finish("r1", metrics={"eval_loss": 1.0}, curves={"step": [1, 2], "loss": [2.0, 1.5]}, samples=[],
                     timings={}, adapter_path=None)
        back.join()
        rec = store.get("r1")
        assert rec.status == "finished" and rec.metrics == {"eval_loss": 1.0} and rec.curves["step"] == [1, 2]
    finally:
        store.close()


def test_an_outage_longer_than_the_retries_is_one_line_and_keeps_what_was_stored(server, url, tmp_path, monkeypatch):
    store = Store(url, artifacts=tmp_path / "art")
    try:
        start(store, "r2")
        store.finish("r2", metrics={"eval_loss": 1.0}, curves={}, samples=[], timings={}, adapter_path=None)
        start(store, "r3")
        monkeypatch.setattr(store_mod, "DB_RETRY_S", 2.0)
        server.stop()
        try:
            t0 = time.monotonic()
            with pytest.raises(WorkspaceError) as info:
                store.finish("r3", metrics={"eval_loss": 2.0}, curves={}, samples=[], timings={}, adapter_path=None)
            assert time.monotonic() - t0 < 20  # bounded: DB_RETRY_S and the last pause, not for ever
        finally:
            server.start()
        assert info.value.exit_code == 1 and "the database did not answer for 2 s" in str(info.value)
        assert len(info.value.args[0].splitlines()) == 1 and "run the same command again" in info.value.problems[0].fix
        assert store.get("r2").status == "finished" and store.get("r3").status == "running"  # nothing lost or faked
    finally:
        store.close()


def test_retries_back_off_and_stop_at_the_first_success(server, url, tmp_path, monkeypatch):
    """An injected failure: the first two calls fail as a dropped connection does; the third goes through."""
    from sqlalchemy.exc import OperationalError

    store = Store(url, artifacts=tmp_path / "art")
    try:
        start(store, "r4")
        real, calls, pauses = Store.mark.__wrapped__, [], []

        def flaky(self, *a, **k):
            calls.append(1)
            if len(calls) <= 2:
                raise OperationalError("UPDATE runs", {}, Exception("server closed the connection unexpectedly"))
            return real(self, *a, **k)

        monkeypatch.setattr(Store, "mark", store_mod._db_retried(flaky))
        monkeypatch.setattr(store_mod.time, "sleep", pauses.append)
        store.mark("r4", "interrupted", "x")
        assert len(calls) == 3 and pauses == [0.5, 1.0] and store.get("r4").status == "interrupted"
    finally:
        store.close()


def test_a_runs_lock_is_taken_again_after_a_restart(server, url, tmp_path, monkeypatch):
    """The lock dies with its connection when the server restarts; its holder takes it again, so another
    host (doctor --repair) sees the run held, not a dead process's `running` row."""
    monkeypatch.setattr(store_mod, "LOCK_CHECK_S", 0.2)
    store, other = Store(url, artifacts=tmp_path / "art"), None
    try:
        with store.run_lock("r5") as taken:
            assert taken
            keeper = store._keepers["r5"]
            server.restart_after(1.0).join()
            other = Store(url, create=False)
            until(lambda: keeper.retaken == 1, "the lock taken again")
            assert other.in_progress("r5") and not keeper.lost
            with other.run_lock("r5", blocking=False) as got:
                assert not got  # still ours
        until(lambda: not other.in_progress("r5"), "the lock released")
    finally:
        store.close()
        if other is not None:
            other.close()


def test_a_trials_heartbeat_goes_on_after_a_restart(server, url, tmp_path, monkeypatch):
    """Optuna's heartbeat thread died at the first failed beat: the trial then looked dead to other hosts,
    which trained it a second time. The sweep's heartbeat survives the outage and beats again."""
    import optuna

    from loralab.sweep import study as study_mod

    monkeypatch.setenv(study_mod.HEARTBEAT_ENV, "1,3")
    monkeypatch.setattr(store_mod, "DB_RETRY_S", 0.5)  # a beat gives up within the outage: the thread must go on
    storage = study_mod.study_storage(server.url)
    study = optuna.create_study(storage=storage, study_name=f"hb-{os.getpid()}-{time.monotonic_ns()}")
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # meant for Study.optimize: the sweep asks itself
        trial = study.ask()

    def last_beat():
        from sqlalchemy import create_engine, text

        eng = create_engine(store_mod.engine_url(server.url))
        try:
            with eng.connect() as conn:
                return conn.execute(text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :t"),
                                    {"t": trial._trial_id}).scalar()
        finally:
            eng.dispose()

    with study_mod.kept_heartbeat(trial._trial_id, storage) as beat:
        until(lambda: last_beat() is not None, "the first beat")
        server.restart_after(2.0).join()
        before = last_beat()
        until(lambda: last_beat() > before, "a beat after the restart")
        assert beat.failures >= 1 and beat.is_alive()
    assert not beat.is_alive()


def test_the_studys_calls_wait_for_a_restarting_server_too(server, url):
    """A sweep's Optuna calls (ask, tell, attributes) during a restart: they failed the sweep with a long
    traceback; they now wait for the server like the store's, and the trial is told once."""
    import optuna

    from loralab.sweep import study as study_mod

    storage = study_mod.study_storage(url)
    study = optuna.create_study(storage=storage, study_name="restart")
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # meant for Study.optimize: the sweep asks itself
        trial = study.ask()
    back = server.restart_after(3.0)
    trial.set_user_attr("status", "finished")  # waits for the server
    study.tell(trial, 1.5)
    back.join()
    (got,) = optuna.load_study(study_name="restart", storage=store_mod.engine_url(url)).get_trials()
    assert got.state.name == "COMPLETE" and got.value == 1.5 and got.user_attrs == {"status": "finished"}
