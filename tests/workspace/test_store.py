"""The workspace store: status transitions, aliases, lookups."""

import dataclasses

import pytest

from loralab.errors import RunNotFound
from loralab.workspace.store import Store


def start(store, rid, name, exp="e1"):
    store.start(rid, name=name, experiment=exp, kind="lora", config={"lora": {"r": 4}}, model={}, data={}, env={})


def test_a_run_is_finished_only_with_its_metrics(tmp_path):
    s = Store(tmp_path / "ws")
    start(s, "abc123", "A")
    assert s.get("abc123").status == "running" and s.get("abc123").metrics == {}
    s.finish("abc123", metrics={"eval_loss": 1.5}, curves={"loss": [2, 1]}, samples=[{"id": "x"}], timings={},
             adapter_path="/a")
    rec = s.get("abc123")
    assert rec.status == "finished" and rec.metrics == {"eval_loss": 1.5} and rec.curves["loss"] == [2, 1]


def test_restart_clears_old_results(tmp_path):
    s = Store(tmp_path / "ws")
    start(s, "abc123", "A")
    s.finish("abc123", metrics={"eval_loss": 1.5}, curves={}, samples=[], timings={}, adapter_path=None)
    start(s, "abc123", "A")
    rec = s.get("abc123")
    assert rec.status == "running" and rec.metrics == {}


def test_a_restart_drops_the_streamed_curve_and_a_resumed_one_keeps_it_up_to_its_checkpoint(tmp_path):
    with Store(tmp_path / "ws") as s:
        start(s, "abc123", "A")
        s.append_steps("abc123", [{"step": i, "loss": 1.0 / i, "total": 9} for i in range(1, 7)])
        s.start("abc123", name="A", experiment="e1", kind="lora", config={}, model={}, data={}, env={}, resume_from=4)
        assert s.live_curve("abc123")["step"] == [1, 2, 3, 4]  # steps 5 and 6 were trained after the checkpoint
        assert s.get("abc123").timings == {"resumed_at": [4]}
        s.append_steps("abc123", [{"step": 5, "loss": 0.2, "total": 9}])  # the resumed attempt's next step fits
        assert s.live_curve("abc123")["step"] == [1, 2, 3, 4, 5]
        start(s, "abc123", "A")  # started over
        assert s.live_curve("abc123") == {k: [] for k in ("step", "loss", "grad_norm", "lr", "tokens", "seconds")}


def test_a_store_used_as_a_context_manager_is_closed_after(tmp_path, monkeypatch):
    closed = []
    monkeypatch.setattr(Store, "close", lambda self: closed.append(self))
    with Store(tmp_path / "ws") as s:
        start(s, "abc123", "A")
        assert not closed
    assert closed == [s]
    with pytest.raises(RuntimeError), Store(tmp_path / "ws") as t:
        raise RuntimeError("closed on an error too")
    assert closed == [s, t]


def test_records_the_store_returns_are_frozen_and_a_copy_changes_nothing_stored(tmp_path):
    with Store(tmp_path / "ws") as s:
        start(s, "abc123", "A")
        s.alias("e2", "B", "abc123", seed=3)
        s.append_steps("abc123", [{"step": 1, "loss": 2.0, "total": 5}])
        readers = {"get": lambda: s.get("abc123"), "list": lambda: s.list()[0], "all_runs": lambda: s.all_runs()[0],
                   "group": lambda: s.group("A")[0], "find": lambda: s.find("e2/B")}
        for how, read in readers.items():
            rec = read()
            for attr, value in (("status", "finished"), ("name", "C"), ("curves", {}), ("adapter_path", "/x")):
                with pytest.raises(dataclasses.FrozenInstanceError):
                    setattr(rec, attr, value)
        renamed = dataclasses.replace(s.find("e2/B"), name="C", status="finished")
        assert (renamed.name, renamed.status, renamed.seed) == ("C", "finished", 3)
        assert sorted((r.name, r.experiment, r.seed, r.status) for r in s.list()) == [("A", "e1", None, "running"),
                                                                                      ("B", "e2", 3, "running")]
        assert s.find("A").curves["step"] == [1]  # a run still training gets its streamed curve, in a copy


