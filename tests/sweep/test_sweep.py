"""Sweeps: the search space and its validation, then real Optuna studies on tiny models — pruning,
budgets, reproducibility, kill -9 and resume, trial isolation, dry run."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from rich.console import Console

from loralab.cli import app
from loralab.progress import Reporter
from loralab.errors import SpecError
from loralab.execute.prepare import prepare
from loralab.config.loading import load_experiment, parse_experiment
from loralab.workspace.store import Store
from loralab.config.space import Space, make_run
from loralab.sweep.study import run_sweep, run_trial

BASE = """
evaluation: {drift: false}
defaults:
  lora: {r: 4, target_modules: [query_key_value]}
  train: {learning_rate: 1.0e-3, batch_size: 2, max_steps: 6}
  generate: {max_new_tokens: 4}
"""


def sweep_file(tmp_path: Path, model: Path, sweep: str, name: str = "sw", extra: str = BASE) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {model}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 f"{extra}\nsweep:\n" + "\n".join("  " + line for line in sweep.strip().splitlines()) + "\n")
    return p


def parse(text: str):
    return parse_experiment(yaml.safe_load(text), "exp.yaml", text)


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(text)
    return [str(p) for p in info.value.problems]


# --- the space ---------------------------------------------------------------------------------


def test_grid_expands_every_point_with_linked_alpha_resolved():
    exp = parse("""
sweep:
  strategy: grid
  space:
    lora.r: [4, 8]
    lora.alpha: {ratio_of: lora.r, values: [1, 2]}
    train.learning_rate: [1e-4, 1.0e-3]
    generate.max_new_tokens: [16, 32]
""")
    points = Space(exp.sweep).expand()
    assert len(points) == 16
    expected = [{"lora.r": r, "lora.alpha": float(k * r), "train.learning_rate": lr, "generate.max_new_tokens": c}
                for r in (4, 8) for k in (1, 2) for lr in (1e-4, 1e-3) for c in (16, 32)]
    assert points == expected  # file order, first knob slowest; "1e-4" (text to YAML 1.1) is a number
    run = make_run({"lora": {}, "train": {}, "generate": {}}, points[-1], "t")
    assert (run.lora.r, run.lora.alpha, run.train.learning_rate, run.generate.max_new_tokens) == (8, 16.0, 1e-3, [32])
    # Every trial is evaluated at every cap the space can pick (and the start's 64), so trials compare.
    assert exp.eval_caps == [16, 32, 64]


def test_an_unswept_alpha_follows_the_swept_r():
    # alpha unset in the start settings means 2r; a swept r must keep that, not inherit alpha of r=8.
    run = make_run({"lora": {"r": 8}, "train": {}, "generate": {}}, {"lora.r": 2}, "t")
    assert run.lora.alpha == 4.0


@pytest.mark.parametrize("sweep, where, message", [
    ("space: {lora.rank: [4]}\nbudget: {trials: 2}", "sweep.space.lora.rank", "unknown knob"),
    ("space: {lora.r: []}\nbudget: {trials: 2}", "sweep.space.lora.r", "no choices to try"),
    ("space: {train.learning_rate: {low: 1.0e-3, high: 1.0e-4}}\nbudget: {trials: 2}",
     "sweep.space.train.learning_rate", "low (0.001) must be below high (0.0001)"),
    ("space: {train.weight_decay: {low: 0, high: 0.1, log: true}}\nbudget: {trials: 2}",
     "sweep.space.train.weight_decay", "a log range needs low > 0"),
    ("space: {lora.alpha: {ratio_of: lora.r, values: [1, 2]}}\nbudget: {trials: 2}",
     "sweep.space.lora.alpha.ratio_of", "ratio_of names no plain knob of the space"),
    ("space: {lora.bias: [none, all], lora.alpha: {ratio_of: lora.bias, values: [1]}}\nbudget: {trials: 2}",
     "sweep.space.lora.alpha.ratio_of", "ratio_of needs a numeric knob"),
    ("strategy: grid\nspace: {train.learning_rate: {low: 1.0e-5, high: 1.0e-3}}",
     "sweep.space.train.learning_rate", "grid needs a list of choices"),
    ("space: {lora.r: [4]}\nbudget: {money: 5}", "sweep.budget.money", "a money budget needs a price"),
    ("space: {lora.r: [4]}", "sweep.budget", "strategy tpe has no end"),
    ("strategy: annealing\nspace: {lora.r: [4]}\nbudget: {trials: 2}", "sweep.strategy", "unknown strategy"),
    ("from: Z\nspace: {lora.r: [4]}\nbudget: {trials: 2}", "sweep.from", "no such run in this file"),
    ("space: {lora.dropout: [0.1, 1.5]}\nbudget: {trials: 2}", "sweep.space.lora.dropout", "a trial would be invalid"),
    ("space: {generate.max_new_tokens: {low: 8, high: 64}}\nbudget: {trials: 2}",
     "sweep.space.generate.max_new_tokens", "a range of caps"),
    ("space: {lora.r: [4]}\nbudget: {trials: 2}\nobjective: [eval_loss, drift_kl]\npruner: {name: median}",
     "sweep.pruner", "Optuna prunes only single-objective studies"),
    ("space: {lora.r: [4]}\nbudget: {trials: 2, hours: 1}", "sweep.budget.hours", "unknown key"),
])
def test_each_bad_sweep_names_its_field(sweep, where, message):
    text = "runs: {A: {}}\nsweep:\n" + "\n".join("  " + line for line in sweep.splitlines()) + "\n"
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].startswith(where + " (line") and message in found[0], found


def test_all_sweep_problems_are_reported_at_once():
    found = problems("""sweep:
  strategy: grid
  space:
    lora.rank: [4]
    train.learning_rate: {low: 1.0e-5, high: 1.0e-3}
  budget: {money: 5}
