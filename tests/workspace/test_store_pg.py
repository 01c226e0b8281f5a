"""The workspace on PostgreSQL: the same store guarantees as on SQLite, advisory locks instead of file
locks, and the artifacts folder a URL workspace needs (LORALAB_TEST_PG_URL; see the pg_url fixture)."""

import json
import os
import subprocess
import sys
import time

import pytest

from loralab.errors import RunNotFound, SpecError, WorkspaceError
from loralab.workspace.store import Store, engine_url, shown


def start(store, rid, name, exp="e1"):
    store.start(rid, name=name, experiment=exp, kind="lora", config={"lora": {"r": 4}}, model={}, data={}, env={})


def test_runs_round_trip_and_finish_only_with_metrics(pg_url, tmp_path):
    s = Store(pg_url, artifacts=tmp_path / "art")
    try:
        start(s, "abc123", "A")
        assert s.get("abc123").status == "running" and s.get("abc123").metrics == {}
        s.finish("abc123", metrics={"eval_loss": 1.5}, curves={"loss": [2, 1]}, samples=[{"id": "x"}], timings={},
                 adapter_path=str(s.run_dir("abc123") / "adapter"))
        s.alias("e1", "A2", "abc123")
        assert s.find("A").metrics == {"eval_loss": 1.5} and sorted(r.name for r in s.list()) == ["A", "A2"]
        assert s.run_dir("abc123") == (tmp_path / "art" / "runs" / "abc123").resolve()
    finally:
        s.close()
    with pytest.raises(SpecError, match="keeps its adapters in"):  # one artifacts folder per workspace
        Store(pg_url, artifacts=tmp_path / "elsewhere")
    # Another process (host) opens it by URL alone: the artifacts folder is read from the database.
    again = Store(pg_url, create=False)
    try:
        assert again.root == (tmp_path / "art").resolve() and again.find("A2").id == "abc123"
    finally:
        again.close()


def test_a_crash_inside_finish_leaves_the_run_running(pg_url, tmp_path, monkeypatch):
    from loralab import faults

    s = Store(pg_url, artifacts=tmp_path / "art")
    try:
        start(s, "r1", "A")
        monkeypatch.setenv("LORALAB_FAULT", "store.finish:memory")
        faults.reset()
        with pytest.raises(MemoryError):
            s.finish("r1", metrics={"eval_loss": 1.0}, curves={}, samples=[], timings={}, adapter_path=None)
        rec = s.get("r1")
        assert rec.status == "running" and rec.metrics == {}  # rolled back as a whole
    finally:
        s.close()


def test_a_url_workspace_without_artifacts_names_the_field(pg_url):
    with pytest.raises(SpecError) as err:  # exit code 2: the file's fault
        Store(pg_url)
    assert err.value.problems[0].where == "artifacts" and "artifacts:" in err.value.problems[0].fix


def test_reading_a_database_without_a_workspace_is_a_clear_error(pg_url):
    with pytest.raises(RunNotFound, match="no loralab workspace"):
        Store(pg_url, create=False)


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(WorkspaceError, match="cannot reach the database") as err:
        Store("postgresql://nobody:secret@127.0.0.1:9/nothing?connect_timeout=2", artifacts="/tmp/unused")
    assert "secret" not in str(err.value)  # the password is never printed


def test_urls_map_to_psycopg_and_hide_passwords():
    assert engine_url("postgresql://u:p@h:5432/d").startswith(("postgresql+psycopg://", "postgresql://"))
    assert engine_url("sqlite:///x.db") == "sqlite:///x.db"
    assert "pw" not in shown("postgresql://u:pw@h/d") and "h/d" in shown("postgresql://u:pw@h/d")


HOLD = """
import sys, time
from loralab.workspace.store import Store
s = Store(sys.argv[1], artifacts=sys.argv[2])
with s.run_lock("r1") as taken:
    print("held", flush=True)
    time.sleep(60)
"""


