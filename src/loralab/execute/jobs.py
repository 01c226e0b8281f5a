"""Where a run trains: one seam between planning (an experiment file, a sweep's study) and training.

A `Job` is plain data (the experiment, one run with its seed, what to evaluate, and pruning as the
study's storage and trial number rather than a closure), so it can be pickled and run in another
process or on another host. The jobs come from execute.plan (a file's runs x seeds, `repeats: auto`'s
rounds, a sweep trial's seeds). An `Executor` takes jobs and returns their outcomes. `LocalExecutor`, the
default (execute.local), runs a job in this process on the base model `execute.prepare` loaded,
and leaves that model as it found it (the adapter is unloaded after each job). `loralab run` and `loralab sweep` both go through
an executor, so another one (Ray actors, several adapters on one base) plugs in without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from loralab.config.schema import Experiment, RunSpec


@dataclass(frozen=True)
class Pruning:
    """How a job reports to its sweep's pruner: the Optuna study by storage URL and name, the trial by
    number, and the sign that turns the held-out loss into the objective's sense (1 minimise, -1 maximise)."""

    storage: str
    study: str
    trial: int
    sign: float = 1.0


@dataclass(frozen=True)
class Job:
    """One run to train (its seed is run.train.seed), evaluate and store under `experiment.name`."""

    experiment: Experiment
    run: RunSpec
    label: str = ""
    full_eval: bool = True  # generation and drift too; False: the losses only (a loss objective)
    probe: bool = True  # the loss on training examples (the generalization gap)
    force: bool = False  # train again even when an equal run is stored
    pruning: Pruning | None = None
    # Synchronous successive halving (sweep.halving): train to this step, measure the held-out loss there,
    # then stop with a checkpoint, stored `pruned` at that step until the sweep continues it (or drops it).
    pause_at: int | None = None


@dataclass(frozen=True)
class Outcome:
    run_id: str
    status: str  # finished, diverged, pruned, failed
    reused: bool  # an equal run was stored already: nothing trained


class Executor(Protocol):
    """Runs jobs. Implement `run` (train, evaluate and store one job, return its outcome; the store is
    the workspace the executor was made for), `close` (free what the executor holds), and `slots`.

    `slots`: how many jobs it runs at once (LocalExecutor 1: one base model in this process; RayExecutor
    its actors, one more as a node joins). The experiment loop (execute.loop) and a sweep keep that many
    jobs in flight and read it again before each start, so an executor may raise it while it runs. With
    `slots` above 1, `run` is called from one thread per job in flight and must be thread-safe; with 1,
    every call comes from the caller's thread, in turn, each job stored before the next starts. An executor
    without the attribute counts as 1 slot (`slots_of`)."""

    slots: int

    def run(self, job: Job) -> Outcome: ...

    def close(self) -> None: ...


def slots_of(executor) -> int:
    """How many jobs `executor` takes at once: its `slots`, at least 1 (1 when it declares none)."""
    return max(1, int(getattr(executor, "slots", 1)))


# What `loralab run` and `loralab sweep` call to get their executor: (prepared, store, reporter) -> Executor.
ExecutorFactory = Callable[[Any, Any, Any], Executor]