""")
    assert [p.split(" (line")[0] for p in found] == [
        "sweep.space.lora.rank", "sweep.space.train.learning_rate", "sweep.budget.money"]
    assert "(line 4)" in found[0] and "Fix: use a field of lora, train or generate" in found[0]


def test_the_shipped_sweep_example_validates():
    exp = load_experiment(Path(__file__).parents[2] / "examples" / "sweep.yaml")
    assert exp.sweep.strategy == "tpe" and exp.sweep.budget.trials == 12
    assert (Path(__file__).parents[2] / "examples" / "sweep.yaml").is_symlink()


def _trial(state: str, spent_s: float, status: str | None = None):
    from optuna.trial import TrialState, create_trial

    st = TrialState[state]
    return create_trial(state=st, value=1.0 if st == TrialState.COMPLETE else None,
                        user_attrs={"spent_s": spent_s, **({"status": status} if status else {})})


@pytest.mark.parametrize("budget, reason", [
    ("{trials: 3}", "budget of 3 trials reached"),  # complete, pruned and a failed trial count; interrupted not
    ("{trials: 4}", None),
    ("{minutes: 1}", "time budget of 1 min reached (1.00 min spent)"),  # 10 + 20 + 30 s; the interrupted 100 s not
    ("{minutes: 1.01}", None),
    ("{money: 0.05}", "money budget of 0.05 reached (0.0600 spent)"),  # 60 s at 3.6 per hour
    ("{money: 0.07}", None),
])
def test_budget_counts_finished_pruned_and_failed_trials_not_interrupted_ones(budget, reason):
    exp = parse(f"cost: {{per_hour: 3.6}}\nsweep: {{space: {{lora.r: [4]}}, budget: {budget}}}")
    trials = [_trial("COMPLETE", 10), _trial("PRUNED", 20), _trial("FAIL", 30, "failed"),
              _trial("FAIL", 100, "interrupted"), _trial("RUNNING", 0)]
    from loralab.sweep.study import budget_reason

    assert budget_reason(trials, exp.sweep, 3.6) == reason


@pytest.mark.parametrize("budget, running, reason", [
    ("{minutes: 1.3}", 0, None),  # 60 s spent of 78
    ("{minutes: 1.3}", 1, "time budget of 1.3 min reached (1.00 min spent, 1 trial(s) still running)"),  # + 20 s expected
    ("{minutes: 1.4}", 1, None),  # 80 s expected of 84: one more may start
    ("{money: 0.07}", 1, "money budget of 0.07 reached (0.0600 spent, 1 trial(s) still running)"),
    ("{money: 0.07}", 0, None),
])
def test_trials_running_elsewhere_count_against_time_and_money_at_the_mean_trial_cost(budget, running, reason):
    """Another worker's running trial will cost about what a trial has cost so far: counted now, N workers
    stop where one would."""
    exp = parse(f"cost: {{per_hour: 3.6}}\nsweep: {{space: {{lora.r: [4]}}, budget: {budget}}}")
    trials = [_trial("COMPLETE", 10), _trial("PRUNED", 20), _trial("FAIL", 30, "failed")]
    from loralab.sweep.study import budget_reason

    assert budget_reason(trials, exp.sweep, 3.6, in_flight=running) == reason


# --- studies on tiny models ---------------------------------------------------------------------


def completed(study_result) -> list[dict]:
    return [t.knobs for t in study_result.trials if t.state == "COMPLETE"]


def test_tpe_is_reproducible_with_its_seed(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, """
strategy: tpe
seed: 3
space:
  lora.r: [2, 4, 8]
  train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
