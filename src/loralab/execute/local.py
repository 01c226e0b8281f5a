"""The default executor (execute.jobs.Executor): each job runs in this process, one at a time, on the base
model `execute.prepare` loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from loralab.execute.jobs import Job, Outcome
from loralab.execute.identity import run_id
from loralab.execute.prepare import Prepared
from loralab.execute.runner import train_run
from loralab.progress import Reporter
from loralab.workspace.store import Store


@dataclass
class LocalExecutor:
    """Runs each job in this process, one after the other, on the prepared base model, which every job
    leaves without an adapter. One slot: the base model holds one training adapter at a time."""

    prepared: Prepared
    store: Store
    reporter: Reporter = field(default_factory=Reporter)
    env: dict | None = None
    slots = 1  # not a field: the contract's count of jobs at once (execute.jobs.Executor)

    def run(self, job: Job) -> Outcome:
        hook = None
        if job.pause_at is not None:
            from loralab.sweep.pruning import PauseHook

            hook = PauseHook(self.prepared, job.experiment.sweep.resolved_pruner, job.pause_at)
        elif job.pruning is not None:
            from loralab.sweep.pruning import PruningHook, optuna_reporter
            from loralab.engine.train import plan_steps

            planned = plan_steps(len(self.prepared.dataset.train), job.run.train)
            spec = job.experiment.sweep.resolved_pruner
            hook = PruningHook(self.prepared, spec, optuna_reporter(job.pruning, spec), planned)
        status, reused = train_run(self.prepared, job.run, self.store, experiment=job.experiment.name,
                                   label=job.label or job.run.name, reporter=self.reporter, pruning=hook,
                                   force=job.force, env=self.env, full_eval=job.full_eval, probe=job.probe)
        return Outcome(run_id(self.prepared, job.run, job.full_eval, job.probe), status, reused)

    def close(self) -> None:
        pass
