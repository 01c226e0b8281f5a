"""Simulated seeds x eval examples with known truth, many repetitions at once, for calibration tests."""

from __future__ import annotations

import math

import numpy as np


def draw(rng: np.random.Generator, shape, dist: str) -> np.ndarray:
    """Unit-variance, mean-0 noise of a given shape: normal, t3 (heavy tails), or a centred lognormal
    (skewed: "lognormal" has log-sd 1, skewness 6.2; "lognormal0.5" log-sd 0.5, skewness 1.8)."""
    if dist == "normal":
        return rng.normal(size=shape)
    if dist == "t3":
        return rng.standard_t(3, size=shape) / math.sqrt(3.0)
    if dist.startswith("lognormal"):
        s = float(dist[len("lognormal"):] or 1.0)
        sd = math.sqrt((math.exp(s * s) - 1) * math.exp(s * s))
        return (rng.lognormal(0.0, s, size=shape) - math.exp(s * s / 2)) / sd
    raise ValueError(dist)


def runs(rng: np.random.Generator, reps: int, k: int, m: int, n: int, *, seed_sd: float = 0.02,
         noise_sd: float = 0.1, example_sd: float = 0.5, interaction_sd: float = 0.0, paired: bool = False,
         rho: float = 0.8, dist: str = "normal", clusters: int = 0, cluster_sd: float = 0.0,
         cluster_interaction_sd: float = 0.0, effect: float = 0.0, base: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Two runs per repetition, A (reps, k, n) and B (reps, m, n), with equal true means (+ effect for B):
    value = example difficulty (shared) [+ its cluster's] + each run's own example effect of mean 0
    (interaction_sd; by cluster: cluster_interaction_sd) + the seed's shift + seed-by-example noise.
    `paired`: B's seeds are A's (k == m), so B's seed shifts and seed-by-example noise correlate with A's
    (rho). `base`: A is the untrained base, evaluated once (one row, no seed shift). Also each example's
    cluster (None without clusters)."""
    ex = example_sd * draw(rng, (reps, 1, n), dist)
    group = None
    if clusters:
        group = np.arange(n) % clusters
        ex = ex + cluster_sd * draw(rng, (reps, 1, clusters), dist)[:, :, group]

    def one(s: int, shared: tuple[np.ndarray, np.ndarray] | None = None):
        u = seed_sd * draw(rng, (reps, s, 1), dist)
        r = noise_sd * draw(rng, (reps, s, n), dist)
        if shared is not None:
            u = rho * shared[0] + math.sqrt(1 - rho**2) * u
            r = rho * shared[1] + math.sqrt(1 - rho**2) * r
        g = interaction_sd * draw(rng, (reps, 1, n), dist)
        if clusters:
            g = g + cluster_interaction_sd * draw(rng, (reps, 1, clusters), dist)[:, :, group]
        return ex + g + u + r, (u, r)

    A, parts = one(k)
    if base:
        A = A - parts[0]
    B, _ = one(m, parts if paired else None)
    return A, B + effect, group