pruner: {name: none}
budget: {trials: 3}
""")
    a = run_sweep(load_experiment(f), workspace=tmp_path / "w1")
    b = run_sweep(load_experiment(f), workspace=tmp_path / "w2")
    seq = [t.knobs for t in a.trials]
    assert len(seq) == 3 and seq == [t.knobs for t in b.trials]
    assert len({t["train.learning_rate"] for t in seq}) == 3  # really sampled, not one point thrice
    assert [t.values for t in a.trials] == [t.values for t in b.trials]
    # The study is Optuna's own, in the workspace, under the experiment's name.
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'w1' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.trials[0].params["train.learning_rate"] == seq[0]["train.learning_rate"]


def good_and_bad_lr(tmp_path: Path, model: Path, pruner: str) -> Path:
    """Two learning rates, a good one first (grid seed 1 orders them so), 12 steps each."""
    return sweep_file(tmp_path, model, f"strategy: grid\nseed: 1\nspace:\n  train.learning_rate: [2.0e-2, 1.0e-7]\n"
                      f"pruner: {pruner}", extra=BASE.replace("max_steps: 6", "max_steps: 12"))


def count_eval_losses(monkeypatch) -> list[int]:
    """Record how many examples each held-out loss measurement covers."""
    from loralab.engine import train as train

    calls: list[int] = []
    real = train.eval_losses
    monkeypatch.setattr(train, "eval_losses", lambda model, ex, **kw: calls.append(len(ex)) or real(model, ex, **kw))
    return calls


def test_a_pruned_trial_saves_its_other_seeds_whole_training_too(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nseed: 1\nspace:\n  train.learning_rate: [2.0e-2, 1.0e-7]\n"
                   "pruner: {name: median, every: 2, startup_trials: 1}",
                   extra="repeats: 2\n" + BASE.replace("max_steps: 6", "max_steps: 12"))
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    good, bad = result.trials
    assert bad.status == "pruned" and len(bad.run_ids) == 1  # its second seed never ran
    m = Store(tmp_path / "ws").get(bad.run_ids[0]).metrics
    assert m["saved_steps"] == 10 and result.saved_steps == 10 + 12  # the first seed's rest, and the second seed whole
    assert result.saved_s > m["saved_s"]


def test_median_pruner_stops_a_far_too_low_learning_rate_early(tiny_neox, tmp_path):
    # Grid seed 1 runs the good learning rate first (Optuna shuffles the grid with the seed); with
    # one startup trial the median rule then judges the second trial at step 2 against the first.
    f = good_and_bad_lr(tmp_path, tiny_neox, "{name: median, every: 2, startup_trials: 1}")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    good, bad = result.trials
    assert good.knobs == {"train.learning_rate": 2e-2} and good.status == "finished"
    assert bad.knobs == {"train.learning_rate": 1e-7} and (bad.state, bad.status) == ("PRUNED", "pruned")
    rec = Store(tmp_path / "ws").get(bad.run_ids[0])
    assert rec.status == "pruned" and rec.adapter_path is None
    m = rec.metrics
    assert m["pruned_step"] == 2 and m["planned_steps"] == 12 and m["saved_steps"] == 10
    assert m["saved_s"] > 0 and math.isfinite(m["eval_loss"]) and len(rec.curves["loss"]) == 2
    assert m["eval_loss"] > Store(tmp_path / "ws").get(good.run_ids[0]).metrics["eval_loss"]
    assert result.saved_steps == 10 and result.saved_s == m["saved_s"]
    assert [t.number for t in result.best] == [0]
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}")
    assert list(study.trials[1].intermediate_values) == [2]  # reported once, then pruned


@pytest.mark.parametrize("pruner, planned, steps", [
    ({"name": "successive_halving", "every": 8}, 64, [8, 32]),  # Optuna's rungs: 8 x 4^k
    ({"name": "successive_halving", "every": 4, "reduction_factor": 2}, 64, [4, 8, 16, 32]),
    ({"name": "hyperband", "every": 8}, 64, [8, 24]),  # reduction factor 3 by default
    ({"name": "median", "every": 8}, 64, [8, 16, 24, 32, 40, 48, 56]),
    ({"name": "median", "every": 8, "warmup_steps": 20}, 64, [24, 32, 40, 48, 56]),
    ({"name": "median", "every": 10}, 10, []),  # nothing left to save at the last step
    ({"name": "none"}, 64, []),
])
def test_the_held_out_loss_is_measured_only_where_the_pruner_decides(pruner, planned, steps):
    from loralab.config.schema import PrunerSpec
    from loralab.sweep.pruning import decision_steps

    assert decision_steps(PrunerSpec(**pruner), planned) == steps


def test_a_pruned_trial_stores_the_loss_its_pruner_measured_without_measuring_again(tiny_neox, tmp_path, monkeypatch):
    calls = count_eval_losses(monkeypatch)
    f = good_and_bad_lr(tmp_path, tiny_neox, "{name: successive_halving, every: 2, reduction_factor: 2, synchronous: false}")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    good, bad = result.trials
    assert (good.status, bad.status) == ("finished", "pruned")
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}")
    assert list(study.trials[0].intermediate_values) == [2, 4, 8]  # rungs only, not every 2 steps
    reported = study.trials[1].intermediate_values
    rec = Store(tmp_path / "ws").get(bad.run_ids[0])
    assert rec.metrics["eval_loss"] == reported[rec.metrics["pruned_step"]] == rec.metrics["pruned_loss"]
    assert rec.metrics["pruned_loss_examples"] == 4
    # Trial 0: 3 rungs + the final held-out loss (an eval_loss objective needs no training probe);
    # trial 1: its rungs only; then the best trial's confirmation: one final loss per fresh seed.
    assert len(calls) == 3 + 1 + len(reported) + 2
    finished = Store(tmp_path / "ws").get(good.run_ids[0]).metrics
    assert "eval_loss" in finished and "generalization_gap" not in finished


def test_a_trial_pruned_on_a_subset_keeps_that_loss_and_pays_for_no_whole_set_evaluation(tiny_neox, tmp_path,
                                                                                           monkeypatch):
    calls = count_eval_losses(monkeypatch)
    f = good_and_bad_lr(tmp_path, tiny_neox, "{name: successive_halving, every: 2, reduction_factor: 2, eval_examples: 2, synchronous: false}")
    good, bad = run_sweep(load_experiment(f), workspace=tmp_path / "ws").trials
    assert (good.status, bad.status) == ("finished", "pruned")
    m = Store(tmp_path / "ws").get(bad.run_ids[0]).metrics
    assert "eval_loss" not in m and m["pruned_loss_examples"] == 2 and math.isfinite(m["pruned_loss"])
    # The first rung on 2 examples, each later one on reduction_factor (2) times more, all 4 at most; the
    # finished trial's final loss on all 4; nothing more for the pruned one; then the best trial's
    # confirmation on 2 fresh seeds, unpruned, on all 4.
    rungs = {2: 2, 4: 4, 8: 4}
    assert calls == [2, 4, 4, 4] + [n for rung, n in rungs.items() if rung <= m["pruned_step"]] + [4, 4]


def test_trials_budget_is_respected_and_a_rerun_counts_nothing_twice(tiny_neox, tmp_path):
    sweep = "strategy: random\nspace: {{train.learning_rate: {{low: 1.0e-4, high: 1.0e-2, log: true}}}}\n" \
            "pruner: {{name: none}}\nbudget: {{trials: {n}}}"
    f = sweep_file(tmp_path, tiny_neox, sweep.format(n=2))
    first = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert len(first.trials) == 2 and first.ran == [0, 1] and first.stopped == "budget of 2 trials reached"
    again = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert again.ran == [] and len(again.trials) == 2
    f = sweep_file(tmp_path, tiny_neox, sweep.format(n=3))  # a larger budget continues the same study
    more = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert more.ran == [2] and [t.status for t in more.trials] == ["finished"] * 3


def test_minutes_budget_stops_after_the_first_trial(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, """
strategy: grid
space: {lora.r: [2, 4, 8]}
budget: {minutes: 0.0001}
""")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert result.ran == [0] and len(result.trials) == 1
    assert result.stopped.startswith("time budget of 0.0001 min reached")
    assert result.spent_s == result.trials[0].spent_s > 0.0001 * 60


def test_repeats_average_the_objective_and_stored_runs_are_reused(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [4]}", extra="repeats: 2\n" + BASE)
    first = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    (trial,) = first.trials
    store = Store(tmp_path / "ws")
    losses = [store.get(rid).metrics["eval_loss"] for rid in trial.run_ids]
    assert len(trial.run_ids) == 2 and [store.get(rid).seed for rid in trial.run_ids] == [0, 1]
    assert trial.values == [pytest.approx(sum(losses) / 2)]
    # A new study (another name) with the same configs trains nothing: the runs are reused.
    g = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [4]}", name="other", extra="repeats: 2\n" + BASE)
    other = run_sweep(load_experiment(g), workspace=tmp_path / "ws")
    study = optuna.load_study(study_name="other", storage=f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}")
    assert study.trials[0].user_attrs["reused"] == 2 and other.trials[0].values == trial.values
    assert [r.name for r in store.group("other/trial-0000")] == ["trial-0000", "trial-0000"]


def test_two_objectives_give_the_pareto_set(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, """
strategy: grid
space: {lora.r: [2, 8], train.learning_rate: [1.0e-3, 2.0e-2]}
objective: [eval_loss, trainable_params]
""")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    vals = {t.number: t.values for t in result.trials}
    assert len(vals) == 4

    def dominated(v):
        return any(all(a <= b for a, b in zip(w, v)) and w != v for w in vals.values())

    assert sorted(t.number for t in result.best) == sorted(n for n, v in vals.items() if not dominated(v))


def test_an_objective_metric_typo_is_found_when_the_file_is_loaded_before_any_trial(tiny_neox, tmp_path):
    # Found once a trial finished, it cost a whole trial (and left a FAIL trial next to a finished run).
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [2, 4]}\nobjective: {metric: rogue_l}")
    with pytest.raises(SpecError) as info:
        load_experiment(f)
    text = str(info.value)
    assert "sweep.objective" in text and "no trial records this metric (got 'rogue_l')" in text
    assert "rouge_l" in text  # the keys it could have meant
    for typo in ("rouge_l@99", "drift_kl"):  # a cap no run asks for; drift while evaluation.drift is off
        with pytest.raises(SpecError, match="no trial records this metric"):
            load_experiment(sweep_file(tmp_path, tiny_neox, f"strategy: grid\nspace: {{lora.r: [2]}}\nobjective: {typo}"))
    assert not (tmp_path / "ws").exists()


def _states(db: Path) -> list[str]:
    """Each trial's state, RUNNING only once all its parameters are set (it is training then)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT state, (SELECT count(*) FROM trial_params p WHERE p.trial_id = t.trial_id) "
                                "FROM trials t").fetchall()
    except sqlite3.Error:  # not created yet, or being written
        return []
    return [s if s != "RUNNING" or n == 2 else "STARTING" for s, n in rows]


KILL_SWEEP = """
strategy: grid
space: {lora.r: [2, 4], train.learning_rate: [1.0e-3, 1.0e-2]}
pruner: {name: none}
"""


