"""Uncertainty: a run's value and the difference between two runs, each with an interval that holds
every source of noise the runs have (seeds and eval examples), so "better" is said only when the
difference is larger than the noise, and "negligible" when it is smaller than what matters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


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
    """How run b compares with run a on one metric: mean(b) - mean(a), its interval and a word for it."""

    metric: str
    diff: float
    lo: float
    hi: float
    n: int  # eval examples behind a per-example metric, else the seeds on both sides
    # "higher" / "lower" (b relative to a) when the interval excludes 0; "negligible" when it sits inside
    # the metric's min_effect floor; "within noise" when it holds 0; "untested" when there is no interval.
    label: str
    method: str = ""  # what the interval covers: "seeds+examples", "examples", "seeds" (see compare_runs)
    note: str = ""  # what it leaves out or assumes, in words ("" when nothing)
    p: float = math.nan  # two-sided p-value of "no difference", from the same t approximation as the interval


@dataclass(frozen=True)
class Side:
    """One run's measurements: a row per seed, each the per-example values (or one per-run value).

    `seeds` names the rows, so two runs trained with the same seeds are paired seed by seed. `fixed`:
    the run has no seed noise by construction (the untrained base model, evaluated once, greedily)."""

    rows: Sequence[Sequence[float]]
    seeds: Sequence[Any] = ()
    fixed: bool = False


def verdict_label(lo: float, hi: float, floor: float | None = None) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "untested"
    if floor is not None and floor > 0 and -floor < lo and hi < floor:
        return "negligible"  # whatever the sign, smaller than the smallest difference worth acting on
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "within noise"


def _resid_var(rows: np.ndarray) -> float:
    """Seed-by-example noise of one run: the variance left after seed and example means (two-way
    ANOVA residual). It sits in both the seed spread and the per-example spread; counted once."""
    k, n = rows.shape
    r = rows - rows.mean(axis=1, keepdims=True) - rows.mean(axis=0, keepdims=True) + rows.mean()
    return float((r**2).sum() / ((k - 1) * (n - 1)))


def _interval(diff: float, comps: list[tuple[float, int]], level: float) -> tuple[float, float, float]:
    """diff ± t * sqrt(sum of variance components), with Welch-Satterthwaite degrees of freedom: the
    right width for the 2-5 seeds a sweep affords, where a normal interval is too narrow. Also the
    two-sided p-value of a zero difference under the same t."""
    var = sum(c for c, _ in comps)
    if var <= 0:
        return diff, diff, (1.0 if diff == 0 else 0.0)
    df = var**2 / sum(c**2 / d for c, d in comps if c > 0)
    from scipy import stats as scipy_stats  # lazy: ~1 s to import, too slow for every CLI start

    half = float(scipy_stats.t.ppf((1 + level) / 2, df)) * math.sqrt(var)
    return diff - half, diff + half, float(2 * scipy_stats.t.sf(abs(diff) / math.sqrt(var), df))


def _matrices(a: Side, b: Side | None, weights) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Both sides as seeds x examples, keeping the examples every row measured; normalised weights."""
    A = _rows(a.rows)
    B = None if b is None else _rows(b.rows)
    if B is not None and A.size and B.size and B.shape[1] != A.shape[1]:
        raise ValueError(f"both sides need rows over the same examples; got {A.shape[1]} and {B.shape[1]}")
    if A.size == 0 or (B is not None and B.size == 0):
        return np.empty((0, 0)), (None if B is None else np.empty((0, 0))), np.empty(0)
    bad = np.isnan(A).any(axis=0) | (np.isnan(B).any(axis=0) if B is not None else False)
    w = np.ones(A.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    keep = ~bad & (w > 0)
    w = w[keep]
    return A[:, keep], (None if B is None else B[:, keep]), (w / w.sum() if w.size else w)


def _rows(rows) -> np.ndarray:
    """Seeds x examples; a per-run metric (one value per seed) loses its NaN seeds (failed runs)."""
    x = np.atleast_2d(np.asarray(rows, dtype=float)).reshape(len(rows), -1) if len(rows) else np.empty((0, 0))
    return x[~np.isnan(x[:, 0])] if x.shape[1] == 1 else x


def _seed_var(values: np.ndarray, fixed: bool) -> float | None:
    """The variance of one seed's run-level value; 0 for a fixed run; None when unmeasured (1 seed)."""
    if fixed:
        return 0.0
    return float(values.var(ddof=1)) if len(values) >= 2 else None


def compare_runs(metric: str, a: Side, b: Side, weights: Sequence[float] | None = None, *, level: float = 0.95,
                 floor: float | None = None) -> Verdict:
    """mean(b) - mean(a), where each run's value is the (weighted) mean over eval examples averaged over
    its seeds, with an interval that holds both sources of noise the runs have:

    - seeds (initialisation, data order, dropout): the spread of each seed's run-level value, paired
      seed by seed when both runs were trained with the same seeds (they share the random streams);
    - eval examples (another eval set would give other numbers): the spread of the per-example
      differences, less the seed-by-example noise already counted with the seeds.

    A variance-components (random seed, random example) interval with Satterthwaite t degrees of freedom;
    per-run metrics (one value per seed) have the seed part only, a Welch interval. One seed a side: a
    seed spread measured on the other side is assumed for it (said in `note`); one seed on both sides:
    examples only, and `note` says seed noise is unmeasured. `floor`: the smallest difference worth acting
    on; an interval inside (-floor, floor) is "negligible". `weights`: per-example weights (answer tokens,
    so eval loss is token-weighted as its stored value is)."""
    _check_level(level)
    A, B, w = _matrices(a, b, weights)
    k, m, n = A.shape[0], B.shape[0], A.shape[1]
    if n == 0 or k == 0 or m == 0:
        return Verdict(metric, math.nan, math.nan, math.nan, 0, "untested", "", "nothing measured on both sides")
    X, Y = A @ w, B @ w  # each seed's run-level value
    diff = float(Y.mean() - X.mean())
    count = n if n > 1 else k + m
    comps: list[tuple[float, int]] = []
    notes: list[str] = []
    measured = []  # sides whose seed spread was measured on their own seeds
    if not (a.fixed or b.fixed) and k == m >= 2 and list(a.seeds) == list(b.seeds) and len(a.seeds) == k:
        comps.append((float((Y - X).var(ddof=1)) / k, k - 1))  # paired: shared seeds cancel what they share
        measured = [A, B]
    else:
        va, vb = _seed_var(X, a.fixed), _seed_var(Y, b.fixed)
        if (va is None) != (vb is None) and not (a.fixed or b.fixed):
            # One seed on one side: its seed noise is assumed to be the other side's, one estimate for
            # both (so one component, with the measured side's degrees of freedom).
            v, df, rows = (vb, m - 1, B) if va is None else (va, k - 1, A)
            comps.append((v * (1 / k + 1 / m), df))
            measured.append(rows)
            one = "first" if va is None else "second"
            notes.append(f"one seed for the {one} run: its seed noise taken as the other's ({max(k, m)} seeds)")
        elif va is None or vb is None:
            if n == 1:
                return Verdict(metric, diff, math.nan, math.nan, count, "untested", "",
                               "no CI: one seed a run gives a per-run number no interval, and `repeats: 3` measures seed "
                               "noise")
            notes.append("seed noise unmeasured (one seed): the interval covers eval examples only, "
                         "and `repeats: 3` measures it")
        else:
            for v, rows, fixed in ((va, A, a.fixed), (vb, B, b.fixed)):
                if not fixed:
                    comps.append((v / len(rows), len(rows) - 1))
                    measured.append(rows)
    if n >= 2:
        d = B.mean(axis=0) - A.mean(axis=0)
        v_ex = n / (n - 1) * float(np.sum(w**2 * (d - w @ d) ** 2))
        sw2 = float(np.sum(w**2))
        v_ex -= sum(_resid_var(r) / r.shape[0] * sw2 for r in measured)
        comps.append((max(v_ex, 0.0), n - 1))
    lo, hi, p = _interval(diff, comps, level)
    method = "seeds" if n == 1 else "examples" if len(comps) == 1 else "seeds+examples"
    return Verdict(metric, diff, lo, hi, count, verdict_label(lo, hi, floor), method, "; ".join(notes), p)


def adjust_for_multiplicity(verdicts: Sequence[Verdict | None], level: float = 0.95) -> list[Verdict | None]:
    """One table asks many questions at once: at 5% each, some of thirty metrics would read "higher" or
    "lower" for two runs that differ only in their seeds. Benjamini-Hochberg over the verdicts given (one
    family: a verdict column, or one knob's effects) keeps the share of false calls at 1 - level, and
    under no real difference at all, the chance of any call. A difference its own interval excludes but
    the family does not keep reads "within noise", and its note says why."""
    tested = [(i, v) for i, v in enumerate(verdicts) if v is not None and v.label in ("higher", "lower", "within noise")
              and not math.isnan(v.p)]
    m = len(tested)
    if m <= 1:
        return list(verdicts)
    alpha = 1 - level
    ranked = sorted(tested, key=lambda iv: iv[1].p)
    keep = 0  # the largest rank k with p_(k) <= k * alpha / m
    for k, (_, v) in enumerate(ranked, start=1):
        if v.p <= k * alpha / m:
            keep = k
    kept = {i for i, _ in ranked[:keep]}
    out = list(verdicts)
    for i, v in tested:
        if v.label in ("higher", "lower") and i not in kept:
            out[i] = replace(v, label="within noise", note="; ".join(x for x in (v.note, MULTIPLE) if x))
    return out


# The note of a verdict adjust_for_multiplicity turned to "within noise" (one sentence for the legend).
MULTIPLE = ("*: its own interval excludes 0, but not once the other questions of its column are counted "
            "(Benjamini-Hochberg): within noise")


def estimate(metric_rows: Side, weights: Sequence[float] | None = None, level: float = 0.95) -> Estimate:
    """One run's value (the weighted mean over examples, averaged over seeds) with an interval from the
    same two sources as compare_runs: seeds, and eval examples. One seed of a per-run number: no interval."""
    _check_level(level)
    A, _, w = _matrices(metric_rows, None, weights)
    k, n = A.shape
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    X = A @ w
    mean = float(X.mean())
    comps = []
    if k >= 2 and not metric_rows.fixed:
        comps.append((float(X.var(ddof=1)) / k, k - 1))
    elif n == 1:
        return Estimate(mean, math.nan, math.nan, k)
    if n >= 2:
        c = A.mean(axis=0)
        v_ex = n / (n - 1) * float(np.sum(w**2 * (c - w @ c) ** 2))
        if k >= 2:
            v_ex -= _resid_var(A) / k * float(np.sum(w**2))
        comps.append((max(v_ex, 0.0), n - 1))
    lo, hi, _ = _interval(mean, comps, level)
    return Estimate(mean, lo, hi, k)
