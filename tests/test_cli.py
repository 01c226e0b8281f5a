"""The CLI as a user runs it: exit codes, messages, --json, and nothing written on bad input."""

import json

import pytest
from typer.testing import CliRunner

from loralab.cli import app

from test_runner import SEED_RUNS, experiment

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def test_help_lists_the_commands():
    out = invoke("--help")
    assert out.exit_code == 0
    for cmd in ("demo", "run", "validate", "ls", "show", "compare"):
        assert cmd in out.output


def test_validate_ok_and_bad(tmp_path, tiny_neox):
    good = experiment(tmp_path, tiny_neox)
    out = invoke("validate", good)
    assert out.exit_code == 0 and "OK" in out.output and "A, B" in out.output
    assert "checked against gpt_neox" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  A:\n    lora: {r: 0, dropout: 1.5, colour: 1}\n    train: {learning_rate: fast}\n")
    out = invoke("validate", bad)
    assert out.exit_code == 2
    for where in ("runs.A.lora.r", "runs.A.lora.dropout", "runs.A.lora.colour", "runs.A.train.learning_rate"):
        assert where in out.output
    assert "Traceback" not in out.output


def test_validate_catches_a_target_that_matches_nothing(tmp_path, tiny_llama):
    p = experiment(tmp_path, tiny_llama, SEED_RUNS.replace("[query_key_value]", "[attn_out]"))
    out = invoke("validate", p)
    assert out.exit_code == 2 and "attn_out" in out.output and "gate_proj" in out.output


@pytest.mark.parametrize("runs, data, needle", [
    ("runs:\n  A: {lora: {wat: 1}}\n", "", "runs.A.lora.wat"),
    ("runs:\n  A: {lora: {r: 0}}\n", "", "runs.A.lora.r"),
    ("runs:\n  A: {lora: {dropout: 1.5}}\n", "", "runs.A.lora.dropout"),
    ("runs:\n  A: {train: {learning_rate: fast}}\n", "", "runs.A.train.learning_rate"),
    (SEED_RUNS, "{path: nowhere.jsonl}", "data.path"),
    (SEED_RUNS.replace("[query_key_value]", "[attn_out]"), "", "attn_out"),
])
def test_bad_file_exit_2_and_nothing_written(tmp_path, tiny_neox, runs, data, needle):
    p = experiment(tmp_path, tiny_neox, runs, data=data)
    out = invoke("run", p, "--workspace", tmp_path / "ws")
    assert out.exit_code == 2, out.output
    assert needle in out.output and "Traceback" not in out.output
    assert not (tmp_path / "ws").exists()


def test_run_then_ls_show_compare(tmp_path, tiny_neox, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    p = experiment(tmp_path, tiny_neox)
    ws = tmp_path / "ws"
    out = invoke("run", p, "-w", ws)
    assert out.exit_code == 0, out.output
    assert "Main differences" in out.output and "lora.r" in out.output and "ROUGE-L @10" in out.output

    runs = json.loads(invoke("ls", "-w", ws, "--json").output)
    assert sorted(r["name"] for r in runs) == ["A", "B", "base"] and all(r["status"] == "finished" for r in runs)

    shown = json.loads(invoke("show", "B", "-w", ws, "--json").output)
    assert shown["name"] == "B" and shown["config"]["lora"]["r"] == 8 and "eval_loss" in shown["metrics"]
    text = invoke("show", "A", "-w", ws).output
    assert "Samples" in text and "reference" in text

    cmp = json.loads(invoke("compare", "base", "A", "B", "-w", ws, "--json").output)
    assert [r["name"] for r in cmp["runs"]] == ["base", "A", "B"]
    assert cmp["knobs"]["train.learning_rate"] == [None, 2e-4, 5e-4]
    assert set(cmp["outcomes"]["eval_loss"]) == {"base", "A", "B"}
    assert cmp["outcomes"]["eval_loss"]["A"]["n"] == 1 and isinstance(cmp["outcomes"]["eval_loss"]["A"]["mean"], float)
    assert cmp["verdicts"]["eval_loss"]["B vs A"]["verdict"] in ("within noise", "untested")  # one seed each: no call
    assert list(cmp["sections"]) == ["quality", "verbosity", "drift", "stability", "cost"]
    import loralab

    c = loralab.compare(["base", "A", "B"], ws)
    assert json.loads(c.to_json()) == json.loads(json.dumps(c.to_dict())) and isinstance(c.to_dict(), dict)

    md = invoke("compare", "base", "A", "B", "-w", ws, "--markdown").output
    assert md.startswith("|  | base | A | B | A vs base | B vs base | B vs A |") and "| **quality** |" in md and "| lora.r | — | 4 | 8 |  |  |  |" in md

    # Piped (not a terminal), a table is not wrapped at 80 columns: one line per row.
    table = invoke("compare", "base", "A", "B", "-w", ws).output.splitlines()
    assert max(len(line) for line in table) > 120 and sum(line.startswith("│ eval loss ") for line in table) == 1
    # wider than 200 columns (three runs, three verdict columns): printed at its own width, no cell wrapped
    rows = [line for line in table if line.startswith("│ ")]
    assert max(len(line) for line in table) > 200 and all(line.split("│")[1].strip() for line in rows)

    out = invoke("compare", "A", "Z", "-w", ws)
    assert out.exit_code == 2 and "'Z'" in out.output and "use one of" in out.output

    again = invoke("run", p, "-w", ws)
    assert again.exit_code == 0 and "finished earlier" in again.output


def test_only_with_unknown_name(tmp_path, tiny_neox):
    out = invoke("run", experiment(tmp_path, tiny_neox), "--only", "A,Z", "-w", tmp_path / "ws")
    assert out.exit_code == 2 and "'Z'" in out.output and not (tmp_path / "ws").exists()


def test_ls_without_workspace_is_a_clear_error(tmp_path):
    out = invoke("ls", "-w", tmp_path / "none")
    assert out.exit_code == 2 and "no loralab workspace" in out.output


def test_version_and_a_sampled_knob_value_read_short():
    from loralab import __version__
    from loralab.analysis.comparison import fmt_value

    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"loralab {__version__}"
    assert fmt_value(0.00179372) == "0.00179" and fmt_value(1e-05) == "1e-05" and fmt_value(2.0e6) == "2,000,000"


def test_run_only_one_run_lists_the_knobs_that_differ_among_the_files_runs(tmp_path, tiny_neox):
    p = experiment(tmp_path, tiny_neox)  # A and B differ in r, alpha, dropout, learning rate and max_new_tokens
    out = invoke("run", p, "--only", "A", "-w", tmp_path / "ws")
    assert out.exit_code == 0, out.output
    knobs = [line.split("│")[1].strip() for line in out.output.split("Main differences")[1].splitlines()
             if line.startswith("│ ") and "." in line.split("│")[1] and "quality" not in line]
    assert "lora.r" in knobs and "lora.dropout" in knobs and "train.learning_rate" in knobs
    assert not {"train.batch_size", "train.epochs", "lora.target_modules", "train.scheduler"} & set(knobs), knobs