def test_kill_9_mid_sweep_then_resume_equals_an_uninterrupted_sweep(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, KILL_SWEEP, extra=BASE.replace("max_steps: 6", "max_steps: 30"))
    ws = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "loralab.cli", "sweep", str(f), "-w", str(ws)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            states = _states(ws / "optuna.db")
            if "COMPLETE" in states and "RUNNING" in states:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("never saw a complete and a running trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "RUNNING" in _states(ws / "optuna.db")
    resumed = run_sweep(load_experiment(f), workspace=ws)
    whole = run_sweep(load_experiment(f), workspace=tmp_path / "whole")
    key = lambda k: tuple(sorted(k.items()))  # noqa: E731
    assert sorted(map(key, completed(resumed))) == sorted(map(key, completed(whole)))
    assert len(completed(resumed)) == 4  # every grid point once: nothing lost, nothing run twice
    interrupted = [t for t in resumed.trials if t.status == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].state == "FAIL"
    assert interrupted[0].knobs in completed(resumed)  # its configuration was re-run
    assert resumed.trials[-1].status == "finished" and resumed.stopped == "every grid point done"
    # Same config, same numbers, whichever process and position it ran in.
    loss = lambda r: {key(t.knobs): t.values for t in r.trials if t.state == "COMPLETE"}  # noqa: E731
    assert loss(resumed) == loss(whole)
    retry = next(t for t in resumed.trials if t.knobs == interrupted[0].knobs and t.state == "COMPLETE")
    assert retry.number > interrupted[0].number and Store(ws).get(retry.run_ids[0]).status == "finished"


def test_a_trial_killed_before_all_its_parameters_were_set_is_recovered(tmp_path):
    from loralab.progress import Reporter
    from loralab.sweep.study import _GridSampler, recover_interrupted

    exp = parse("sweep: {strategy: grid, space: {lora.r: [2, 4], train.learning_rate: [1.0e-3, 1.0e-2]}}")
    space, url = Space(exp.sweep), f"sqlite:///{tmp_path / 'o.db'}"

    def study():
        return optuna.create_study(storage=url, sampler=_GridSampler(space.grid(), seed=0), study_name="x",
                                   load_if_exists=True)

    first = study()
    first.ask()  # got its grid point, then the process died before suggesting anything
    first._storage.create_new_trial(first._study_id)  # died inside ask: RUNNING, no grid point yet
    again = study()
    assert recover_interrupted(again, space, Reporter()) == [0, 1]
    t0, t1, retry = again.get_trials()
    # The grid counts a failed trial's point as visited, so that point is enqueued again ...
    assert retry.state.name == "WAITING" and retry.system_attrs["fixed_params"] == t0.user_attrs["knobs"]
    assert retry.user_attrs == {"retry_of": 0} and t0.user_attrs["status"] == "interrupted"
    # ... while the trial that had no point yet takes none (recovering it must not assign one).
    assert "grid_id" not in t1.system_attrs and t1.state.name == "FAIL" and "knobs" not in t1.user_attrs
    assert recover_interrupted(study(), space, Reporter()) == []  # nothing left to recover, nothing enqueued twice
    assert len(again.get_trials()) == 3


def test_a_trial_gives_the_same_metrics_alone_as_after_other_trials(tiny_llama, tmp_path):
    f = sweep_file(tmp_path, tiny_llama, "strategy: grid\nspace: {lora.r: [2, 4, 8]}\npruner: {name: none}",
                   extra=BASE.replace("[query_key_value]", "[q_proj, v_proj]"))
    exp = load_experiment(f)
    whole = run_sweep(exp, workspace=tmp_path / "whole")
    last = whole.trials[-1]  # ran after two other adapters came and went
    p = prepare(exp)
    store = Store(tmp_path / "alone")
    alone = run_trial(p, exp, last.knobs, store, name="alone")
    assert alone.status == "finished" and alone.run_ids == last.run_ids and alone.reused == 0
    a, b = store.get(alone.run_ids[0]), Store(tmp_path / "whole").get(last.run_ids[0])
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s") and k not in ("peak_mem_mb", "tokens_per_s")}  # noqa: E731
    assert untimed(a.metrics) == untimed(b.metrics) and a.curves["loss"] == b.curves["loss"]
    assert [s["outputs"] for s in a.samples] == [s["outputs"] for s in b.samples]


def test_cli_dry_run_lists_the_grid_and_an_estimate_and_writes_nothing(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, """
strategy: grid
space:
  lora.r: [2, 4]
  lora.alpha: {ratio_of: lora.r, values: [1, 2]}
""")
    out = CliRunner().invoke(app, ["sweep", str(f), "--dry-run", "-w", str(tmp_path / "ws")], terminal_width=200)
    assert out.exit_code == 0, out.output
    lines = [line.strip() for line in out.output.splitlines()]
    assert [line.split("  (")[0] for line in lines if line[:2] in ("1.", "2.", "3.", "4.")] == [
        "1. lora.r=2 lora.alpha=2", "2. lora.r=2 lora.alpha=4", "3. lora.r=4 lora.alpha=4", "4. lora.r=4 lora.alpha=8"]
    assert "grid of 4 trial(s) x 1 seed(s)" in out.output
    # Nothing stored yet: training and a trial's evaluation are measured here, now, and both counted.
    assert "train tokens/s (measured here now: 3 timed training steps" in out.output
    assert "s per run for its evaluation, adapter and store" in out.output and "Estimated total: about" in out.output
    assert not (tmp_path / "ws").exists()


def test_cli_sweep_without_a_sweep_section_exits_2(tiny_neox, tmp_path):
    f = tmp_path / "plain.yaml"
    f.write_text(f"model: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n")
    out = CliRunner().invoke(app, ["sweep", str(f), "-w", str(tmp_path / "ws")])
    assert out.exit_code == 2 and "no `sweep:` section" in out.output
    assert not (tmp_path / "ws").exists()


def test_a_dry_run_measures_training_and_evaluation_here_and_leaves_the_base_bare(tiny_neox, tmp_path):
    from loralab.config.space import experiment_start, make_run
    from loralab.execute.prepare import prepare
    from loralab.sweep.study import _throughput, measure_here

    exp = load_experiment(sweep_file(tmp_path, tiny_neox, "strategy: random\nspace: {lora.r: [2, 4]}\nbudget: {trials: 2}"))
    prepared = prepare(exp)
    before = {k: v.clone() for k, v in prepared.base.model.state_dict().items()}
    tps, source, eval_s = measure_here(exp, prepared, make_run(experiment_start(exp), {}, "start"))
    assert tps > 0 and eval_s > 0 and source.startswith("measured here now")
    assert "losses only" in source  # an eval_loss objective: its trials do not generate
    after = prepared.base.model.state_dict()
    assert after.keys() == before.keys() and all((after[k] == v).all() for k, v in before.items())  # no adapter left
    assert _throughput(tmp_path / "nothing-stored", prepared.base.fingerprint) is None


@pytest.mark.parametrize("sweep, full", [
    ("objective: {metric: eval_loss}", False),
    ("objective: {metric: generalization_gap}", False),
    ("objective: {metric: rouge_l@64, direction: maximize}", True),
    ("objective: {metric: mean_tokens, direction: minimize}", True),
    ("objective: {metric: drift_kl, direction: minimize}", True),
    ("objective: {metric: eval_loss}\nevaluate: full", True),
])
def test_trials_generate_only_when_the_objective_needs_it(sweep, full):
    from loralab.config.space import needs_full_eval

    exp = parse(f"sweep:\n  space: {{lora.r: [4]}}\n  budget: {{trials: 1}}\n" + "".join(f"  {x}\n" for x in sweep.splitlines()))
    assert needs_full_eval(exp.sweep) is full


def test_a_loss_objective_trial_skips_generation_and_is_not_reused_by_a_full_run(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [4]}\nobjective: {metric: eval_loss}")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    (trial,) = result.trials
    rec = Store(tmp_path / "ws").get(trial.run_ids[0])
    assert rec.status == "finished" and "eval_loss" in rec.metrics and "train_eval_loss" not in rec.metrics
    assert not any(k.startswith("rouge_l") for k in rec.metrics) and rec.samples[0]["outputs"] == {}
    # The same settings with `evaluate: full` are another run: it generates, and nothing is reused.
    g = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [4]}\nobjective: {metric: eval_loss}\nevaluate: full",
                   name="full")
    (full,) = run_sweep(load_experiment(g), workspace=tmp_path / "ws").trials
    assert full.run_ids != trial.run_ids
    assert "rouge_l@4" in Store(tmp_path / "ws").get(full.run_ids[0]).metrics


