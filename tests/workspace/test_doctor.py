"""`loralab doctor`: each kind of damage a crash can leave is found, repaired, and the repaired
workspace passes again; live work and healthy runs are never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from loralab.cli import app
from loralab.workspace.doctor import check_workspace
from loralab.workspace.locks import process_identity
from loralab.execute.loop import run_experiment
from loralab.config.loading import load_experiment
from loralab.workspace.store import Store

EXP = """name: doc
model: {model}
data: {{builtin: stdlib-docstrings, train_size: 4, eval_size: 2}}
evaluation: {{drift: false}}
runs:
  A: {{lora: {{r: 2}}, train: {{max_steps: 2}}, generate: {{max_new_tokens: 4}}}}
  B: {{lora: {{r: 4}}, train: {{max_steps: 2}}, generate: {{max_new_tokens: 4}}}}
"""


@pytest.fixture(scope="module")
def original(tiny_neox, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("doctor")
    (tmp / "doc.yaml").write_text(EXP.format(model=tiny_neox))
    run_experiment(load_experiment(tmp / "doc.yaml"), workspace=tmp / "ws")
    return tmp


@pytest.fixture
def ws(original, tmp_path) -> Path:
    """A healthy copy of the finished workspace (its runs pointed at their own adapters)."""
    ws = tmp_path / "ws"
    shutil.copytree(original / "ws", ws)
    check_workspace(ws, repair=True)
    return ws


def doctor(ws: Path, *flags: str):
    return CliRunner().invoke(app, ["doctor", "-w", str(ws), *flags], terminal_width=300)


def test_a_healthy_workspace_passes(ws):
    out = doctor(ws)
    assert out.exit_code == 0 and "3 run(s), 2 folder(s), 0 sweep trial(s) checked" in out.output and "OK" in out.output
    report = json.loads(doctor(ws, "--json").output)
    assert report["ok"] is True and report["findings"] == []


def test_a_copied_workspace_gets_its_runs_pointed_at_its_own_adapters(original, tmp_path):
    ws = tmp_path / "copy"
    shutil.copytree(original / "ws", ws)
    shutil.rmtree(original / "ws" / "runs")  # as if the original had been moved away, not copied
    try:
        check = check_workspace(ws)
        assert sorted(f.kind for f in check.findings) == ["moved", "moved"] and not check.ok
        assert doctor(ws, "--repair").exit_code == 0
        store = Store(ws)
        for name in ("A", "B"):
            assert Path(store.find(name).adapter_path).is_relative_to(ws)
        assert check_workspace(ws).findings == []
        again = run_experiment(load_experiment(original / "doc.yaml"), workspace=ws)
        assert again.skipped == ["base", "A", "B"]  # the repaired runs are reused, not trained again
    finally:
        shutil.copytree(ws / "runs", original / "ws" / "runs")


def _interrupted(store: Store, ws: Path) -> None:
    b = store.find("B")
    store.start(b.id, name="B", experiment="doc", kind="lora", config=b.config, model=b.model, data=b.data, env=b.env, seed=0)
    (store.run_dir(b.id) / "adapter.tmp").mkdir()


def _no_adapter(store: Store, ws: Path) -> None:
    shutil.rmtree(store.run_dir(store.find("A").id) / "adapter")


def _no_metrics(store: Store, ws: Path) -> None:
    a = store.find("A")
    store.finish(a.id, metrics={}, curves={}, samples=[], timings={}, adapter_path=a.adapter_path)


def _leftovers(store: Store, ws: Path) -> None:
    (store.run_dir(store.find("A").id) / "adapter.tmp").mkdir()


def _orphan(store: Store, ws: Path) -> None:
    (ws / "runs" / "0123456789ab").mkdir()
    (ws / "runs" / "0123456789ab" / "adapter_model.safetensors").write_bytes(b"x")


def _stale_alias(store: Store, ws: Path) -> None:
    store.alias("doc", "ghost", "fedcba987654")


# (damage, finding kind, the run it is about, its status after --repair (None: no run), what must be gone)
DAMAGE = [
    (_interrupted, "interrupted", "B", "interrupted", "B folder"),
    (_no_adapter, "no-adapter", "A", "failed", "A folder"),
    (_no_metrics, "no-metrics", "A", "failed", "A folder"),
    (_leftovers, "leftovers", "A", "finished", "A adapter.tmp"),
    (_orphan, "orphan", None, None, "orphan folder"),
    (_stale_alias, "stale-alias", None, None, "ghost"),
]


@pytest.mark.parametrize("damage, kind, run, status, gone", DAMAGE, ids=[d[1] for d in DAMAGE])
def test_each_kind_of_damage_is_found_then_repaired(damage, kind, run, status, gone, ws):
    store = Store(ws)
    ids = {r.name: r.id for r in store.all_runs()}
    damage(store, ws)
    found = check_workspace(ws)
    assert [f.kind for f in found.findings] == [kind] and not found.ok
    out = doctor(ws)
    assert out.exit_code == 1 and f"problem {kind}:" in out.output and "--repair` fixes" in out.output
    fixed = doctor(ws, "--repair")
    assert fixed.exit_code == 0 and f"repaired {kind}:" in fixed.output, fixed.output
    assert check_workspace(ws).findings == []
    if run is not None:
        assert store.find(run).status == status
    other = {"A": "B", "B": "A"}.get(run, "A")
    assert store.find(other).status == "finished"  # nothing else touched
    assert (Path(store.find(other).adapter_path) / "adapter_model.safetensors").is_file()
    where = {"B folder": ws / "runs" / ids["B"], "A folder": ws / "runs" / ids["A"],
             "A adapter.tmp": ws / "runs" / ids["A"] / "adapter.tmp", "orphan folder": ws / "runs" / "0123456789ab"}
    if gone in where:
        assert not where[gone].exists()
    if kind == "leftovers":
        assert (ws / "runs" / ids["A"] / "adapter" / "adapter_config.json").is_file()  # the real adapter stays
    if kind == "stale-alias":
        assert "ghost" not in [name for _, name, _, _ in store.alias_rows()]


def test_a_run_repaired_as_failed_is_trained_again_by_the_next_run(original, ws):
    shutil.rmtree(Store(ws).run_dir(Store(ws).find("A").id) / "adapter")
    assert doctor(ws, "--repair").exit_code == 0
    again = run_experiment(load_experiment(original / "doc.yaml"), workspace=ws)
    assert again.skipped == ["base", "B"] and again.records[1].status == "finished"


def test_a_run_a_live_process_holds_is_left_alone(ws):
    store = Store(ws)
    _interrupted(store, ws)  # `running` in the database ...
    b = store.find("B")
    with store.run_lock(b.id):  # ... and really being worked on (its lock is held)
        assert store.in_progress(b.id)
        report = check_workspace(ws, repair=True)
        assert report.findings == [] and store.find("B").status == "running"
        assert (store.run_dir(b.id) / "adapter.tmp").is_dir()
    assert [f.kind for f in check_workspace(ws).findings] == ["interrupted"]  # once the lock is free


def test_sweep_trials_left_running_are_noted_for_resume_not_counted_as_damage(ws):
    url = f"sqlite:///{ws / 'optuna.db'}"
    study = optuna.create_study(study_name="sw", storage=url)
    study.ask()  # trial 0: RUNNING, its process gone (no owner recorded)
    mine = study.ask()  # trial 1: RUNNING in this live process
    mine.set_user_attr("owner", process_identity())
    done = study.ask()  # trial 2: complete, but its run is not in the workspace
    done.set_user_attr("run_ids", ["0000deadbeef"])
    study.tell(done, 1.0)
    report = check_workspace(ws)
    assert [(f.kind, f.where, f.severity) for f in report.findings] == [
        ("trial", "sw/trial-0000", "note"), ("trial-run", "sw/trial-0002", "note")]
    assert report.ok and report.trials == 3
    out = doctor(ws)
    assert out.exit_code == 0 and "note trial: sw/trial-0000" in out.output and "loralab sweep FILE" in out.output


def test_a_damaged_database_is_reported_not_read(ws):
    db = ws / "loralab.db"
    data = bytearray(db.read_bytes())
    data[4096:4096 + 206] = b"\x0d\x00\x00\x00\xff\xff" + b"\xee" * 200  # the runs table's page
    db.write_bytes(bytes(data))
    out = doctor(ws, "--repair")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "problem database" in out.output or "not a readable loralab database" in out.output
    assert "restore" in out.output and "--repair` fixes" not in out.output
    ls = CliRunner().invoke(app, ["ls", "-w", str(ws)])
    assert ls.exit_code == 1 and "not a readable loralab database" in ls.output and "Traceback" not in ls.output


def test_a_schema_2_workspace_passes_before_and_after_its_migration(ws):
    import sqlite3

    from tiny import downgrade_to_schema_2

    downgrade_to_schema_2(ws / "loralab.db")
    out = doctor(ws)  # doctor reads schema 2 as it is
    assert out.exit_code == 0 and "OK" in out.output
    Store(ws).close()  # opened for writing: migrated in place
    with sqlite3.connect(ws / "loralab.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        filled = conn.execute("SELECT count(*) FROM runs WHERE kind = 'lora' AND adapter_id IS NOT NULL").fetchone()[0]
    assert filled == 2  # A and B: their adapters are found for a later evaluation-only run
    report = json.loads(doctor(ws, "--json").output)
    assert report["ok"] is True and report["findings"] == []


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_doctor_says_more_than_ls_about_a_database_it_cannot_open(damage, ws):
    """`ls` says loralab.db cannot be read and sends the user to doctor: doctor no longer repeats those two
    lines but says what the file is, the recovery to try, and which adapters survive on disk."""
    db = ws / "loralab.db"
    data = bytearray(db.read_bytes())
    if damage == "header":
        data[:16] = b"garbage garbage!"
    else:  # the schema page itself: SQLite opens the file but cannot read its tables
        data[100:4096] = b"\xee" * (4096 - 100)
    db.write_bytes(bytes(data))
    ls = CliRunner().invoke(app, ["ls", "-w", str(ws)])
    assert ls.exit_code == 1 and "`loralab doctor` says more" in ls.output
    out = doctor(ws)
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert not set(ls.output.strip().splitlines()) & set(out.output.strip().splitlines())  # nothing repeated
    if damage == "header":
        assert "does not start with the SQLite header" in out.output and "backup" in out.output
    else:
        assert "pages are damaged" in out.output and ".recover" in out.output
    assert "2 complete adapter(s) survive on disk" in out.output
    assert json.loads(doctor(ws, "--json").output)["findings"][0]["kind"] == "database"


def test_a_database_moved_without_its_run_folders_says_so_not_train_again(original, tmp_path):
    """Only loralab.db was copied: doctor says the workspace moved, where the adapter should be and where it
    still is, and that copying the run folder fixes it (not only "the next run trains it again")."""
    ws = tmp_path / "alone"
    ws.mkdir()
    shutil.copy2(original / "ws" / "loralab.db", ws / "loralab.db")
    a = Store(original / "ws", create=False).find("A")
    out = doctor(ws)
    assert out.exit_code == 1
    line = next(x for x in out.output.splitlines() if "doc/A" in x)
    assert "moved or copied without its run folders" in line and f"{ws / 'runs' / a.id / 'adapter'}" in line
    assert f"{a.adapter_path} is still complete there" in line and f"runs/{a.id} folder to {ws / 'runs' / a.id}" in line
    shutil.copytree(original / "ws" / "runs" / a.id, ws / "runs" / a.id)
    kinds = {f.where.split(" ")[0]: f.kind for f in check_workspace(ws).findings}
    assert kinds["doc/A"] == "moved"  # now only pointed at its own folder by --repair


def test_a_moved_workspace_reuses_its_runs_instead_of_training_them_again(original, tmp_path):
    """`loralab run` in a moved workspace (the old folder gone) found no adapter at the stored absolute
    path and trained every run again; it now finds each in the workspace's own run folder."""
    ws = tmp_path / "moved"
    shutil.copytree(original / "ws", ws)
    shutil.rmtree(original / "ws" / "runs")  # moved, not copied
    try:
        again = run_experiment(load_experiment(original / "doc.yaml"), workspace=ws)
        assert again.skipped == ["base", "A", "B"]
        store = Store(ws, create=False)
        assert all(Path(store.find(n).adapter_path).is_relative_to(ws) for n in ("A", "B"))
        assert check_workspace(ws).findings == []
    finally:
        shutil.copytree(ws / "runs", original / "ws" / "runs")
