"""Confidence levels of verdicts whose seeds were planned as the data came in (`repeats: auto`):
each possible look j of K spends alpha_j of the error rate (a Pocock-type spending function), so a
verdict read at its look's level keeps false calls at alpha under optional stopping (execute.plan has
the planner; docs/statistics.md the reasoning). Pure functions of plain numbers."""

from __future__ import annotations

import math

from loralab.config.schema import SequentialSpec


def look_alphas(looks: int, alpha: float) -> list[float]:
    """Each look's share of the two-sided error rate (they sum to alpha)."""
    if looks < 1:
        raise ValueError(f"looks must be at least 1, got {looks}")

    def spent(t: float) -> float:
        return alpha * math.log(1 + (math.e - 1) * t)

    return [spent(j / looks) - spent((j - 1) / looks) for j in range(1, looks + 1)]


def level_for_seeds(plan: SequentialSpec, seeds: int, confidence: float = 0.95) -> float:
    """The confidence level of a verdict on a run planned with `plan` that has `seeds` seeds: the level
    of the look it stopped at (seeds below the first look count as the first; above the last as the last)."""
    alphas = look_alphas(plan.max_seeds - plan.min_seeds + 1, 1 - confidence)
    j = min(max(seeds - plan.min_seeds, 0), len(alphas) - 1)
    return 1 - alphas[j]


def pair_level(plan: SequentialSpec | None, seeds: tuple[int | None, int | None], confidence: float = 0.95) -> float:
    """The level of one verdict (a pair of runs): the later look of its two sides (None: a side that is
    not planned, such as base). Without a plan: the file's confidence, unchanged."""
    if plan is None:
        return confidence
    counts = [s for s in seeds if s is not None]
    if not counts:
        return confidence
    return level_for_seeds(plan, max(counts), confidence)
