"""Reliability, round two (issue 14): what `validate` passes must run, SIGTERM, damaged rows, sweeps
that resume without repeating a configuration. Bad-input rows live in test_reliability_inputs.py;
this file holds what a table of messages cannot show. docs/reliability.md lists the cases."""

from __future__ import annotations

import signal

import pytest
from typer.testing import CliRunner

from loralab.cli import app
from test_reliability_faults import Proc, no_process_left_behind, statuses, write  # noqa: F401 (an autouse fixture)


# --- SIGTERM ---------------------------------------------------------------------------------------


def test_sigterm_marks_the_current_run_interrupted_exits_143_in_one_line_and_a_rerun_finishes(tiny_neox, tmp_path):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    # A fresh interpreter, as `timeout`, Docker, Slurm or Kubernetes would stop; held in B's 2nd step.
    proc = Proc(tmp_path, "run", f, "-w", ws, fault="train.step:wait@6", gate=tmp_path / "never", fresh=True)
    proc.until(lambda: statuses(ws).get("B") == "running", "B started", timeout=120)
    proc.p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "interrupted"}
    tail = [line for line in proc.output.splitlines() if "Terminated" in line]
    assert tail == ["Terminated (SIGTERM): the current run is marked interrupted; finished runs are kept."], proc.output
    assert "Traceback" not in proc.output
    again = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert again.exit_code == 0 and "A: finished earlier" in again.output, again.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "finished"}


def test_sigterm_during_a_sweep_marks_the_trial_interrupted_and_the_same_command_reruns_its_point(tiny_neox, tmp_path):
    import optuna

    from test_reliability_faults import SWEEP

    f, ws = write(tmp_path, tiny_neox, SWEEP, "sw"), tmp_path / "ws"
    proc = Proc(tmp_path, "sweep", f, "-w", ws, fault="train.step:wait@1", gate=tmp_path / "never")  # in trial 0
    proc.until(lambda: (ws / "optuna.db").is_file() and "trial-0000" in statuses(ws), "trial 0 started")
    proc.p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.output
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{ws / 'optuna.db'}")
    assert [(t.state.name, t.user_attrs.get("status")) for t in study.trials] == [("FAIL", "interrupted"), ("WAITING", None)]
    from loralab.workspace.store import Store

    assert [r.status for r in Store(ws).all_runs()] == ["interrupted"] and statuses(ws) == {}  # the FAIL trial names no run
    again = Proc(tmp_path, "sweep", f, "-w", ws, name="again")
    assert again.wait() == 0, again.output
    done = [t for t in optuna.load_study(study_name="sw", storage=f"sqlite:///{ws / 'optuna.db'}").trials
            if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["knobs"]["lora.r"] for t in done) == [2, 4, 8]
    assert_study_and_runs_agree(ws)  # before the fix trial 0 was FAIL while `show sw/trial-0000` said finished


def test_the_cli_puts_the_sigterm_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    CliRunner().invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert signal.getsignal(signal.SIGTERM) is before


# --- a sweep never counts a configuration twice ----------------------------------------------------

AGREE = {"COMPLETE": {"finished"}, "PRUNED": {"pruned", "diverged"}, "FAIL": {"failed"}}


def assert_study_and_runs_agree(ws, experiment: str = "sw") -> None:
    """Each trial's Optuna state matches the status of the run its name points at; an interrupted or
    duplicate trial names no run (its configuration's run belongs to the trial that finished it)."""
    import optuna

    from loralab.workspace.store import Store

    store = Store(ws)
    named = {name: store.get(rid).status for exp_, name, _, rid in store.alias_rows() if exp_ == experiment}
    for t in optuna.load_study(study_name=experiment, storage=f"sqlite:///{ws / 'optuna.db'}").trials:
        status = named.get(f"trial-{t.number:04d}")
        if t.user_attrs.get("status") in ("interrupted", "duplicate"):
            assert status is None, (t.number, t.state.name, status)
        else:
            assert status in AGREE[t.state.name], (t.number, t.state.name, status)

TPE = """evaluation: {drift: false}
defaults:
  lora: {r: 2, target_modules: [query_key_value]}
  train: {learning_rate: 1.0e-3, batch_size: 2, max_steps: 2}
  generate: {max_new_tokens: 4}
sweep:
  strategy: tpe
  space: {lora.r: [2, 4, 8], train.learning_rate: [1.0e-3, 1.0e-2]}
  pruner: {name: none}
  confirm: {top: 0}  # these tests count the search's own runs
  budget: {trials: BUDGET}
"""


def _complete(ws):
    import optuna

    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{ws / 'optuna.db'}")
    return [t for t in study.get_trials() if t.state.name == "COMPLETE"]


