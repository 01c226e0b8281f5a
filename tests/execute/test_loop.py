"""The experiment loop (execute.loop): the planner's jobs on an executor, as many at once as it declares
`slots`, the records added in the order the jobs were planned, and stored runs reused, not trained."""

from __future__ import annotations

from dataclasses import dataclass
import threading
from types import SimpleNamespace

import pytest

import loralab
import test_runner
from loralab.execute import plan as plan_mod
from loralab.execute.jobs import Job, Outcome
from loralab.execute.local import LocalExecutor
from loralab.execute.loop import run_experiment, run_jobs
from loralab.execute.plan import Decision, Planner
from loralab.execute.loop import ExperimentResult
from loralab.progress import Overall

from test_runner import experiment


class Lines:
    """A reporter that keeps the lines it is given."""

    def __init__(self):
        self.lines: list[str] = []

    def log(self, line: str) -> None:
        self.lines.append(line)


@dataclass(frozen=True)
class Rec:
    """The fields of a stored record the loop reads (frozen, as the store's RunRecord)."""

    id: str
    name: str | None
    seed: int | None
    status: str


class Store:
    """What the loop reads back from the store: a record per run id."""

    def __init__(self, status: dict | None = None):
        self.status = status or {}

    def get(self, rid: str):
        return Rec(id=rid, name=None, seed=None, status=self.status.get(rid, "finished"))


class Slotted:
    """An executor of `slots` that trains nothing: it notes which jobs run at once and in which thread,
    and each job's `during(job)` runs while the job is in flight."""

    def __init__(self, slots: int, during=lambda job: None, stored=(), status=None):
        self.slots, self.during, self.stored, self.status = slots, during, set(stored), status or {}
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.started: list[str] = []
        self.threads: set[str] = set()

    def run(self, job: Job) -> Outcome:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.started.append(job.label)
            self.threads.add(threading.current_thread().name)
        try:
            self.during(job)
        finally:
            with self.lock:
                self.now -= 1
        return Outcome(job.label, self.status.get(job.label, "finished"), job.label in self.stored)

    def close(self) -> None:
        pass


def load(tmp_path, text: str):
    f = tmp_path / "e.yaml"
    f.write_text("name: e\n" + text)
    return loralab.load(f)


def drive(tmp_path, worker, text="runs: {A: {}, B: {}}\nrepeats: 2\n", store=None):
    exp = load(tmp_path, text)
    rep = Lines()
    planner = Planner(exp, exp.resolved_runs, SimpleNamespace(name="base", seed=None, status="finished"), log=rep.log)
    result = ExperimentResult(workspace=tmp_path, records=[])
    run_jobs(worker, planner, store or Store(worker.status), result, Overall(rep, "run", planner.planned))
    return result, rep.lines, planner


def test_one_slot_runs_each_job_in_this_thread_in_turn(tmp_path):
    worker = Slotted(1)
    result, lines, planner = drive(tmp_path, worker)
    assert worker.started == ["A (seed 0)", "A (seed 1)", "B (seed 0)", "B (seed 1)"]
    assert worker.most == 1 and worker.threads == {threading.main_thread().name}
    assert [(r.name, r.seed) for r in result.records] == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    assert [line.split(",")[0] for line in lines] == ["run 1 of 4 (A (seed 0))", "run 2 of 4 (A (seed 1))",
                                                      "run 3 of 4 (B (seed 0))", "run 4 of 4 (B (seed 1))"]
    assert planner.done


def test_an_executor_with_two_slots_gets_two_jobs_at_once(tmp_path):
    """Each job waits at a barrier for a second one: run one at a time, the barrier breaks (a timeout)."""
    gate = threading.Barrier(2, timeout=20)
    worker = Slotted(2, during=lambda job: gate.wait())
    result, _, _ = drive(tmp_path, worker)
    assert worker.most == 2 and sorted(worker.started) == ["A (seed 0)", "A (seed 1)", "B (seed 0)", "B (seed 1)"]
    assert threading.main_thread().name not in worker.threads
    assert [(r.name, r.seed) for r in result.records] == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]


def test_never_more_jobs_in_flight_than_slots_and_records_keep_the_planned_order(tmp_path):
    """Three slots, seven jobs; the first job ends last of its batch: the records still come in plan order."""
    second_done = threading.Event()

    def during(job):
        if job.label == "A (seed 0)":
            assert second_done.wait(20)
        elif job.label == "A (seed 1)":
            second_done.set()

    worker = Slotted(3, during=during)
    result, _, _ = drive(tmp_path, worker, "runs: {A: {}}\nrepeats: 7\n")
    assert worker.most <= 3 and len(worker.started) == 7
    assert [r.seed for r in result.records] == list(range(7))


