"""The seam where a run trains: jobs are plain data, and `loralab run` and `loralab sweep` hand every
seed of every run to an executor, so another executor plugs in without touching either loop."""

from __future__ import annotations

import pickle

import loralab
import test_runner
import test_sweep
from loralab.config.loading import load_experiment
from loralab.execute.jobs import Job, Outcome, Pruning
from loralab.execute.local import LocalExecutor
from loralab.execute.loop import run_experiment
from loralab.sweep.study import run_sweep

from test_runner import experiment
from test_sweep import sweep_file


class Recording:
    """An executor that pickles every job it is given (as a remote one would) and hands the copy on."""

    jobs: list[Job] = []

    def __init__(self, prepared, store, reporter):
        self.inner = LocalExecutor(prepared, store, reporter)
        Recording.prepared = prepared
        Recording.weights = {k: v.clone() for k, v in prepared.base.model.state_dict().items()}

    def run(self, job: Job) -> Outcome:
        copy = pickle.loads(pickle.dumps(job))
        assert copy == job
        Recording.jobs.append(copy)
        return self.inner.run(copy)

    def close(self) -> None:
        Recording.closed = True


def test_a_job_is_plain_data_that_pickles(tiny_neox, tmp_path):
    exp = loralab.load(experiment(tmp_path, tiny_neox))
    job = Job(exp, exp.run("A").with_seed(3), "A (seed 3)", full_eval=False,
              pruning=Pruning("sqlite:////x/optuna.db", "seed", 7, -1.0))
    again = pickle.loads(pickle.dumps(job))
    assert again == job and again.run.train.seed == 3 and again.pruning.trial == 7


def test_run_hands_every_seed_to_the_executor_and_the_base_model_is_left_as_it_was(tiny_neox, tmp_path):
    Recording.jobs = []
    exp = loralab.load(experiment(tmp_path, tiny_neox, name="ex", runs="repeats: 2\n" + test_runner.SEED_RUNS))
    result = run_experiment(exp, workspace=tmp_path / "ws", executor=Recording)
    assert [(j.run.name, j.run.train.seed) for j in Recording.jobs] == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    assert Recording.closed and not result.failed
    assert [r.name for r in result.records] == ["base", "A", "A", "B", "B"]
    model = Recording.prepared.base.model  # no adapter left on it, its weights untouched
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all((model.state_dict()[k] == v).all() for k, v in Recording.weights.items())


def test_a_sweep_goes_through_the_executor_with_pruning_as_data(tiny_neox, tmp_path):
    Recording.jobs = []
    f = sweep_file(tmp_path, tiny_neox, """
strategy: grid
seed: 1
space:
  train.learning_rate: [2.0e-2, 1.0e-7]
pruner: {name: median, every: 2, startup_trials: 1}
""", extra="repeats: 2\n" + test_sweep.BASE.replace("max_steps: 6", "max_steps: 12"))
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws", executor=Recording)
    firsts = [j for j in Recording.jobs if j.run.train.seed == 0]
    assert [j.pruning.trial for j in firsts] == [t.number for t in result.trials]  # each trial's first seed reports
    assert all(j.pruning is None for j in Recording.jobs if j.run.train.seed != 0)  # the other seeds do not
    assert {j.pruning.storage for j in firsts} == {result.storage}
    # The far too low learning rate (second, as grid seed 1 orders them) was pruned through the job's Pruning.
    assert sorted(t.status for t in result.trials) == ["finished", "pruned"]