def test_validate_describes_the_sweep_it_would_run():
    from loralab.config.space import describe

    exp = parse("sweep:\n  strategy: grid\n  space: {lora.r: [4, 8, 16], lora.alpha: {ratio_of: lora.r, values: [1, 2]}}\n"
                "  pruner: {name: successive_halving, every: 4}\n  budget: {minutes: 10}")
    text = "\n".join(describe(exp.sweep))
    assert "a grid of 6 point(s)" in text and "lora.alpha (= 1, 2 x lora.r)" in text
    assert "successive_halving, held-out loss at steps 4 x 4^k" in text
    assert "eval_loss (minimize); trials measure the losses only" in text and "budget: minutes 10" in text
    exp = parse("sweep: {space: {generate.max_new_tokens: [32, 64]}, objective: {metric: rouge_l}, budget: {trials: 3}}")
    text = "\n".join(describe(exp.sweep))
    assert "rouge_l (maximize)" in text and "losses only" not in text and "every 10 steps" in text


@pytest.mark.parametrize("objective, probe", [
    ("eval_loss", False), ("generalization_gap", True), ("train_ppl", True), ("rouge_l", True)])
def test_trials_measure_the_training_probe_only_when_the_objective_needs_it(objective, probe):
    from loralab.config.space import needs_probe

    exp = parse(f"sweep:\n  space: {{lora.r: [4]}}\n  budget: {{trials: 1}}\n  objective: {{metric: {objective}}}\n")
    assert needs_probe(exp.sweep) is probe


def test_trials_within_noise_of_the_best_are_named(tiny_neox, tmp_path):
    """With repeats, the best mean alone can be a lucky seed: the sweep names the trials whose objective
    is within noise of it. max_new_tokens does not touch training or the eval loss, so its two trials
    have the same losses seed for seed: within noise, exactly; a learning rate of 1e-7 trains nothing and
    is clearly worse. Three seeds: with two, a seed part on 1 df leaves even this 0.07 within noise (issue 21:
    the examples' df no longer narrow it)."""
    f = sweep_file(tmp_path, tiny_neox, """
strategy: grid
space:
  generate.max_new_tokens: [4, 6]
  train.learning_rate: [2.0e-2, 1.0e-7]
pruner: {name: none}
""", extra="repeats: 3\n" + BASE)
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    best = result.best[0]
    assert best.knobs["train.learning_rate"] == 2e-2
    twin = next(t.number for t in result.trials if t.number != best.number and t.knobs["train.learning_rate"] == 2e-2)
    assert result.close_to_best == [twin]


def test_space_auto_proposes_the_evidence_space_and_says_why(tiny_llama, tmp_path):
    from loralab.config.schema import PRIOR_SPACE
    from loralab.config.space import describe

    exp = parse("sweep: {space: auto, budget: {trials: 3}}")
    assert set(exp.sweep.space) == set(PRIOR_SPACE) and exp.sweep.from_priors
    assert exp.sweep.space["train.learning_rate"].log and exp.sweep.space["lora.alpha"].ratio_of == "lora.r"
    text = "\n".join(describe(exp.sweep))
    assert "space: auto, proposed from published evidence (docs/priors.md)" in text
    assert "LoRA Without Regret" in text and "alpha = 2r" in text and "every linear layer" in text
    assert not parse("sweep: {space: {lora.r: [4, 8]}, budget: {trials: 2}}").sweep.from_priors


@pytest.mark.parametrize("knobs, expected", [
    ({"lora.r": 8, "train.learning_rate": 1e-3}, ["lora.r = 8, the highest value searched (2 to 8)"]),
    ({"lora.r": 4, "train.learning_rate": 1e-5}, ["train.learning_rate = 1e-05, the lowest value searched (1e-05 to 0.01)"]),
    ({"lora.r": 4, "train.learning_rate": 1e-3}, []),
    # 98% of the log range (1e-5 * 1000 ** 0.98): 13% below the end in linear terms, at the edge in the knob's own scale
    ({"lora.r": 4, "train.learning_rate": 1e-5 * 1000 ** 0.98},
     ["train.learning_rate = 0.00870964, the highest value searched (1e-05 to 0.01)"]),
    ({"lora.r": 4, "train.learning_rate": 1e-5 * 1000 ** 0.9}, []),  # 90%: inside
])
def test_a_best_point_at_an_edge_of_the_space_is_named(knobs, expected):
    from loralab.config.space import edges

    exp = parse("sweep:\n  space:\n    lora.r: [2, 4, 8]\n    train.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}\n"
                "  budget: {trials: 3}")
    assert edges(Space(exp.sweep), knobs) == expected


def test_an_edge_is_named_only_when_a_trial_inside_is_worse_beyond_noise():
    from loralab.config.space import edges

    space = Space(parse("sweep:\n  space: {lora.r: [2, 4, 8], lora.dropout: [0.0, 0.1]}\n  budget: {trials: 3}").sweep)
    best = {"lora.r": 8, "lora.dropout": 0.1}
    inside = [({"lora.r": 4, "lora.dropout": 0.1}, True), ({"lora.r": 2, "lora.dropout": 0.1}, True)]
    assert edges(space, best, inside) == []  # every trial with a smaller r is within noise of the best
    worse = inside[:1] + [({"lora.r": 2, "lora.dropout": 0.1}, False)]
    assert edges(space, best, worse) == ["lora.r = 8, the highest value searched (2 to 8)"]  # dropout never moved
    assert edges(space, best, []) == []  # no neighbour finished: nothing shows the edge is better


