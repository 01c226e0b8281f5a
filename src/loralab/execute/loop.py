"""Run an experiment: the base model once, then the planner's jobs (execute.plan.Planner) on an executor,
as many at once as it has slots, each stored before its outcome is read back.

Fixed seeds and `repeats: auto` go through the same loop: the planner says which jobs come next, the loop
only runs them and tells it how each ended.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from loralab.execute.jobs import ExecutorFactory, Job, slots_of
from loralab.execute.local import LocalExecutor
from loralab.execute.plan import Planner
from loralab.execute.evaluate import store_base
from loralab.execute.prepare import open_workspace, prepare, resolve_workspace
from loralab.config.schema import Experiment
from loralab.progress import Overall, Reporter
from loralab.workspace.status import Status
from loralab.workspace.store import RunRecord, Store, storage_error


@dataclass
class ExperimentResult:
    workspace: Path
    records: list[RunRecord]  # base first, then the runs in file order
    skipped: list[str] = field(default_factory=list)  # already finished, reused
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)

    def groups(self) -> dict[str, list[RunRecord]]:
        """Records by run name, all seeds of a run together, in file order."""
        out: dict[str, list[RunRecord]] = {}
        for r in self.records:
            out.setdefault(r.name, []).append(r)
        return out


def run_experiment(exp: Experiment, *, workspace: str | Path | None = None, only: list[str] | None = None,
                   force: bool = False, reporter: Reporter | None = None,
                   executor: ExecutorFactory | None = None) -> ExperimentResult:
    """Train and evaluate the experiment's runs, each once per seed (finished ones are reused unless `force`).
    Each seed of each run is a job for `executor(prepared, store, reporter)` (default: LocalExecutor)."""
    rep = reporter or Reporter()
    prepared = prepare(exp, only, rep)
    ws = resolve_workspace(exp, workspace)
    result = ExperimentResult(workspace=ws, records=[])
    with open_workspace(exp, ws) as store:
        try:
            base, reused = store_base(prepared, store, rep, ws, force)
            if reused:
                result.skipped.append("base")
            result.records.append(base)
            worker = (executor or LocalExecutor)(prepared, store, rep)
            planner = Planner(exp, prepared.runs, base, force=force, log=rep.log)
            run_jobs(worker, planner, store, result, Overall(rep, "run", planner.planned))
            worker.close()
        except Exception as err:  # the disk filled up, or the workspace became unwritable: say so, not a traceback
            raise storage_error(err, ws) or err
    return result


def run_jobs(worker, planner: Planner, store: Store, result: ExperimentResult, overall: Overall) -> None:
    """Run the planner's jobs until it is done, keeping up to `worker.slots` in flight (read again as jobs
    start: an executor's slots grow when a node joins). With one slot each job runs in this thread, stored
    before the next starts; with more, one thread per job in flight. Records are added to `result` in the
    order the jobs were asked for, whatever order they end in."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    def counted(job: Job):  # "run 3 of 6 (B (seed 1)), ..., ETA 4 min" as each job starts
        started = overall.start(job.label)
        out = worker.run(job)
        overall.finish(started, reused=out.reused)
        return out

    ended: deque = deque()  # [job, outcome or None], in the order asked

    def end(entry: list, out) -> None:
        entry[1] = out
        while ended and ended[0][1] is not None:
            job, out = ended.popleft()
            _record(job, out, store, result, planner)

    running: dict = {}  # future -> its entry in `ended`
    with ThreadPoolExecutor(max_workers=256, thread_name_prefix="run") as pool:  # threads made as jobs need them
        while True:
            slots = slots_of(worker)
            jobs = planner.ask(slots - len(running))
            overall.total = planner.planned  # repeats: auto adds the seeds each round plans
            for job in jobs:
                ended.append(entry := [job, None])
                if slots == 1 and not running:  # one slot: in this thread, as before
                    end(entry, counted(job))
                else:
                    running[pool.submit(counted, job)] = entry
            if not running:
                if planner.done:
                    return
                if not jobs:  # nothing out, nothing to start, yet not done: a planner that would hang the loop
                    raise RuntimeError("the planner gave no job and has none out, yet is not done")
                continue
            try:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:  # stop the jobs in flight too (their rows stay `running`; a rerun takes them over)
                worker.close()
                raise
            for f in done:
                end(running.pop(f), f.result())  # a job's error stops the experiment, as it would in this thread


def _record(job: Job, out, store: Store, result: ExperimentResult, planner: Planner) -> None:
    """A job's outcome into the result (reused, failed, diverged; its stored record) and back to the planner."""
    if out.reused:
        result.skipped.append(job.label)
    elif out.status in (Status.FAILED, Status.DIVERGED):
        getattr(result, out.status).append(job.label)
    rec = replace(store.get(out.run_id), name=job.run.name, seed=job.run.train.seed)  # records are frozen
    result.records.append(rec)
    planner.tell(job, rec)