def test_a_killed_tpe_sweep_resumes_without_retraining_a_configuration_it_already_has(tiny_neox, tmp_path):
    from loralab.workspace.doctor import check_workspace
    from loralab.config.loading import load_experiment
    from loralab.workspace.store import Store
    from loralab.sweep.study import run_sweep

    f, ws = write(tmp_path, tiny_neox, TPE.replace("BUDGET", "5"), "sw"), tmp_path / "ws"
    proc = Proc(tmp_path, "sweep", f, "-w", ws, fault="train.step@6")  # trial 2's 2nd step: kill -9
    assert proc.wait() == -signal.SIGKILL, proc.output
    assert len(_complete(ws)) == 2
    result = run_sweep(load_experiment(f), workspace=ws)
    done = _complete(ws)
    points = [tuple(sorted(t.user_attrs["knobs"].items())) for t in done]
    # Before the fix the resumed sampler re-proposed trial 0's and 1's points, "reused" them and counted
    # them: 5 trials, 3 configurations.
    assert len(done) == 5 and len(set(points)) == 5, points
    assert all(t.user_attrs["reused"] == 0 for t in done)
    assert sum(t.status == "finished" for t in result.trials) == 5  # duplicates are not shown as trials
    runs = Store(ws).all_runs()
    assert len(runs) == 5 and all(r.status == "finished" for r in runs)  # one finished run per complete trial
    assert_study_and_runs_agree(ws)
    assert check_workspace(ws).findings == []


def test_a_sweep_asked_for_more_trials_than_its_space_holds_stops_when_the_space_is_exhausted(tiny_neox, tmp_path):
    from loralab.config.loading import load_experiment
    from loralab.sweep.study import run_sweep

    body = TPE.replace("BUDGET", "5").replace("{lora.r: [2, 4, 8], train.learning_rate: [1.0e-3, 1.0e-2]}", "{lora.r: [2, 4]}")
    result = run_sweep(load_experiment(write(tmp_path, tiny_neox, body, "sw")), workspace=tmp_path / "ws")
    assert "exhausted" in result.stopped
    assert sorted(t.knobs["lora.r"] for t in result.trials) == [2, 4]  # each once, and the budget not filled with repeats


# --- a damaged row in a healthy database ------------------------------------------------------------

DAMAGE = [
    ("metrics not JSON", "metrics", "'{not json'"),
    ("unknown status", "status", "'weird'"),
    ("samples not a list", "samples", "'5'"),
    ("config not JSON", "config", "'[1, 2'"),
    ("a time that is not a time", "updated_at", "'garbage'"),
    ("a seed that is not a number", "seed", "'x'"),
]


