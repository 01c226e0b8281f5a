"""The planner: the jobs an experiment runs (`Planner`: each run x its seeds, or `repeats: auto`'s rounds)
and a sweep trial's (`trial_jobs`), for the experiment loop (execute.loop) or the sweep to hand to an executor.

`repeats: auto` (`decide`): seeds spent only where a verdict is still unsettled.

Every run starts with `min_seeds`. After each round, each trained run's verdicts against base and
against the reference run (the first trained run: the table's verdict columns) are read on the plan's
metrics; a run with a verdict that is neither a call (its interval excludes 0) nor negligible (inside
`min_effect`) nor futile (its difference far inside the interval it could reach at `max_seeds`) gets one
more seed, and so does the reference run when a verdict against it is open, until `max_seeds`.

Looking at the data after every seed and stopping when it looks settled would, with a fixed 95%
interval, call differences that are not there far more often than 5% of the time. So each possible
look j of K = max_seeds - min_seeds + 1 gets its own share alpha_j of the error rate, from a
Pocock-type spending function (Lan & DeMets, 1983): alpha(t) = alpha * ln(1 + (e - 1) t) at t = j / K,
alpha_j = alpha(t_j) - alpha(t_{j-1}). Whatever the stopping rule, a false call needs some look's
interval to exclude 0 at its own level, so the chance of one is at most sum(alpha_j) = alpha (the union
bound; exact, not asymptotic, and valid under optional stopping). A verdict read after the plan uses
the level of the last look it took part in: `level_for_seeds`. Pocock's shape spends more early than
O'Brien-Fleming's, which is what makes stopping at 2 or 3 seeds possible.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from loralab.config.schema import Experiment, RunSpec, SequentialSpec
from loralab.execute.jobs import Job, Pruning
from loralab.metrics.sequential import level_for_seeds, look_alphas, pair_level  # noqa: F401 (the planner's levels)
from loralab.workspace.status import Status


SETTLED = ("higher", "lower", "negligible")

# Futility: a verdict is given up on when its difference is small against its own noise: a two-sided
# p-value of "no difference" above FUTILE_P (the difference under about 0.7 of its standard error) says
# that more seeds would most likely end within noise too. Stopping for futility only ever removes calls,
# so it costs no false-call rate; what it costs in power is measured (BENCHMARKS.md, "repeats: auto").
FUTILE_P = 0.5


def futile(v, seeds: int, plan: SequentialSpec) -> bool:
    """Whether more seeds are unlikely to settle verdict `v` (read at `seeds` seeds)."""
    import math

    return seeds < plan.max_seeds and not math.isnan(v.p) and v.p > FUTILE_P


@dataclass
class Decision:
    """One round's reading: which runs get another seed, and why, in words for the log."""

    more: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def decide(groups: dict, plan: SequentialSpec, *, confidence: float = 0.95, floors: dict | None = None) -> Decision:
    """Read each trained run's verdicts (against base and against the reference run) on the plan's
    metrics at the current look's level; runs with an open verdict and fewer than max_seeds get a seed.

    `groups`: run name -> its seeds' records (base under "base", then the runs in file order). A run with
    a failed or diverged seed gets no more: more seeds cannot settle a run that does not train."""
    from loralab.analysis.comparison import verdict_of

    out = Decision()
    base = groups.get("base")
    trained = [(n, g) for n, g in groups.items() if n != "base"]
    if not trained:
        return out
    ref_name, ref = trained[0]
    broken = {n for n, g in trained if any(r.status != Status.FINISHED for r in g)}
    want: set[str] = set()
    for name, group in trained:
        pairs = ([("base", base)] if base else []) + ([(ref_name, ref)] if name != ref_name else [])
        for other_name, other in pairs:
            sides = (None if other_name == "base" else len(other), len(group))
            level = pair_level(plan, sides, confidence)
            open_on = []
            for key in plan.metrics:
                v = verdict_of(key, other, group, level, floors)
                identical = v is not None and v.diff == 0 and v.lo == v.hi  # the same numbers seed for seed
                if v is not None and v.label not in SETTLED and v.label != "untested" and not identical \
                        and not futile(v, max(s for s in sides if s is not None), plan):
                    open_on.append(key)
            if not open_on:
                continue
            takers = [n for n in (name, other_name) if n != "base" and n not in broken
                      and len(groups[n]) < plan.max_seeds]
            if takers:
                want.update(takers)
                out.lines.append(f"{name} vs {other_name}: unsettled on {', '.join(open_on)} at {len(group)} seeds "
                                 f"(level {level:.3f}): one more seed for {', '.join(takers)}")
            else:
                why = "a seed did not finish" if {name, other_name} & broken else f"{plan.max_seeds} seeds reached"
                out.lines.append(f"{name} vs {other_name}: still unsettled on {', '.join(open_on)}; no more seeds ({why})")
    out.more = [n for n, _ in trained if n in want]
    return out