def test_the_study_storage_survives_another_process_creating_optunas_tables_at_the_same_moment(tmp_path, monkeypatch):
    """Optuna checks for its tables, then creates them: a second host, `loralab report` or optuna-dashboard
    doing the same at that moment makes one CREATE fail on a table that now exists. Seen on PostgreSQL
    as a UniqueViolation on alembic_version; the next try finds every table."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    from loralab.sweep import study as study_mod

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise IntegrityError("CREATE TABLE alembic_version", {}, Exception(
                'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'))
        return real(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert isinstance(study_mod.study_storage(url), real) and len(calls) == 2

    def down(url, **kw):
        calls.append(url)
        raise OperationalError("connect", {}, Exception("connection refused"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", down)
    with pytest.raises(OperationalError):
        study_mod.study_storage(url)
    assert len(calls) == 1  # an unreachable server is not a race: said at once


def test_the_best_trials_are_confirmed_on_fresh_seeds_before_the_best_is_announced(tiny_neox, tmp_path):
    """The winner's curse: the best searched value among trials is partly luck. The top 2 are trained
    again on seeds the search never used; the best is announced by the confirmed value, the searched
    one beside it; a rerun reuses the confirmation's runs."""
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {train.learning_rate: [2.0e-2, 1.0e-3, 1.0e-7]}\n"
                   "pruner: {name: none}\nconfirm: {top: 2, seeds: 2}")
    console = Console(record=True, width=200)
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws", reporter=Reporter(console))
    log = console.export_text()
    assert len(result.confirmed) == 2
    store = Store(tmp_path / "ws")
    for number, c in result.confirmed.items():
        assert c["seeds"] == [1000, 1001] and c["status"] == "finished"
        recs = [store.get(i) for i in c["run_ids"]]
        assert [r.seed for r in recs] == [1000, 1001] and {r.name for r in recs} == {f"trial-{number:04d}-confirm"}
        assert c["value"] == pytest.approx(sum(r.metrics["eval_loss"] for r in recs) / 2)
        assert c["lo"] < c["value"] < c["hi"]
        searched = next(t for t in result.trials if t.number == number).values[0]
        assert c["searched"] == searched
    # Announced by the confirmed value: the best of the confirmed, not necessarily the best searched.
    best = result.best[0]
    assert result.confirmed[best.number]["value"] == min(c["value"] for c in result.confirmed.values())
    assert f"trial {best.number}:" in log and "confirmed on fresh seeds 1000, 1001" in log and "searched" in log
    assert result.confirm_s > 0
    # The study keeps it (a dashboard or report reads it), and a rerun trains nothing again.
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}")
    assert study.user_attrs[f"confirmed:{best.number}"]["value"] == result.confirmed[best.number]["value"]
    again = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert again.confirm_s == 0 and again.confirmed[best.number]["value"] == result.confirmed[best.number]["value"]


def test_without_confirmation_the_announced_best_says_its_value_is_optimistic(tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [2, 4]}\npruner: {name: none}\nconfirm: {top: 0}")
    console = Console(record=True, width=200)
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws", reporter=Reporter(console))
    assert result.confirmed == {} and "best of 2: optimistic" in console.export_text()


def test_a_widened_space_starts_from_what_the_workspace_measured(tiny_neox, tmp_path):
    """Issue 24: the same sweep again with one more learning rate trains only the new point. The points
    measured before come back as trials of the study (they count for the search, not against the
    budget); editing the space is a start, not an error; the dry run says what it would add."""
    narrow = "strategy: grid\nspace: {train.learning_rate: [1.0e-3, 1.0e-2]}\npruner: {name: none}\nconfirm: {top: 0}"
    f = sweep_file(tmp_path, tiny_neox, narrow)
    first = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert len(first.ran) == 2
    wide = narrow.replace("[1.0e-3, 1.0e-2]", "[1.0e-3, 1.0e-2, 3.0e-2]") + "\nbudget: {trials: 1}"
    f = sweep_file(tmp_path, tiny_neox, wide)
    console = Console(record=True, width=200)
    run_sweep(load_experiment(f), workspace=tmp_path / "ws", reporter=Reporter(console), dry_run=True)
    assert "2 point(s) of this space already measured" in console.export_text()
    console = Console(record=True, width=200)
    second = run_sweep(load_experiment(f), workspace=tmp_path / "ws", reporter=Reporter(console))
    log = console.export_text()
    assert "sweep section changed" in log and "Started from the workspace: 2 point(s)" in log
    # One new trial ran (the budget of 1 counts it alone); the two measured points did not train again.
    assert len(second.ran) == 1 and second.trials[second.ran[0]].knobs["train.learning_rate"] == 3.0e-2
    assert second.stopped == "every grid point done" or second.stopped.startswith("budget of 1 trials")
    warm = [t for t in second.trials if t.number not in second.ran]
    assert sorted(t.knobs["train.learning_rate"] for t in warm) == [1.0e-3, 1.0e-2]
    old = {tuple(sorted(t.run_ids)) for t in first.trials}
    assert {tuple(sorted(t.run_ids)) for t in warm} == old  # the very runs the first sweep stored
    assert all(t.status == "finished" and t.values for t in warm)
    runs = Store(tmp_path / "ws").all_runs()
    assert len(runs) == 3  # nothing trained twice
    # The measured points keep their values: the best is the best of all three.
    best = min(second.trials, key=lambda t: t.values[0])
    assert second.best[0].number == best.number


def test_a_run_of_another_file_inside_the_space_is_a_measured_point(tiny_neox, tmp_path):
    """A `loralab run` of the same model and data with settings that are a point of the space: the
    sweep takes it (fully evaluated, it stands for a loss-only trial) instead of training it."""
    from loralab.execute.loop import run_experiment

    runs_file = tmp_path / "runs.yaml"
    runs_file.write_text(f"name: plain\nmodel: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                         f"{BASE}\nruns:\n  X: {{train: {{learning_rate: 1.0e-2}}}}\n")
    run_experiment(load_experiment(runs_file), workspace=tmp_path / "ws")
    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {train.learning_rate: [1.0e-3, 1.0e-2]}\n"
                   "pruner: {name: none}\nconfirm: {top: 0}")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert len(result.ran) == 1 and result.trials[result.ran[0]].knobs["train.learning_rate"] == 1.0e-3
    taken = next(t for t in result.trials if t.number not in result.ran)
    assert taken.knobs["train.learning_rate"] == 1.0e-2 and taken.status == "finished"


HALVING = """
strategy: grid
seed: 1
space: {train.learning_rate: [2.0e-2, 1.0e-7, 1.0e-3, 3.0e-7]}
pruner: {name: successive_halving, every: 3, reduction_factor: 2}
confirm: {top: 0}
"""