@pytest.fixture(scope="module")
def healthy(tiny_neox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("healthy")
    f = write(tmp, tiny_neox, "evaluation: {drift: false}\nruns:\n  A: {lora: {r: 2}, train: {max_steps: 2}, "
              "generate: {max_new_tokens: 4}}\n")
    assert CliRunner().invoke(app, ["run", str(f), "-w", str(tmp / "ws")]).exit_code == 0
    return tmp / "ws"


@pytest.mark.parametrize("column, value", [(c, v) for _, c, v in DAMAGE], ids=[i for i, _, _ in DAMAGE])
def test_a_damaged_row_is_listed_reported_by_doctor_and_never_repaired_by_deleting_its_adapter(healthy, tmp_path,
                                                                                              column, value):
    import shutil
    import sqlite3
    from contextlib import closing

    ws = tmp_path / "ws"
    shutil.copytree(healthy, ws)
    with closing(sqlite3.connect(ws / "loralab.db")) as conn:
        conn.execute(f"UPDATE runs SET {column} = {value} WHERE name = 'A'")
        conn.commit()
    (run_dir,) = [p for p in (ws / "runs").iterdir()]
    files = sorted(str(p.relative_to(ws)) for p in run_dir.rglob("*"))
    ls = CliRunner().invoke(app, ["ls", "-w", str(ws), "--json"])
    assert ls.exit_code == 0 and '"status": "damaged"' in ls.output, ls.output
    for args in (["show", "A"], ["compare", "base", "A"]):
        out = CliRunner().invoke(app, [*args, "-w", str(ws)])
        assert out.exit_code == 1 and out.output.count("error:") == 1 and "Traceback" not in out.output, out.output
        assert "its database row is damaged" in out.output and "Fix:" in out.output
    for args in (["doctor"], ["doctor", "--repair"]):
        out = CliRunner().invoke(app, [*args, "-w", str(ws)])
        assert out.exit_code == 1 and "problem damaged-row" in out.output and column in out.output, out.output
    assert sorted(str(p.relative_to(ws)) for p in run_dir.rglob("*")) == files  # the adapter is still there
    assert CliRunner().invoke(app, ["show", "base", "-w", str(ws)]).exit_code == 0  # the healthy row still reads


# --- silent surprises get one line ----------------------------------------------------------------

ROWS = "".join(f'{{"instruction": "Say {w}.", "output": "{w}."}}\n' for w in ("hi", "yes", "no", "ok"))
NOTES = [
    ("epochs and max_steps both set", "runs:\n  A: {train: {epochs: 3, max_steps: 2}}\n", "{builtin: stdlib-docstrings, train_size: 8, eval_size: 2}",
     "train.epochs (3) and train.max_steps (2) are both set; max_steps decides, epochs is ignored"),
    ("eval data identical to training data", "runs:\n  A: {train: {max_steps: 2}}\n", "{path: d.jsonl, eval_path: d.jsonl}",
     "every eval example (4) is also a training example"),
    ("two runs with the same settings", "runs:\n  A: {train: {max_steps: 2}}\n  B: {train: {max_steps: 2}}\n",
     "{builtin: stdlib-docstrings, train_size: 8, eval_size: 2}", "runs A and B have the same settings"),
    ("eval_fraction with an eval file", "runs:\n  A: {train: {max_steps: 2}}\n", "{path: d.jsonl, eval_path: e.jsonl, eval_fraction: 0.3}",
     "data.eval_fraction (0.3) is ignored"),
    ("eval data overlapping training data", "runs:\n  A: {train: {max_steps: 2}}\n", "{path: d.jsonl, eval_path: e.jsonl}",
     "1 of 2 eval examples are also training examples"),
]


@pytest.mark.parametrize("body, data, note", [n[1:] for n in NOTES], ids=[n[0] for n in NOTES])
def test_valid_but_surprising_settings_get_one_note_from_validate_and_run(body, data, note, tiny_neox, tmp_path):
    (tmp_path / "d.jsonl").write_text(ROWS)
    (tmp_path / "e.jsonl").write_text(ROWS.splitlines()[0] + '\n{"instruction": "Say new.", "output": "New."}\n')
    f = tmp_path / "n.yaml"
    f.write_text(f"name: n\nmodel: {tiny_neox}\ndata: {data}\nevaluation: {{drift: false}}\n{body}")
    out = CliRunner().invoke(app, ["validate", str(f)], env={"COLUMNS": "300"})
    assert out.exit_code == 0 and out.output.count(note) == 1, out.output
    ran = CliRunner().invoke(app, ["run", str(f), "-w", str(tmp_path / "ws")], env={"COLUMNS": "300"})
    assert ran.exit_code == 0 and ran.output.count(note) == 1, ran.output


def test_comparing_a_run_with_itself_says_so(healthy):
    out = CliRunner().invoke(app, ["compare", "A", "A", "-w", str(healthy)])
    assert out.exit_code == 0 and "A given more than once" in out.output, out.output


def test_a_second_tpe_sweep_joining_a_live_study_never_trains_the_point_the_first_is_training(tiny_neox, tmp_path):
    f, ws = write(tmp_path, tiny_neox, TPE.replace("BUDGET", "3"), "sw"), tmp_path / "ws"
    gate = tmp_path / "go"
    first = Proc(tmp_path, "sweep", f, "-w", ws, fault="train.step:wait@1", gate=gate, name="first")  # held in trial 0
    first.until(lambda: "trial-0000" in statuses(ws), "trial 0 started")
    second = Proc(tmp_path, "sweep", f, "-w", ws, name="second")
    # The second runs what the budget leaves (3 minus the first's trial in flight), then waits for that trial.
    second.until(lambda: "Waiting for another sweep process" in second.output, "the second waits for trial 0")
    gate.touch()
    assert second.wait() == 0, second.output
    assert first.wait() == 0, first.output
    done = _complete(ws)
    points = [tuple(sorted(t.user_attrs["knobs"].items())) for t in done]
    assert len(points) == len(set(points)) == 3, points  # the budget exactly (both processes' trials), none repeated
    assert all(t.user_attrs["reused"] == 0 for t in done)


# --- names loralab makes itself ---------------------------------------------------------------------


def test_ablate_accepts_long_run_names_and_lists_each_run_once(tiny_neox, tmp_path, healthy):
    from loralab import api
    from loralab.errors import SpecError

    a, b = "a" * 64, "b" * 64
    f = tmp_path / "long.yaml"
    f.write_text(f"name: {'e' * 100}\nmodel: {tiny_neox}\nruns:\n  {a}: {{lora: {{r: 2, dropout: 0.0}}, train: {{max_steps: 2}}}}\n"
                 f"  {b}: {{lora: {{r: 4, dropout: 0.1}}, train: {{max_steps: 3}}}}\n")
    plan = api.ablate(f, a, b, workspace=tmp_path / "ws")  # names of its own within the limits the file checks
    assert len(plan.runs) >= 4 and plan.path.is_file()
    assert all(len(r.name) <= 64 for r in plan.runs) and len(plan.experiment.name) <= 128
    with pytest.raises(SpecError) as info:  # the stored A of the healthy workspace is not listed a second time
        api.ablate(write(tmp_path, tiny_neox, "runs:\n  A: {lora: {r: 2}}\n", "bad"), "A", "Z", workspace=healthy)
    assert "use one of: A)" in str(info.value) or str(info.value).rstrip().endswith("use one of: A"), str(info.value)


def test_validate_refuses_device_cuda_where_run_would(tiny_neox, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    f = write(tmp_path, tiny_neox, "device: cuda\nruns:\n  A: {train: {max_steps: 2}}\n", "gpu")
    for args in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2 and "no CUDA device" in out.output and "Fix: use device: auto or cpu" in out.output, out.output
    assert not (tmp_path / "ws").exists()