def seed_label(name: str, seed: int, several: bool) -> str:
    """A job's name in progress lines: the run's name, with its seed when the run has several."""
    return f"{name} (seed {seed})" if several else name


class Planner:
    """The jobs of one experiment, in the order they run, produced as their outcomes come in.

    Fixed seeds: each run in file order, each of its seeds in order, all known from the start. `repeats:
    auto`: that first round (min_seeds each), then, once every job of a round is told, the round `decide`
    asks for, until it asks for none. A stored run equal to a job is not left out here: the executor
    reuses it (train_run), so it keeps its place in the progress count and its line in the log.

    The loop: `ask(n)` for up to n jobs that may start now (n: the executor's free slots; [] while a
    round's outcomes are still out), run them, `tell(job, record)` each one's stored record, in any order;
    `done` once nothing is left to ask or waiting to be told. `planned`: the jobs known so far (it grows
    by a round at a time under `repeats: auto`)."""

    def __init__(self, exp: Experiment, runs: list[RunSpec], base=None, *, force: bool = False,
                 log: Callable[[str], None] = lambda line: None):
        self.exp, self.runs, self.force, self.log = exp, list(runs), force, log
        self.several = exp.adaptive is not None or exp.repeats > 1 or (exp.seeds is not None and len(exp.seeds) > 1)
        self.queue: deque[Job] = deque(self._job(run, seed) for run in self.runs for seed in exp.seeds_for(run))
        self.planned = len(self.queue)
        self.out: list[tuple[int, Job]] = []  # asked, not yet told, with its place in the order asked
        self.told: list[tuple[int, str, Any]] = []  # (that place, the run's name, its stored record)
        self.asked = 0
        self.base = base
        self.settled = exp.adaptive is None  # fixed seeds: nothing to decide

    def _job(self, run: RunSpec, seed: int) -> Job:
        return Job(self.exp, run.with_seed(seed), seed_label(run.name, seed, self.several), force=self.force)

    @property
    def done(self) -> bool:
        return not self.queue and not self.out and self.settled

    def ask(self, n: int) -> list[Job]:
        """Up to `n` jobs to start now, in order. Under `repeats: auto`, asked with the round's outcomes
        all told and its jobs all handed out, it decides (and logs) the next round first."""
        if not self.queue and not self.out and not self.settled:
            self._next_round()
        jobs = [self.queue.popleft() for _ in range(min(max(n, 0), len(self.queue)))]
        self.out.extend(enumerate(jobs, self.asked))
        self.asked += len(jobs)
        return jobs

    def tell(self, job: Job, record) -> None:
        """A job asked for has ended: its stored record, which the next round's verdicts read."""
        i = next(i for i, (_, j) in enumerate(self.out) if j is job)
        self.told.append((self.out.pop(i)[0], job.run.name, record))

    def groups(self) -> dict[str, list]:
        """Records by run name, in the order `decide` reads them: base first, then the runs in file order,
        each run's seeds in the order they were asked for."""
        out: dict[str, list] = {"base": [self.base]} if self.base is not None else {}
        for _, name, rec in sorted(self.told, key=lambda t: t[0]):
            out.setdefault(name, []).append(rec)
        return out

    def _next_round(self) -> None:
        """`repeats: auto`: one more seed for each run `decide` finds unsettled; none: the plan is done."""
        plan, ev = self.exp.adaptive, self.exp.evaluation
        groups = self.groups()
        d = decide(groups, plan, confidence=ev.confidence, floors=ev.min_effect)
        for line in d.lines:
            self.log(f"repeats auto: {line}")
        if not d.more:
            seeds = ", ".join(f"{n} {len(g)}" for n, g in groups.items() if n != "base")
            self.log(f"repeats auto: settled or at the limit; seeds per run: {seeds}")
            self.settled = True
            return
        by_name = {r.name: r for r in self.runs}
        for name in d.more:
            run = by_name[name]
            self.queue.append(self._job(run, self.exp.seeds_for(run, len(groups[name]) + 1)[-1]))
        self.planned += len(d.more)


def trial_jobs(exp: Experiment, run: RunSpec, name: str, *, full_eval: bool = True, probe: bool = True,
               pruning: Pruning | None = None, pause_at: int | None = None) -> list[Job]:
    """A sweep trial's jobs: its run once per seed, in order. Only the first seed reports to the pruner
    (`pruning`) and pauses at a rung (`pause_at`); the sweep runs them in turn and stops at the first
    that does not finish (sweep.study.run_trial)."""
    seeds = exp.seeds_for(run)
    return [Job(exp, run.with_seed(seed), seed_label(name, seed, len(seeds) > 1), full_eval, probe,
                pruning=pruning if i == 0 else None, pause_at=pause_at if i == 0 else None)
            for i, seed in enumerate(seeds)]
