"""data.group_field: each eval example carries its group of related items, for cluster-robust intervals."""

from __future__ import annotations

import json

import pytest

from loralab.config.schema import DataSpec
from loralab.engine.data import load_data
from loralab.errors import DataError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_example_carries_its_group(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "doc": i // 3} for i in range(12)]
    _write(tmp_path / "d.jsonl", rows)
    data = load_data(DataSpec(path="d.jsonl", group_field="doc", eval_fraction=0.5), tmp_path)
    by_prompt = {e.instruction: e.group for e in data.train + data.eval}
    assert by_prompt == {f"q{i}": str(i // 3) for i in range(12)}
    # Without the field named, no groups (and the same data fingerprint: grouping changes no training).
    plain = load_data(DataSpec(path="d.jsonl", eval_fraction=0.5), tmp_path)
    assert all(e.group is None for e in plain.eval) and plain.fingerprint == data.fingerprint


@pytest.mark.parametrize("bad", [None, "", True, [1]])
def test_a_row_without_a_group_names_the_field_and_the_fix(tmp_path, bad):
    rows = [{"instruction": "q0", "output": "a0", "doc": 1}, {"instruction": "q1", "output": "a1", "doc": bad}]
    _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_data(DataSpec(path="d.jsonl", group_field="doc"), tmp_path)
    [p] = info.value.problems
    assert "'doc'" in p.message and "data.group_field" in p.fix and p.where.endswith(":2")


def test_chat_rows_carry_their_group_too(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "topic": "t" + str(i % 2)} for i in range(4)]
    _write(tmp_path / "d.jsonl", rows)
    data = load_data(DataSpec(path="d.jsonl", group_field="topic", eval_fraction=0.5), tmp_path)
    assert {e.group for e in data.train + data.eval} == {"t0", "t1"}


def test_a_run_stores_each_eval_examples_group(tmp_path, tiny_neox):
    """End to end on a tiny model: the group reaches the stored eval samples, where comparison reads it."""
    import loralab
    from rich.console import Console

    rows = [{"instruction": f"Say {i}", "output": f"{i} {i}", "doc": f"d{i % 3}"} for i in range(12)]
    _write(tmp_path / "d.jsonl", rows)
    (tmp_path / "e.yaml").write_text(
        f"name: g\nmodel: {tiny_neox}\ndata: {{path: d.jsonl, group_field: doc, eval_size: 4}}\n"
        "evaluation: {drift: false}\nruns:\n  A:\n    lora: {r: 2, target_modules: [query_key_value]}\n"
        "    train: {batch_size: 2, max_steps: 1}\n    generate: {max_new_tokens: 2}\n")
    result = loralab.run(loralab.load(tmp_path / "e.yaml"), workspace=tmp_path / "ws", console=Console(quiet=True))
    run = next(r for r in result.records if r.name == "A")
    assert run.samples and all(s["group"] in {"d0", "d1", "d2"} for s in run.samples)


def test_naming_groups_later_evaluates_the_stored_adapter_again(tmp_path, tiny_neox):
    """A run stored before data.group_field has no groups in its samples: with the field named, the same
    settings are evaluated anew (the adapter is reused, not retrained), so the groups are there."""
    import loralab
    from rich.console import Console

    rows = [{"instruction": f"Say {i}", "output": f"{i} {i}", "doc": f"d{i % 3}"} for i in range(12)]
    _write(tmp_path / "d.jsonl", rows)

    def run(data: str):
        (tmp_path / "e.yaml").write_text(
            f"name: g\nmodel: {tiny_neox}\ndata: {data}\nevaluation: {{drift: false}}\nruns:\n  A:\n"
            "    lora: {r: 2, target_modules: [query_key_value]}\n    train: {batch_size: 2, max_steps: 1}\n"
            "    generate: {max_new_tokens: 2}\n")
        result = loralab.run(loralab.load(tmp_path / "e.yaml"), workspace=tmp_path / "ws", console=Console(quiet=True))
        return next(r for r in result.records if r.name == "A")

    before = run("{path: d.jsonl, eval_size: 4}")
    after = run("{path: d.jsonl, group_field: doc, eval_size: 4}")
    assert all("group" not in s for s in before.samples) and all("group" in s for s in after.samples)
    assert after.id != before.id and after.timings.get("train_reused_from") == before.id
    assert run("{path: d.jsonl, group_field: doc, eval_size: 4}").id == after.id  # and then reused as is