def test_run_lock_is_seen_by_other_processes_and_dies_with_its_holder(pg_url, tmp_path):
    """A run lock held by another process is in progress; kill -9 of that process frees it at once
    (the server drops its session), which is how a dead host's runs are told from live ones."""
    s = Store(pg_url, artifacts=tmp_path / "art")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, pg_url, str(tmp_path / "art")], stdout=subprocess.PIPE,
                              env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert s.in_progress("r1") and not s.in_progress("r2")
        with s.run_lock("r1", blocking=False) as taken:
            assert not taken
        holder.kill()
        holder.wait(timeout=30)
        deadline = time.monotonic() + 20
        while s.in_progress("r1") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not s.in_progress("r1")
        with s.run_lock("r1", blocking=False) as taken:
            assert taken
    finally:
        holder.kill()
        holder.wait(timeout=30)
        s.close()


def test_a_lock_within_one_process_is_exclusive_and_released(pg_url, tmp_path):
    s = Store(pg_url, artifacts=tmp_path / "art")
    try:
        with s.run_lock("r1") as taken:
            assert taken and s.in_progress("r1")
            waited = []
            with s.run_lock("r1", blocking=False) as second:
                assert not second
        assert not s.in_progress("r1") and not waited
    finally:
        s.close()


def test_doctor_on_postgresql_checks_rows_against_the_artifacts_and_repairs(pg_url, tmp_path):
    """The checks that make sense on a server: a run left running by a dead process, a finished run whose
    adapter is gone, a folder no row owns; a run whose lock a live process holds is left alone."""
    from loralab.workspace.doctor import check_workspace

    s = Store(pg_url, artifacts=tmp_path / "art")
    try:
        for rid in ("dead", "live", "gone"):
            start(s, rid, rid.upper())
        s.finish("gone", metrics={"eval_loss": 1.0}, curves={}, samples=[], timings={},
                 adapter_path=str(s.run_dir("gone") / "adapter"))
        (s.root / "runs" / "stray").mkdir()
        with s.run_lock("live"):  # held: in progress, not interrupted
            found = check_workspace(pg_url)
            assert found.workspace == s.where and "runs" not in str(found.workspace)
            assert sorted((f.kind, f.where.split(" [")[0]) for f in found.findings) == [
                ("interrupted", "e1/DEAD"), ("no-adapter", "e1/GONE"), ("orphan", str(s.root / "runs" / "stray"))]
            fixed = check_workspace(pg_url, repair=True)
            assert all(f.repaired for f in fixed.findings)
        assert s.get("dead").status == "interrupted" and s.get("gone").status == "failed"
        assert s.get("live").status == "running" and not (s.root / "runs" / "stray").exists()
    finally:
        s.close()


def test_the_cli_reads_a_url_workspace_and_names_a_missing_artifacts_field(pg_url, tmp_path):
    from typer.testing import CliRunner

    from loralab.cli import app

    cli = CliRunner()
    out = cli.invoke(app, ["ls", "-w", pg_url])
    assert out.exit_code == 2 and "no loralab workspace" in out.output  # nothing stored there yet
    s = Store(pg_url, artifacts=tmp_path / "art")
    start(s, "r1", "A")
    s.close()
    out = cli.invoke(app, ["ls", "-w", pg_url, "--json"])
    assert out.exit_code == 0 and [r["name"] for r in json.loads(out.output)] == ["A"]
    out = cli.invoke(app, ["ls", "-w", "mysql://u@127.0.0.1/db"])
    assert out.exit_code == 2 and "PostgreSQL" in out.output


def test_a_run_on_a_new_url_workspace_without_artifacts_exits_2_naming_the_field(pg_url, tiny_neox, tmp_path):
    from typer.testing import CliRunner

    from loralab.cli import app

    f = tmp_path / "e.yaml"
    f.write_text(f"name: e\nmodel: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 4, eval_size: 2}}\n"
                 f"workspace: '{pg_url}'\nruns:\n  A: {{train: {{max_steps: 1}}}}\n")
    out = CliRunner().invoke(app, ["run", str(f)])
    assert out.exit_code == 2, out.output
    assert "artifacts" in out.output and "artifacts: /shared" in " ".join(out.output.split())
