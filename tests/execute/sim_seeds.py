"""Simulated seeds x eval examples with a known truth, for the seed planner's calibration (tests) and
its cost (benchmarks/seeds_auto.py): what a run's per-example eval loss looks like, seed by seed.

Each run's value on example i under seed s is  mu + shift + u_i + v_s + w_si:  u the examples' own
difficulty (shared by every run, which is why runs are paired by example), v the seed's effect, w the
seed-by-example noise. Runs trained with the same seeds share part of v (`shared`), as real runs with
the same seed share initialisation and data order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loralab.config.schema import SequentialSpec
from loralab.execute.plan import SETTLED, futile, level_for_seeds
from loralab.metrics.stats import Side, compare_runs


@dataclass(frozen=True)
class Design:
    examples: int = 16
    seed_sd: float = 0.05  # v: seed to seed, of one run's value
    noise_sd: float = 0.10  # w: seed-by-example
    example_sd: float = 0.5  # u: example difficulty (cancels in paired differences)
    shared: float = 0.5  # correlation of two runs' seed effects under the same seed


def draw(rng: np.random.Generator, d: Design, seeds: int, shift: float, u: np.ndarray, v_common: np.ndarray) -> np.ndarray:
    """One run's seeds x examples matrix."""
    v_own = rng.normal(0, d.seed_sd, seeds)
    v = np.sqrt(d.shared) * v_common[:seeds] + np.sqrt(1 - d.shared) * v_own
    return shift + u[None, :] + v[:, None] + rng.normal(0, d.noise_sd, (seeds, d.examples))


def sequential_trial(rng: np.random.Generator, d: Design, plan: SequentialSpec, effect: float,
                     adjusted: bool = True) -> tuple[str, int]:
    """Run A against run B (B - A = `effect`), adding a seed to both while the verdict is open, as
    execute.plan.decide does: returns the final label and the seeds each run used. `adjusted=False`
    reads every look at the nominal 95% (what a naive stopping rule does)."""
    u = rng.normal(0, d.example_sd, d.examples)
    common = rng.normal(0, d.seed_sd, plan.max_seeds)
    a = draw(rng, d, plan.max_seeds, 0.0, u, common)
    b = draw(rng, d, plan.max_seeds, effect, u, common)
    label = "within noise"
    k = plan.min_seeds
    for k in range(plan.min_seeds, plan.max_seeds + 1):
        level = level_for_seeds(plan, k) if adjusted else 0.95
        seeds = list(range(k))
        v = compare_runs("m", Side(a[:k], seeds), Side(b[:k], seeds), level=level)
        label = v.label
        if label in SETTLED or (adjusted and futile(v, k, plan)):
            break
    return label, k


def fixed_trial(rng: np.random.Generator, d: Design, seeds: int, effect: float) -> str:
    """The same comparison with a fixed number of seeds, at 95%."""
    u = rng.normal(0, d.example_sd, d.examples)
    common = rng.normal(0, d.seed_sd, seeds)
    a, b = draw(rng, d, seeds, 0.0, u, common), draw(rng, d, seeds, effect, u, common)
    return compare_runs("m", Side(a, list(range(seeds))), Side(b, list(range(seeds)))).label
