"""What `validate` says about a data file with many bad rows: rows counted once, the same problem
shown once with the other rows' lines."""

from __future__ import annotations

import json

import pytest

from loralab.config.schema import DataSpec
from loralab.engine.data import load_data
from loralab.errors import DataError


def test_rows_are_counted_once_and_identical_problems_grouped(tmp_path):
    rows = [{"q": "x", "a": "y"}] * 400  # every row lacks both fields: 800 problems, 400 rows
    rows[6] = {"instruction": "", "output": "fine"}  # one row with a problem of its own
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_data(DataSpec(path="d.jsonl"), tmp_path)
    text = str(err.value)
    assert text.splitlines()[0] == "d.jsonl: 400 bad rows"
    assert len(err.value.problems) == 3  # no field 'instruction', no field 'output', an empty instruction
    first = str(err.value.problems[0])
    assert first.startswith("d.jsonl:1: row has no field 'instruction'")
    assert "(and 398 more rows like it: lines 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, …)" in first  # line 7 is the other kind
    assert "d.jsonl:7: field 'instruction' must be non-empty text" in text and text.count("more rows like it") == 2


def test_a_single_bad_row_reads_as_before(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataError) as err:
        load_data(DataSpec(path="d.jsonl"), tmp_path)
    assert str(err.value).splitlines()[0] == "d.jsonl: 1 bad row" and "like it" not in str(err.value)


def test_validate_says_what_a_file_will_cost(tiny_llama, tmp_path, monkeypatch):
    import loralab
    from loralab.api import cost_note

    monkeypatch.chdir(tmp_path)  # the file's `workspace: ws` is read from the current folder
    (tmp_path / "exp.yaml").write_text(
        f"name: cost\nmodel: {tiny_llama}\nworkspace: ws\nrepeats: 2\n"
        "data: {builtin: stdlib-docstrings, train_size: 8, eval_size: 4}\n"
        "defaults: {train: {max_steps: 2, batch_size: 2}, generate: {max_new_tokens: 2}}\n"
        "runs:\n  A: {lora: {r: 2}}\n  B: {lora: {r: 4}}\n  C: {lora: {r: 8}}\n")
    exp, notes = loralab.validate(tmp_path / "exp.yaml")
    assert notes[-1].startswith(
        "cost: `run` trains 6 adapter(s) (3 run(s) x 2 seed(s)) and evaluates each, plus the base model once; no time estimate")
    loralab.run(loralab.load(tmp_path / "exp.yaml"), only=["A"])
    note = cost_note(exp, 8, 4)
    assert "trains 6 adapter(s)" in note and "of training and evaluation at the rates of 2 finished run(s)" in note


def test_validate_names_the_stores_workspace_files():
    from loralab.api import _WORKSPACE_DB
    from loralab.workspace.store import DB_NAME, DEFAULT_WORKSPACE

    assert _WORKSPACE_DB == (DEFAULT_WORKSPACE, DB_NAME)


def test_a_sweep_files_cost_counts_its_trials_and_seeds():
    import yaml

    from loralab.api import cost_note
    from loralab.config.loading import parse_experiment

    text = "repeats: 3\nsweep: {space: {lora.r: [4, 8]}, budget: {trials: 5}}\n"
    note = cost_note(parse_experiment(yaml.safe_load(text), "s.yaml", text))
    assert "`sweep` trains up to 15 (5 trial(s) x 3 seed(s), fewer when pruned" in note