@pytest.mark.parametrize("in_memory", [True, False])
def test_synchronous_halving_pauses_every_trial_at_a_rung_before_any_trains_on(tiny_neox, tmp_path, monkeypatch, in_memory):
    """Breadth first: all four trials reach step 3 before any trains further; the best two go on from
    where they paused (kept in memory, or, when they do not fit, from their checkpoints) to step 6, the
    best of those to the end (12 steps). The trial that went the whole way ends exactly as an
    uninterrupted run of it does."""
    from rich.console import Console

    from loralab.execute import checkpoint as ck_mod, local as local_mod
    from loralab.progress import Reporter
    from loralab.sweep import halving

    saves: list[int] = []
    real_save = ck_mod.Checkpoints.save
    monkeypatch.setattr(ck_mod.Checkpoints, "save", lambda self, state, **kw: saves.append(state["step"])
                        or real_save(self, state, **kw))
    if not in_memory:
        monkeypatch.setattr(halving, "park_budget", lambda prepared, worker: 0)
    pauses: list[int | None] = []
    real_run = local_mod.LocalExecutor.run
    monkeypatch.setattr(local_mod.LocalExecutor, "run", lambda self, job: pauses.append(job.pause_at) or real_run(self, job))
    f = sweep_file(tmp_path, tiny_neox, HALVING, extra=BASE.replace("max_steps: 6", "max_steps: 12"))
    console = Console(record=True, width=200)
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws", reporter=Reporter(console))
    assert pauses[:4] == [3, 3, 3, 3]  # every trial to the first rung first
    assert pauses[4:6] == [6, 6] and pauses[6:] == [None]  # two go on to step 6, one to the end
    states = sorted(t.status for t in result.trials)
    assert states.count("pruned") == 3 and states.count("finished") == 1
    store = Store(tmp_path / "ws")
    best = result.trials[result.ran[-1]] if result.trials[result.ran[-1]].status == "finished" else \
        next(t for t in result.trials if t.status == "finished")
    rec = store.get(best.run_ids[0])
    assert rec.metrics["steps"] == 12 and rec.timings.get("resumed_at") == [3, 6]
    assert not any((tmp_path / "ws" / "runs").glob("*/checkpoints/*"))  # none kept once the bracket ended
    assert saves == ([] if in_memory else [3, 3, 3, 3, 6, 6])  # in memory: no checkpoint written at a pause
    pruned = [store.get(t.run_ids[0]) for t in result.trials if t.status == "pruned"]
    assert sorted(r.metrics["pruned_step"] for r in pruned) == [3, 3, 6]
    # The same configuration trained without a pause: the same loss and adapter.
    from loralab.execute.loop import run_experiment
    lr = best.knobs["train.learning_rate"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"name: plain\nmodel: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                     + BASE.replace("max_steps: 6", "max_steps: 12") + f"runs:\n  X: {{train: {{learning_rate: {lr}}}}}\n")
    other = run_experiment(load_experiment(plain), workspace=tmp_path / "ws2").records[-1]
    assert other.metrics["eval_loss"] == rec.metrics["eval_loss"]
    assert other.curves["loss"] == rec.curves["loss"]


@pytest.mark.parametrize("lora", [
    "{r: 4, init: pissa, dropout: 0.0}",  # the base rewritten while the trial trains, put back at each pause
    "{r: 4, use_dora: true, dropout: 0.1}",  # DoRA's magnitudes, dropout's RNG
    "{r: 4, loraplus_lr_ratio: 16, use_rslora: true}",  # LoRA+'s two optimizer groups
], ids=["pissa", "dora", "loraplus-rslora"])
def test_a_paused_trial_of_every_lora_variant_ends_as_an_uninterrupted_run(lora, tiny_neox, tmp_path):
    """Paused at each rung (its adapter removed from the base, its trainer state kept in memory) and
    continued: the winner's curve, adapter and loss equal a run of its settings that never paused."""
    import torch
    from safetensors.torch import load_file

    from loralab.execute.loop import run_experiment

    base = BASE.replace("max_steps: 6", "max_steps: 12").replace("lora: {r: 4, target_modules: [query_key_value]}",
                                                                  f"lora: {lora}")
    result = run_sweep(load_experiment(sweep_file(tmp_path, tiny_neox, HALVING, extra=base)), workspace=tmp_path / "ws")
    best = next(t for t in result.trials if t.status == "finished")
    rec = Store(tmp_path / "ws").get(best.run_ids[0])
    assert rec.timings.get("resumed_at") == [3, 6]
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"name: plain\nmodel: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                     + base + f"runs:\n  X: {{train: {{learning_rate: {best.knobs['train.learning_rate']}}}}}\n")
    other = run_experiment(load_experiment(plain), workspace=tmp_path / "ws2").records[-1]
    assert other.curves["loss"] == rec.curves["loss"] and other.curves["grad_norm"] == rec.curves["grad_norm"]
    assert other.metrics["eval_loss"] == rec.metrics["eval_loss"]
    mine = load_file(f"{rec.adapter_path}/adapter_model.safetensors")
    theirs = load_file(f"{other.adapter_path}/adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("known, factor, expected", [
    ([], 4, 1),  # nothing measured there before: 1 in 4 of the bracket, at least one
    ([0.1, 0.2, 0.3], 2, 0),  # 3 of 5 go on: the three earlier ones, better than both
    ([0.1, 0.6, 0.95], 2, 1),  # 3 of 5: 0.1, the bracket's 0.5, the earlier 0.6
    ([0.9], 4, 1),  # 1 of 3: the bracket's best
    ([0.9], 2, 2),  # 2 of 3: both of the bracket's
])
def test_a_rung_keeps_the_best_share_of_every_trial_measured_there(known, factor, expected):
    from loralab.sweep.halving import kept

    ranked = [(0.5, "a", None), (0.7, "b", None)]
    assert kept(ranked, known, reduction_factor=factor) == expected


@pytest.mark.parametrize("name, n_eval, expected", [
    ("successive_halving", 32, {2: 8, 8: 32, 32: 32}),  # 4x more at each later rung, the eval set at most
    ("successive_halving", 100, {2: 8, 8: 32, 32: 100}),
    ("hyperband", 100, {2: 8, 8: 32, 32: 100}),
    ("median", 100, {2: 8, 8: 8, 32: 8}),  # no rungs: the same examples at every decision step
])
def test_each_later_rung_is_judged_on_more_eval_examples(name, n_eval, expected):
    from loralab.config.schema import PrunerSpec
    from loralab.sweep.pruning import rung_examples

    pr = PrunerSpec(name=name, every=2, eval_examples=8, reduction_factor=4)
    assert {step: rung_examples(pr, step, n_eval) for step in expected} == expected
    assert rung_examples(PrunerSpec(name=name, every=2, reduction_factor=4), 8, n_eval) == n_eval  # unset: all


