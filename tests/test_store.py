"""The workspace store: status transitions, aliases, lookups."""

import pytest

from loralab.errors import RunNotFound
from loralab.store import Store


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
