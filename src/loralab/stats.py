"""Uncertainty: a mean across seeds with its interval, and paired comparisons of two runs on the same
eval examples, so "better" is only said when the difference is larger than the noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_CHUNK_CELLS = 2_000_000  # resampled indices held at once in paired_bootstrap (~16 MB of int64)


@dataclass(frozen=True)
class Estimate:
    """A mean with a confidence interval; lo/hi NaN when there is no spread to estimate."""

    mean: float
    lo: float
    hi: float
    n: int


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean with a Student t interval: the right width for the few (2-5) seeds a sweep can afford,
    where a normal interval would be too narrow.

    NaN values (failed runs) are dropped and n counts the rest. One value: no spread, so lo = hi = NaN.
    None: all NaN, n = 0.
    """
    _check_level(level)
    x = np.array([v for v in values if not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    if n == 1:
        return Estimate(m, math.nan, math.nan, 1)
    # Imported here, not at the top: scipy.stats takes ~1 s to import, too slow for every CLI start.
    from scipy import stats as scipy_stats

    half = float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(m, m - half, m + half, n)


@dataclass(frozen=True)
class Verdict:
    """How run b compares with run a on one metric: mean(b - a), its interval and a word for it."""

    metric: str
    diff: float
    lo: float
    hi: float
    n: int
    label: str  # "higher" / "lower" (b relative to a) when the interval excludes 0, else "within noise"


def _paired_diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired values need the same examples on both sides; got {len(a)} and {len(b)}")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    return y[keep] - x[keep]


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = 5000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """mean(b - a) over examples with a percentile bootstrap interval.

    Paired because both runs answer the same examples: example difficulty cancels out, so far smaller
    differences are detectable than with two separate intervals. Pairs with a NaN on either side are
    dropped. Returns (diff, lo, hi): lo = hi = diff when every difference is the same (e.g. identical
    runs: (0, 0, 0)); NaN bounds for a single pair; all NaN for none. Seeded, so reports reproduce.
    """
    _check_level(level)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    d = _paired_diffs(a, b)
    n = len(d)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    diff = float(d.mean())
    if n == 1:
        return (diff, math.nan, math.nan)
    if np.all(d == d[0]):
        return (float(d[0]),) * 3  # no spread; also skips float noise in resampled means
    means = _resampled_means(d, n_resamples, np.random.default_rng(seed))
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return (diff, float(lo), float(hi))


def _resampled_means(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_resamples` resamples of d with replacement; vectorised, in chunks of rows so a large
    eval set never needs all n_resamples x len(d) indices in memory at once."""
    n = len(d)
    rows = max(1, _CHUNK_CELLS // n)
    return np.concatenate([
        d[rng.integers(0, n, size=(min(rows, n_resamples - start), n))].mean(axis=1)
        for start in range(0, n_resamples, rows)
    ])


def compare_paired(metric: str, a: Sequence[float], b: Sequence[float], **kw) -> Verdict:
    """`paired_bootstrap` turned into a word; keywords go to it.

    An interval that cannot be computed (NaN bounds, fewer than 2 pairs) reads "within noise": no
    evidence of a difference.
    """
    diff, lo, hi = paired_bootstrap(a, b, **kw)
    return Verdict(metric, diff, lo, hi, len(_paired_diffs(a, b)), _label(lo, hi))


def _label(lo: float, hi: float) -> str:
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "within noise"  # lo <= 0 <= hi, or NaN bounds


def welch_diff(metric: str, a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Verdict:
    """mean(b) - mean(a) with a Welch t interval, for per-run numbers (one value per seed) that have no
    examples to pair: unequal variances allowed, since a knob can make one run much noisier.

    NaN values are dropped; n counts the values used on both sides. Fewer than 2 on a side: NaN bounds
    ("within noise"). No spread on either side: a zero-width interval at the difference.
    """
    _check_level(level)
    x = np.array([v for v in a if not math.isnan(v)], dtype=float)
    y = np.array([v for v in b if not math.isnan(v)], dtype=float)
    n = len(x) + len(y)
    diff = float(y.mean() - x.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2:
        return Verdict(metric, diff, math.nan, math.nan, n, _label(math.nan, math.nan))
    va, vb = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)  # squared standard errors
    if va + vb == 0:
        return Verdict(metric, diff, diff, diff, n, _label(diff, diff))
    from scipy import stats as scipy_stats  # lazy, as in mean_ci

    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))  # Welch-Satterthwaite
    half = float(scipy_stats.t.ppf((1 + level) / 2, df)) * math.sqrt(va + vb)
    return Verdict(metric, diff, diff - half, diff + half, n, _label(diff - half, diff + half))