def test_halving_measures_each_rung_on_its_own_number_of_examples(tiny_neox, tmp_path):
    """`eval_examples: 1` with reduction factor 2: the rung at step 3 is judged on 1 eval example, the one at
    step 6 on 2; the stored runs say which count each loss covers (pruned ones and the finished one)."""
    f = sweep_file(tmp_path, tiny_neox, HALVING.replace("reduction_factor: 2}", "reduction_factor: 2, eval_examples: 1}"),
                   extra=BASE.replace("max_steps: 6", "max_steps: 12"))
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    store = Store(tmp_path / "ws")
    pruned = sorted((store.get(t.run_ids[0]).metrics for t in result.trials if t.status == "pruned"),
                    key=lambda m: m["pruned_step"])
    assert [(m["pruned_step"], m["pruned_loss_examples"]) for m in pruned] == [(3, 1), (3, 1), (6, 2)]
    done = store.get(next(t for t in result.trials if t.status == "finished").run_ids[0]).metrics
    assert done["rung_loss_examples"] == {"3": 1, "6": 2}
    assert pruned[-1]["rung_loss_examples"] == {"3": 1, "6": 2}


def test_a_widened_halving_sweep_ranks_its_new_points_against_the_rungs_measured_before(tiny_neox, tmp_path):
    """Issue 24: the same halving sweep with one more learning rate, one so large the loss rises. Alone in its bracket
    it would train to the end; ranked at the first rung against the four trials measured there before
    (their rung losses stored with their runs), it stops there."""
    from rich.console import Console

    from loralab.progress import Reporter

    extra = BASE.replace("max_steps: 6", "max_steps: 12")
    first = run_sweep(load_experiment(sweep_file(tmp_path, tiny_neox, HALVING, extra=extra)), workspace=tmp_path / "ws")
    store = Store(tmp_path / "ws")
    done = next(t for t in first.trials if t.status == "finished")
    rungs = store.get(done.run_ids[0]).metrics["rung_losses"]
    assert sorted(rungs) == ["3", "6"] and all(isinstance(v, float) for v in rungs.values())  # kept across its pauses
    wide = HALVING.replace("3.0e-7]", "3.0e-7, 3.0e-1]")
    console = Console(record=True, width=200)
    second = run_sweep(load_experiment(sweep_file(tmp_path, tiny_neox, wide, extra=extra)), workspace=tmp_path / "ws",
                       reporter=Reporter(console))
    log = console.export_text()
    assert "Started from the workspace: 4 point(s)" in log and "ranked with 4 earlier trial(s)" in log
    new = second.trials[second.ran[0]]
    assert len(second.ran) == 1 and new.knobs["train.learning_rate"] == 3.0e-1
    assert new.status == "pruned" and store.get(new.run_ids[0]).metrics["pruned_step"] == 3
    assert sum(r.kind == "lora" for r in store.all_runs()) == 5  # nothing measured before trained again


def test_a_dry_run_after_full_runs_counts_only_what_a_loss_only_trial_does(tiny_neox, tmp_path):
    """Runs of `loralab run` generate and measure drift; a loss-only sweep's trials do neither, so its
    estimate takes their loss pass only (scaled per eval example), a generating sweep their whole eval."""
    import loralab
    from loralab.sweep.study import _throughput

    f = sweep_file(tmp_path, tiny_neox, "strategy: random\nspace: {lora.r: [2, 4]}\nbudget: {trials: 2}")
    loralab.run(load_experiment(f), workspace=tmp_path / "ws")
    rec = next(r for r in Store(tmp_path / "ws").list() if r.kind == "lora")
    assert "generate_s" in rec.timings  # it generated: its eval_s holds more than a loss-only trial does
    loss_only = load_experiment(f).sweep
    full = parse("sweep:\n  space: {lora.r: [4]}\n  budget: {trials: 1}\n  evaluate: full\n").sweep
    n, fp = rec.data["n_eval"], rec.model["fingerprint"]
    loss, whole, twice = (_throughput(tmp_path / "ws", fp, sw, k)[2] for sw, k in ((loss_only, n), (full, n), (full, 2 * n)))
    assert loss >= rec.timings["eval_loss_s"]  # and the run's time outside training and evaluation (same in each)
    assert whole - loss == pytest.approx(rec.metrics["eval_s"] - rec.timings["eval_loss_s"])
    assert twice - whole == pytest.approx(rec.metrics["eval_s"])  # scaled per eval example


def test_a_sweep_says_which_trial_of_how_many_runs_and_when_it_will_end(tiny_neox, tmp_path):
    from rich.console import Console

    from loralab.progress import Reporter

    f = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [2, 4, 8]}\nbudget: {trials: 2}")
    console = Console(record=True, width=200)
    run_sweep(load_experiment(f), workspace=tmp_path / "ws", reporter=Reporter(console, 1e9))
    lines = [line for line in console.export_text().splitlines() if line.startswith("trial ") and " of " in line]
    assert [line.split(" (")[0] for line in lines] == ["trial 1 of 2", "trial 2 of 2"]  # the budget, not the grid's 3
    assert "ETA" not in lines[0] and "1 done in" in lines[1] and "ETA" in lines[1]
    # run again: the study is done; a larger budget continues it, counting the trials already run
    more = sweep_file(tmp_path, tiny_neox, "strategy: grid\nspace: {lora.r: [2, 4, 8]}\nbudget: {trials: 3}")
    console = Console(record=True, width=200)
    run_sweep(load_experiment(more), workspace=tmp_path / "ws", reporter=Reporter(console, 1e9))
    assert [line.split(" (")[0] for line in console.export_text().splitlines()
            if line.startswith("trial ") and " of " in line] == ["trial 3 of 3"]


def test_a_relative_sweep_storage_is_read_from_the_files_folder_not_the_current_one(tiny_neox, tmp_path, monkeypatch):
    """Like every path in the file: run from another folder, the same file opens the same study (read
    from the current folder, it opened a second, empty study there)."""
    from loralab.config.loading import load_experiment
    from loralab.sweep.study import storage_url

    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "studies").mkdir(parents=True)
    elsewhere.mkdir()
    f = sweep_file(proj, tiny_neox, "strategy: grid\nspace: {lora.r: [2, 4]}\nstorage: 'sqlite:///studies/optuna.db'")
    monkeypatch.chdir(elsewhere)  # where no studies/ folder is: validate used to refuse it from here
    exp = load_experiment(f)
    assert storage_url(exp, tmp_path / "ws") == f"sqlite:///{proj / 'studies' / 'optuna.db'}"
    f.write_text(f.read_text().replace("studies/optuna.db", "gone/optuna.db"))
    with pytest.raises(SpecError) as info:
        load_experiment(f)
    assert f"folder {proj / 'gone'} does not exist" in str(info.value.problems[0])
    abs_url = f"sqlite:///{tmp_path / 'abs.db'}"
    f.write_text(f.read_text().replace("sqlite:///gone/optuna.db", abs_url))
    assert storage_url(load_experiment(f), tmp_path / "ws") == abs_url  # absolute paths as they are