def test_slots_are_read_again_as_jobs_start(tmp_path):
    """An executor whose slots grow (a Ray node joined) gets more jobs in flight from then on."""
    gate = threading.Barrier(2, timeout=20)

    def during(job):
        if job.label == "A (seed 0)":
            worker.slots = 2  # from the next job on: two at once
        else:
            gate.wait()

    worker = Slotted(1, during=during)
    result, _, _ = drive(tmp_path, worker, "runs: {A: {}}\nrepeats: 5\n")
    assert worker.most == 2 and len(result.records) == 5


def test_reused_failed_and_diverged_jobs_are_listed_and_the_rest_goes_on(tmp_path):
    worker = Slotted(1, stored={"A (seed 0)", "B (seed 1)"}, status={"A (seed 1)": "failed", "B (seed 0)": "diverged"})
    result, lines, _ = drive(tmp_path, worker)
    assert result.skipped == ["A (seed 0)", "B (seed 1)"]
    assert result.failed == ["A (seed 1)"] and result.diverged == ["B (seed 0)"]
    assert len(result.records) == 4 and lines[-1].startswith("run 4 of 4 (B (seed 1))")


def test_an_error_in_a_job_stops_the_loop(tmp_path):
    """The first job fails; with two slots the second, in flight, is let finish (held a moment, so the
    loop sees the error first), and nothing else starts."""
    def during(job):
        if job.label == "A (seed 0)":
            raise OSError("disk full")
        threading.Event().wait(2)

    for slots in (1, 2):
        worker = Slotted(slots, during=during)
        with pytest.raises(OSError, match="disk full"):
            drive(tmp_path, worker)
        assert sorted(worker.started) == ["A (seed 0)", "A (seed 1)"][:slots]


def test_repeats_auto_rounds_go_through_the_same_loop_and_grow_the_count(tmp_path, monkeypatch):
    """Two slots: the second round starts only once the whole first round is told; the progress count
    grows by the round ("run 5 of 5")."""
    rounds = []

    def decide(groups, plan, confidence=0.95, floors=None):
        rounds.append({n: len(g) for n, g in groups.items()})
        return Decision(["A"] if len(rounds) == 1 else [], ["A vs base: open"] if len(rounds) == 1 else [])

    monkeypatch.setattr(plan_mod, "decide", decide)
    worker = Slotted(2)
    result, lines, planner = drive(tmp_path, worker, "runs: {A: {}, B: {}}\nrepeats: {min: 2, max: 4}\n")
    assert rounds == [{"base": 1, "A": 2, "B": 2}, {"base": 1, "A": 3, "B": 2}]
    assert [(r.name, r.seed) for r in result.records] == [("A", 0), ("A", 1), ("B", 0), ("B", 1), ("A", 2)]
    assert "repeats auto: A vs base: open" in lines and lines.index("repeats auto: A vs base: open") == 4
    assert lines[5].startswith("run 5 of 5 (A (seed 2))")
    assert lines[-1] == "repeats auto: settled or at the limit; seeds per run: A 3, B 2" and planner.done


class Recording(LocalExecutor):
    """The local executor, noting every job it is given."""

    jobs: list[Job] = []

    def run(self, job: Job) -> Outcome:
        Recording.jobs.append(job)
        return super().run(job)


def test_a_rerun_with_more_seeds_hands_every_job_over_and_trains_only_the_new_ones(tiny_neox, tmp_path):
    """On real runs: the stored seeds are planned again (in order, counted in the progress lines) and the
    executor reuses them; only seed 2 of each run trains."""
    first = loralab.load(experiment(tmp_path, tiny_neox, name="ex", runs="repeats: 2\n" + test_runner.SEED_RUNS))
    run_experiment(first, workspace=tmp_path / "ws")
    Recording.jobs = []
    again = loralab.load(experiment(tmp_path, tiny_neox, name="ex", runs="repeats: 3\n" + test_runner.SEED_RUNS))
    result = run_experiment(again, workspace=tmp_path / "ws", executor=Recording)
    assert [(j.run.name, j.run.train.seed) for j in Recording.jobs] == [
        ("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert result.skipped == ["base", "A (seed 0)", "A (seed 1)", "B (seed 0)", "B (seed 1)"]
    assert [(r.name, r.seed, r.status) for r in result.records[1:]] == [
        ("A", 0, "finished"), ("A", 1, "finished"), ("A", 2, "finished"),
        ("B", 0, "finished"), ("B", 1, "finished"), ("B", 2, "finished")]
