"""The seed planner of `repeats: auto`: seeds spent only where a verdict is still unsettled.

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

from dataclasses import dataclass, field

from loralab.config.schema import SequentialSpec
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
