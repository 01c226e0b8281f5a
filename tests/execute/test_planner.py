"""The planner (execute.plan.Planner, trial_jobs): which jobs come next, in which order, and when the
plan is done; driven by hand with ask / tell, as the experiment loop drives it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import loralab
from loralab.execute import plan as plan_mod
from loralab.execute.jobs import Pruning
from loralab.execute.plan import Decision, Planner, trial_jobs


def load(tmp_path, text: str):
    f = tmp_path / "e.yaml"
    f.write_text("name: e\n" + text)
    return loralab.load(f)


def record(job, status="finished"):
    """What the store hands back for a job's run, reduced to what the planner reads."""
    return SimpleNamespace(name=job.run.name, seed=job.run.train.seed, status=status)


def seeds(jobs):
    return [(j.run.name, j.run.train.seed) for j in jobs]


BASE = SimpleNamespace(name="base", seed=None, status="finished")


def test_fixed_seeds_are_each_run_times_its_seeds_in_file_order(tmp_path):
    exp = load(tmp_path, "runs: {A: {}, B: {train: {seed: 10}}}\nrepeats: 2\n")
    p = Planner(exp, exp.resolved_runs, BASE, force=True)
    assert p.planned == 4 and not p.done
    jobs = p.ask(10)  # more asked than there are: all four, in order
    assert seeds(jobs) == [("A", 0), ("A", 1), ("B", 10), ("B", 11)]  # each run counts up from its train.seed
    assert [j.label for j in jobs] == ["A (seed 0)", "A (seed 1)", "B (seed 10)", "B (seed 11)"]
    assert all(j.force for j in jobs) and all(j.experiment is exp for j in jobs)
    assert p.ask(10) == [] and not p.done  # all handed out, none told yet
    for j in reversed(jobs):  # told in any order
        p.tell(j, record(j))
    assert p.done and p.ask(1) == []
    assert [(n, [r.seed for r in g]) for n, g in p.groups().items()] == [
        ("base", [None]), ("A", [0, 1]), ("B", [10, 11])]  # grouped in the order asked, not told


def test_one_seed_a_run_is_labelled_by_its_name_and_listed_seeds_are_kept_as_given(tmp_path):
    exp = load(tmp_path, "runs: {A: {}, B: {}}\n")
    assert [j.label for j in Planner(exp, exp.resolved_runs).ask(5)] == ["A", "B"]
    exp = load(tmp_path, "runs: {A: {}}\nseeds: [7, 3]\n")
    assert seeds(Planner(exp, exp.resolved_runs).ask(5)) == [("A", 7), ("A", 3)]


@pytest.mark.parametrize("n, sizes", [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (3, [3, 2]), (0, [])])
def test_a_batch_is_never_larger_than_asked(tmp_path, n, sizes):
    """The loop asks for its executor's free slots: each answer holds at most that many jobs."""
    exp = load(tmp_path, "runs: {A: {}}\nrepeats: 5\n")
    p = Planner(exp, exp.resolved_runs)
    got = []
    while (jobs := p.ask(n)):
        got.append(len(jobs))
        for j in jobs:
            p.tell(j, record(j))
    assert got == sizes and p.done == (n > 0)


def scripted(monkeypatch, answers: list[list[str]]):
    """`decide` replaced by a list of answers (runs that get one more seed), one per round; records what
    each round's reading was given: per run, its seeds."""
    reads = []

    def decide(groups, plan, confidence=0.95, floors=None):
        reads.append({n: [r.seed for r in g] for n, g in groups.items()})
        more = answers[len(reads) - 1]
        return Decision(more, [f"{n}: open" for n in more])

    monkeypatch.setattr(plan_mod, "decide", decide)
    return reads


def test_repeats_auto_asks_decide_after_each_whole_round_and_stops_when_it_asks_for_none(tmp_path, monkeypatch):
    reads = scripted(monkeypatch, [["A", "B"], ["B"], []])
    exp = load(tmp_path, "runs: {A: {}, B: {}}\nrepeats: {min: 2, max: 5}\n")
    lines = []
    p = Planner(exp, exp.resolved_runs, BASE, log=lines.append)
    first = p.ask(3)
    assert seeds(first) == [("A", 0), ("A", 1), ("B", 0)] and p.planned == 4
    p.tell(first[0], record(first[0]))
    last = p.ask(3)
    assert seeds(last) == [("B", 1)]
    assert p.ask(3) == [] and reads == []  # three of the round still out: no reading yet
    for j in first[1:] + last:
        p.tell(j, record(j))
    second = p.ask(5)
    assert reads[0] == {"base": [None], "A": [0, 1], "B": [0, 1]}
    assert seeds(second) == [("A", 2), ("B", 2)] and [j.label for j in second] == ["A (seed 2)", "B (seed 2)"]
    assert p.planned == 6 and not p.done
    for j in second:
        p.tell(j, record(j))
    third = p.ask(5)
    assert seeds(third) == [("B", 3)] and p.planned == 7
    p.tell(third[0], record(third[0]))
    assert p.ask(5) == [] and p.done and len(reads) == 3
    assert reads[2] == {"base": [None], "A": [0, 1, 2], "B": [0, 1, 2, 3]}
    assert lines == ["repeats auto: A: open", "repeats auto: B: open", "repeats auto: B: open",
                     "repeats auto: settled or at the limit; seeds per run: A 3, B 4"]
    assert p.ask(5) == [] and len(reads) == 3  # done: decide is not asked again


def test_repeats_auto_hands_the_round_its_records_not_just_their_count(tmp_path, monkeypatch):
    """The real decide: a run with a failed seed gets no more (more seeds cannot settle a run that does
    not train), so the plan ends after the first round."""
    exp = load(tmp_path, "runs: {A: {}}\nrepeats: {min: 2, max: 4}\n")
    lines = []
    p = Planner(exp, exp.resolved_runs, None, log=lines.append)
    jobs = p.ask(2)
    p.tell(jobs[0], record(jobs[0]))
    p.tell(jobs[1], record(jobs[1], "failed"))
    assert p.ask(2) == [] and p.done
    assert lines == ["repeats auto: settled or at the limit; seeds per run: A 2"]


def test_a_trial_is_its_run_once_per_seed_and_only_the_first_reports_and_pauses(tmp_path):
    exp = load(tmp_path, "runs: {A: {}}\nrepeats: 3\n")
    run = exp.resolved_runs[0]
    pruning = Pruning("sqlite:////x/optuna.db", "s", 4)
    jobs = trial_jobs(exp, run, "trial-4", full_eval=False, probe=False, pruning=pruning, pause_at=3)
    assert seeds(jobs) == [("A", 0), ("A", 1), ("A", 2)]
    assert [j.label for j in jobs] == ["trial-4 (seed 0)", "trial-4 (seed 1)", "trial-4 (seed 2)"]
    assert [j.pruning for j in jobs] == [pruning, None, None] and [j.pause_at for j in jobs] == [3, None, None]
    assert not any(j.full_eval or j.probe or j.force for j in jobs)
    one = trial_jobs(load(tmp_path, "runs: {A: {}}\n"), run, "trial-0")
    assert [j.label for j in one] == ["trial-0"] and one[0].full_eval and one[0].probe