def test_find_by_name_experiment_and_id_prefix(tmp_path):
    s = Store(tmp_path / "ws")
    start(s, "aaa111", "A", "e1")
    start(s, "bbb222", "A", "e2")
    s.finish("aaa111", metrics={}, curves={}, samples=[], timings={}, adapter_path=None)
    s.mark("bbb222", "interrupted")
    assert s.find("A").id == "aaa111"  # the finished one wins
    assert s.find("e2/A").id == "bbb222" and s.find("e2/A").status == "interrupted"
    assert s.find("bbb").id == "bbb222"
    with pytest.raises(RunNotFound, match="use one of: A"):
        s.find("Z")


def test_two_names_can_share_one_run(tmp_path):
    s = Store(tmp_path / "ws")
    start(s, "aaa111", "A")
    s.alias("e1", "A2", "aaa111")
    names = sorted(r.name for r in s.list())
    assert names == ["A", "A2"] and {r.id for r in s.list()} == {"aaa111"}


def test_reading_a_missing_workspace_is_a_clear_error(tmp_path):
    with pytest.raises(RunNotFound, match="no loralab workspace"):
        Store(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()


def test_a_workspace_of_another_schema_is_refused(tmp_path):
    import sqlite3

    Store(tmp_path / "ws").close()
    con = sqlite3.connect(tmp_path / "ws" / "loralab.db")
    con.execute("PRAGMA user_version=1")
    con.close()
    with pytest.raises(RunNotFound, match="another loralab version"):
        Store(tmp_path / "ws")


def test_seeds_of_a_run_form_its_group(tmp_path):
    s = Store(tmp_path / "ws")
    for seed, rid in ((1, "s1"), (0, "s0")):
        s.start(rid, name="A", experiment="e", kind="lora", config={}, model={}, data={}, env={}, seed=seed)
        s.finish(rid, metrics={"x": seed}, curves={}, samples=[], timings={}, adapter_path=None)
    assert [r.seed for r in s.group("A")] == [0, 1] and s.find("A").id == "s0"
    assert [r.id for r in s.group("s1")] == ["s1"]  # an id prefix names one run


# -- adapter identity and the schema 2 -> 3 migration ------------------------------------------------

LORA_CONFIG = {"device": "cpu", "dtype": "float32", "eval_caps": [5], "evaluation": {"drift": True},
               "lora": {"r": 4, "alpha": 8}, "train": {"learning_rate": 2e-4, "seed": 0},
               "generate": {"max_new_tokens": [5], "batch_size": 16}, "resolved_target_modules": ["q_proj"]}
MODEL = {"fingerprint": "local-abc"}
DATA = {"fingerprint": "d1", "system_prompt": None}


def with_(config: dict, **changes) -> dict:
    return {**config, **changes}


@pytest.mark.parametrize("changes, same", [
    # Evaluation and generation settings: the same adapter, evaluated another way.
    ({"eval_caps": [5, 7]}, True),
    ({"generate": {"max_new_tokens": [5], "batch_size": 1}}, True),
    ({"evaluation": {"drift": False}}, True),
    ({"device": "cuda:0"}, False),  # results change with the device kind...
    ({"dtype": "bfloat16"}, False),  # ...and the dtype: a CPU fp32 adapter is not a GPU bf16 one
    ({"lora": {"r": 8, "alpha": 8}}, False),
    ({"train": {"learning_rate": 2e-4, "seed": 1}}, False),
    ({"resolved_target_modules": ["q_proj", "v_proj"]}, False),
])
def test_adapter_identity_holds_what_trains_the_adapter_only(changes, same):
    from loralab.workspace.store import adapter_identity

    base = adapter_identity(LORA_CONFIG, MODEL, DATA)
    assert base is not None and (adapter_identity(with_(LORA_CONFIG, **changes), MODEL, DATA) == base) is same


def test_adapter_identity_depends_on_model_data_and_device_kind_not_index():
    from loralab.workspace.store import adapter_identity

    aid = adapter_identity(LORA_CONFIG, MODEL, DATA)
    assert adapter_identity(LORA_CONFIG, {"fingerprint": "local-xyz"}, DATA) != aid
    assert adapter_identity(LORA_CONFIG, MODEL, {**DATA, "system_prompt": "Be brief."}) != aid
    cuda = with_(LORA_CONFIG, device="cuda")
    assert adapter_identity(with_(LORA_CONFIG, device="cuda:1"), MODEL, DATA) == adapter_identity(cuda, MODEL, DATA)
    assert adapter_identity({"lora": {"r": 4}}, MODEL, DATA) is None  # a row lacking parts is never matched


V2_RUNS = """CREATE TABLE runs (id VARCHAR(32) NOT NULL, name VARCHAR(128) NOT NULL, experiment VARCHAR(256) NOT NULL,
    kind VARCHAR(16) NOT NULL, seed INTEGER, status VARCHAR(16) NOT NULL, config TEXT NOT NULL, model TEXT NOT NULL,
    data TEXT NOT NULL, metrics TEXT NOT NULL, curves TEXT NOT NULL, samples TEXT NOT NULL, env TEXT NOT NULL,
    timings TEXT NOT NULL, adapter_path TEXT, error TEXT, created_at VARCHAR NOT NULL, updated_at VARCHAR NOT NULL,
    PRIMARY KEY (id));
CREATE INDEX ix_runs_status ON runs (status);
CREATE INDEX ix_runs_name ON runs (name);
CREATE TABLE aliases (experiment VARCHAR(256) NOT NULL, name VARCHAR(128) NOT NULL, seed INTEGER NOT NULL,
    run_id VARCHAR(32) NOT NULL, updated_at VARCHAR NOT NULL, PRIMARY KEY (experiment, name, seed));
CREATE INDEX ix_aliases_run_id ON aliases (run_id);
PRAGMA user_version=2;
"""


def v2_workspace(root) -> None:
    """A workspace as schema 2 wrote it (its DDL verbatim): a finished LoRA run, a damaged one, the base."""
    import json
    import sqlite3

    root.mkdir()
    conn = sqlite3.connect(root / "loralab.db")
    conn.executescript(V2_RUNS)
    t = "2026-01-01 00:00:00.000000"
    for rid, name, kind, config in (("aaa", "A", "lora", json.dumps(LORA_CONFIG)), ("bbb", "B", "lora", "{not json"),
                                    ("base-c", "base", "base", json.dumps({"device": "cpu"}))):
        conn.execute("INSERT INTO runs VALUES (?,?,'e1',?,0,'finished',?,?,?,'{\"eval_loss\": 1.0}','{}','[]','{}',"
                     "'{}',NULL,NULL,?,?)", (rid, name, kind, config, json.dumps(MODEL), json.dumps(DATA), t, t))
        conn.execute("INSERT INTO aliases VALUES ('e1', ?, 0, ?, ?)", (name, rid, t))
    conn.commit()
    conn.close()


def stored_adapter_ids(root) -> dict:
    import sqlite3

    with sqlite3.connect(root / "loralab.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        return dict(conn.execute("SELECT id, adapter_id FROM runs"))


def test_a_schema_2_workspace_reads_as_it_is_and_is_migrated_when_opened_for_writing(tmp_path):
    import sqlite3

    from loralab.workspace.store import adapter_identity

    ws = tmp_path / "ws"
    v2_workspace(ws)
    read = Store(ws, create=False)
    assert {r.name for r in read.list()} == {"A", "B", "base"} and read.get("aaa").metrics == {"eval_loss": 1.0}
    read.close()
    with sqlite3.connect(ws / "loralab.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2  # reading changed nothing
    s = Store(ws)
    aid = adapter_identity(LORA_CONFIG, MODEL, DATA)
    # Old rows get their adapter id from their stored config; a row that cannot give one keeps NULL.
    assert stored_adapter_ids(ws) == {"aaa": aid, "bbb": None, "base-c": None}
    assert [r.id for r in s.adapter_runs(aid)] == ["aaa"] and s.get("bbb").damaged
    s.close()
    Store(ws).close()  # opening a migrated workspace again changes nothing
    assert stored_adapter_ids(ws) == {"aaa": aid, "bbb": None, "base-c": None}


def test_a_migration_cut_short_after_its_column_was_added_completes(tmp_path):
    import sqlite3

    ws = tmp_path / "ws"
    v2_workspace(ws)
    with sqlite3.connect(ws / "loralab.db") as conn:  # a crash after ALTER TABLE, before user_version=3
        conn.execute("ALTER TABLE runs ADD COLUMN adapter_id VARCHAR(32)")
    Store(ws).close()
    assert stored_adapter_ids(ws)["aaa"] is not None


def test_a_newer_schema_is_refused(tmp_path):
    import sqlite3

    ws = tmp_path / "ws"
    v2_workspace(ws)
    with sqlite3.connect(ws / "loralab.db") as conn:
        conn.execute("PRAGMA user_version=5")
    with pytest.raises(RunNotFound, match="schema 5"):
        Store(ws, create=False)


def test_a_light_listing_leaves_samples_and_curves_unread(tmp_path):
    from sqlalchemy import event

    s = Store(tmp_path / "ws")
    s.start("r1", name="A", experiment="e", kind="lora", config={}, model={}, data={}, env={}, seed=0)
    s.finish("r1", metrics={"eval_loss": 1.0}, curves={"step": [1], "loss": [2.0]}, samples=[{"id": "x" * 10_000}],
             timings={}, adapter_path=None)
    statements = []
    event.listen(s.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    light = s.list(light=True)
    assert [r.metrics for r in light] == [{"eval_loss": 1.0}] and light[0].samples == [] and light[0].curves == {}
    assert len(statements) == 1 and "samples" not in statements[0]  # one query, without the bulky columns
    full = s.list()
    assert full[0].samples[0]["id"] == "x" * 10_000 and full[0].curves["loss"] == [2.0] and not full[0].damaged
    s.close()


def test_last_steps_give_each_running_runs_newest_streamed_step_in_one_query(tmp_path):
    from sqlalchemy import event

    s = Store(tmp_path / "ws")
    for rid, n in (("r1", 3), ("r2", 5)):
        s.start(rid, name=rid, experiment="e", kind="lora", config={}, model={}, data={}, env={}, seed=0)
        s.append_steps(rid, [{"step": i, "loss": float("nan") if i == n else 1.0 / i, "grad_norm": 1.0, "lr": 1e-3,
                              "tokens": 10 * i, "seconds": 0.5 * i, "total": 8} for i in range(1, n + 1)])
    s.last_steps(["r1"])  # the first call also looks for the steps table, once per store
    statements = []
    event.listen(s.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    last = s.last_steps(["r1", "r2", "nope"])
    assert len(statements) == 1 and set(last) == {"r1", "r2"}
    assert last["r1"]["step"] == 3 and last["r2"]["step"] == 5 and last["r2"]["tokens"] == 50 and last["r2"]["total"] == 8
    assert last["r1"]["loss"] is None  # a NaN loss is stored as NULL
    assert s.live_curve("r2")["step"] == [1, 2, 3, 4, 5] and s.last_steps([]) == {}
    s.close()


def test_a_disk_that_fills_while_the_workspace_is_created_leaves_it_recoverable(tmp_path):
    """The disk fills at the third table: the tables made before it stay (pysqlite commits each CREATE),
    with schema version 0. That used to read as "written by another loralab version (schema 0)" for
    ever; now a read says it was never completely created, and the next writing command finishes it."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from loralab.errors import WorkspaceError
    from loralab.workspace.store import StepRow

    def full(*_a, **_k):
        raise OperationalError("CREATE TABLE steps", {}, sqlite3.OperationalError("database or disk is full"))

    event.listen(StepRow.__table__, "before_create", full)
    try:
        with pytest.raises(WorkspaceError, match="the disk is full"):
            Store(tmp_path / "ws")
    finally:
        event.remove(StepRow.__table__, "before_create", full)
    con = sqlite3.connect(tmp_path / "ws" / "loralab.db")
    left = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    version = con.execute("PRAGMA user_version").fetchone()[0]
    con.close()
    assert left and "steps" not in left and version == 0  # the half-made state the issue found
    with pytest.raises(RunNotFound, match="never completely created") as info:
        Store(tmp_path / "ws", create=False)
    assert "finishes creating it" in str(info.value.problems[0])
    store = Store(tmp_path / "ws")  # "run the same command again" now recovers
    start(store, "r1", "A")
    store.close()
    assert Store(tmp_path / "ws", create=False).find("A").id == "r1"


def test_a_schema_0_database_holding_rows_or_other_tables_is_still_refused(tmp_path):
    """Only loralab's own tables, all empty, are taken for a creation cut short: anything else is kept."""
    import sqlite3

    for name, sql in (("rows", "CREATE TABLE runs (id TEXT); INSERT INTO runs VALUES ('x')"),
                      ("other", "CREATE TABLE notes (t TEXT)")):
        (tmp_path / name).mkdir()
        con = sqlite3.connect(tmp_path / name / "loralab.db")
        con.executescript(sql)
        con.close()
        with pytest.raises(RunNotFound, match="another loralab version \\(schema 0"):
            Store(tmp_path / name)
