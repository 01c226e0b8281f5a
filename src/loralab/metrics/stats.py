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
    # the metric's min_effect floor; "within noise" when it holds 0; "untested" when there is no interval
    # (lo, hi NaN), including one seed a side with a difference beyond the eval-example noise.
    label: str
    method: str = ""  # what the interval covers: "seeds+examples", "examples", "seeds" (see compare_runs)
    note: str = ""  # what it leaves out or assumes, in words ("" when nothing)
    p: float = math.nan  # two-sided p-value of "no difference" that agrees with the interval (NaN: untested)


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


# --- the arithmetic, vectorised over repetitions (axis 0) so a calibration runs thousands at once -----


def _t_ppf(level: float, df):
    from scipy import stats as scipy_stats  # lazy: ~1 s to import, too slow for every CLI start

    return scipy_stats.t.ppf((1 + level) / 2, df)


def _groups(clusters, n: int):
    """Cluster ids per example as (order, starts) for summing over clusters; None when every example is
    its own cluster (or fewer than 2 clusters: nothing to estimate their spread from)."""
    if clusters is None:
        return None
    ids = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)[1].reshape(-1)
    if len(ids) != n:
        raise ValueError(f"clusters needs one id per example; got {len(ids)} for {n} examples")
    if ids.max(initial=0) < 1 or ids.max() + 1 == n:
        return None
    order = np.argsort(ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(ids[order]) != 0])
    return order, starts


def _sum_groups(x: np.ndarray, g) -> np.ndarray:
    """x summed over the examples of each cluster (last axis)."""
    return x if g is None else np.add.reduceat(x[..., g[0]], g[1], axis=-1)


def _df_examples(w: np.ndarray, g=None) -> float:
    """Degrees of freedom of a weighted mean over examples: Kish's effective sample size 1 / sum(w^2)
    less one (n - 1 with equal weights; about 1 when one example holds most of the weight), counted in
    clusters when examples come in clusters (their weights summed)."""
    return max(1.0 / float(np.sum(_sum_groups(w, g) ** 2)) - 1.0, 1.0)


def _jack(c: np.ndarray, w: np.ndarray, g=None) -> np.ndarray:
    """Variance of sum(w * c) over eval examples (rows of c are repetitions): the jackknife, which
    divides each example's share by its leverage 1 - w(i). Equal weights: s^2 / n exactly; one example
    holding most of the weight: about the spread between it and the others (the plain sandwich
    sum(w^2 (c - mean)^2) would be near 0 there, as if that one example were the whole population).
    With clusters, whole clusters are left out (cluster-robust: related items count once)."""
    r = c - (c @ w)[..., None]
    t, W = _sum_groups(w * r, g), _sum_groups(w, g)
    G = W.shape[-1]
    if G < 2:
        return np.zeros(c.shape[:-1])
    return (G - 1) / G * np.sum((t / (1 - W)) ** 2, axis=-1)


def _parts(M: np.ndarray, w: np.ndarray, g=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One seeds x examples layout (R repetitions, k seeds, n examples) as variance components of its
    mean: each seed's value X, the seed part S = var(X) / k, the example part E = jackknife variance of
    the per-example means, and O, the seed-by-example noise that both S and E hold (to count it once):
    the jackknife of each seed's residual row, pooled. E(S + E - O) is the variance of the mean."""
    R, k, n = M.shape
    X = M @ w
    c = M.mean(axis=1)
    S = X.var(axis=1, ddof=1) / k if k >= 2 else np.zeros(R)
    E = _jack(c, w, g)
    if k >= 2 and n >= 2:
        res = M - c[:, None, :] - (X - X.mean(axis=1, keepdims=True))[:, :, None]
        W = _sum_groups(w, g)
        G = len(W)
        O = (G - 1) / G * np.sum((_sum_groups(w * res, g) / (1 - W)) ** 2, axis=(1, 2)) / (k * (k - 1))
    else:
        O = np.zeros(R)
    return X, S, E, O


# For the degrees of freedom only, each seed part is read at the size it exceeds 85 times in 100 (its 15%
# chi-square quantile): 2-3 seeds estimate a variance on 1-2 df, and when that estimate is small by chance
# the plain Satterthwaite df jump up exactly when the interval is too narrow. Two shared seeds, seed noise
# dominant: 0.5 (median) 8.5% false calls at 5%, 0.25 5.7%, 0.15 5.1%; 2 seeds against 8 (Welch): 9.4%
# plain, 4.8% read so. The price, power with 2 seeds when examples dominate: 0.69 at 0.25, 0.56 at 0.15
# (3 seeds: 0.73 both).
_DF_Q = 0.15


def _combine(seeds: list[tuple[np.ndarray, float]], E: np.ndarray, O, dfx: float):
    """The variance of a mean: the seed parts (each with its df), plus the example part E less the
    seed-by-example noise O it shares with them, floored at 0 (an example effect is never below none).

    Degrees of freedom: Satterthwaite's over the seed parts and, when it is above 0, the example excess,
    whose E and O count each with their own df (a difference of mean squares is noisier than either).
    For the df only, each seed part is read at its _DF_Q quantile size, so that one that is small by
    chance cannot lend the others' (or the examples') many df to an interval that is then too narrow.
    Parts of equal df are read alike: two runs of 3 seeds keep Welch's df."""
    from scipy import stats as scipy_stats

    zero = np.zeros_like(E)
    x = np.maximum(E - O, 0.0)
    up = [(c * d / scipy_stats.chi2.ppf(_DF_Q, d), d) for c, d in seeds]
    Su = sum((c for c, _ in up), start=zero)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = sum((c**2 / d for c, d in up), start=zero) + np.where(
            x > 0, E**2 / dfx + O**2 / (dfx * max(sum(d for _, d in seeds), 1)), 0.0)  # O: (k - 1)(n - 1)
        df = np.where(den > 0, (Su + x) ** 2 / np.where(den > 0, den, 1.0),
                      max((d for _, d in seeds), default=dfx))
    # Seeds whose values tie by chance (whole-number data: 3 seeds at 2.0 from rows [1, 3], [3, 1], [2, 2])
    # with no example excess must not read as no noise at all: then the seed-by-example noise the mean holds.
    # (Flooring there always would be valid too, but with the seeds' few df it costs much power.)
    V = sum((c for c, _ in seeds), start=zero) + x
    return np.where(V > 0, V, O), np.maximum(df, 1.0)


def _resolution(cells: np.ndarray) -> np.ndarray:
    """The data's granularity per repetition: 1 for whole numbers (tokens, counts), else the smallest
    gap between two distinct values (0 when all are equal)."""
    flat = cells.reshape(cells.shape[0], -1)
    whole = np.all(flat == np.round(flat), axis=1)
    s = np.sort(flat, axis=1)
    gaps = np.diff(s, axis=1)
    gaps = np.where(gaps > 0, gaps, np.inf)
    q = gaps.min(axis=1) if gaps.shape[1] else np.full(flat.shape[0], np.inf)
    return np.where(whole, 1.0, np.where(np.isinf(q), 0.0, q))


def _deviating(cells: np.ndarray, cw: np.ndarray) -> np.ndarray:
    """Weighted share of cells that differ from the most common value, per repetition."""
    R, N = cells.shape
    order = np.argsort(cells, axis=1, kind="stable")
    s = np.take_along_axis(cells, order, axis=1)
    ws = cw[order]
    new = np.ones((R, N), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(new, axis=1) - 1 + (np.arange(R) * N)[:, None]  # a run of equal values, unique id
    tot = np.bincount(run.ravel(), weights=ws.ravel(), minlength=R * N).reshape(R, N)
    dev = 1.0 - tot.max(axis=1) / cw.sum()
    return np.where(dev < 1e-9, 0.0, np.minimum(dev, 1.0))  # sums of weights: all alike is exactly 0


def _floor(cells: np.ndarray, cw: np.ndarray, n_eff: float, scale: np.ndarray, per_cell: float = 1.0) -> np.ndarray:
    """The least variance a mean of these cells can honestly have: what two more cells of each kind add
    (Agresti-Coull), as if any next cell could differ from the most common value by the data's scale (its
    resolution, or a share's range). All cells equal is then evidence, not certainty: n examples all 0
    give about 2 / n^2 (times scale^2), not 0; data that vary already show more than the pseudo-cells add.
    Counted in examples when all cells agree (answers no seed changes may be fixed per example), else in
    cells (`per_cell`: seeds per example)."""
    dev = _deviating(cells, cw)
    N = np.where(dev > 0, n_eff * per_cell, n_eff)
    p = (dev * N + 2) / (N + 4)
    return scale**2 * np.maximum(p * (1 - p) - dev * (1 - dev), 0.0) / N


@dataclass(frozen=True)
class _Cell:
    mean: np.ndarray
    var: np.ndarray
    df: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _wilson(mean, var, df, n_eff: float, bounds: tuple[float, float], level: float):
    """Score (Wilson) limits for a share in `bounds`, with the design's effective sample size
    p(1 - p) / var (at 0% and 100%, Agresti-Coull p over the floored variance: they keep a width) and a
    t quantile for the df."""
    b0, b1 = bounds
    span = b1 - b0
    p = np.clip((mean - b0) / span, 0.0, 1.0)
    pt = np.where((p > 0) & (p < 1), p, (p * n_eff + 2) / (n_eff + 4))  # at 0 or 1: its floor's own p
    with np.errstate(divide="ignore", invalid="ignore"):
        ns = np.where(var > 0, pt * (1 - pt) / (var / span**2), np.inf)
    z = _t_ppf(level, df)
    centre = (p + z**2 / (2 * ns)) / (1 + z**2 / ns)
    half = z / (1 + z**2 / ns) * np.sqrt(p * (1 - p) / ns + z**2 / (4 * ns**2))
    return b0 + span * np.clip(centre - half, 0, 1), b0 + span * np.clip(centre + half, 0, 1)


def _cell(M: np.ndarray, w: np.ndarray, fixed: bool, seed_var, bounds, level: float, g=None) -> tuple[_Cell, bool]:
    """One run's value per repetition with its variance and interval (see estimate). Also whether its
    seed noise is unmeasured (one seed, nothing borrowed)."""
    R, k, n = M.shape
    X, S, E, O = _parts(M, w, g)
    mean = X.mean(axis=1)
    dfx = _df_examples(w, g)
    unmeasured = False
    if fixed or k >= 2:
        V, df = _combine([] if fixed else [(S, k - 1)], E, 0.0 if fixed else O, dfx)
    else:
        if seed_var is not None:
            sv = np.broadcast_to(np.asarray(seed_var[0], dtype=float), (R,))
            V, df = _combine([(sv / k, seed_var[1])], E, 0.0, dfx)
        else:
            V, df = E, np.full(R, dfx)
            unmeasured = True
    if n == 1 and fixed:  # one value with no noise: a point (estimate shows no interval for it)
        return _Cell(mean, np.zeros(R), np.ones(R), mean, mean), False
    if n == 1 and k < 2 and seed_var is None:
        nan = np.full(R, np.nan)
        return _Cell(mean, nan, nan, nan, nan), True
    cells = M.reshape(R, -1) if not fixed else M.mean(axis=1)
    cw = np.tile(w, M.shape[1] if not fixed else 1) / (M.shape[1] if not fixed else 1)
    # Examples are the sampling unit: with deterministic items, k seeds of n examples are n observations.
    N = 1.0 / float(np.sum(w**2)) if n >= 2 else k
    scale = np.full(R, bounds[1] - bounds[0]) if bounds is not None and n >= 2 else _resolution(cells)
    F = _floor(cells, cw, N, scale, 1.0 if fixed or n < 2 else k)
    # Where the floor binds on data that vary, the df stay the design's (it says nothing about how sure the
    # seeds are); where every cell agrees, there is nothing else: the examples' (the floor counts them).
    alike = _deviating(cells, cw) == 0
    V, df = np.maximum(V, F), np.where(alike & (F > V), dfx if n >= 2 else max(k - 1, 1), df)
    if bounds is not None:
        lo, hi = _wilson(mean, V, df, N, bounds, level)
        lo, hi = np.minimum(lo, mean), np.maximum(hi, mean)  # round-off at 0% and 100%
    else:
        half = _t_ppf(level, df) * np.sqrt(V)
        lo, hi = mean - half, mean + half
    return _Cell(mean, V, df, lo, hi), unmeasured


def estimate_arrays(M, weights=None, *, fixed: bool = False, seed_var: tuple[float, float] | None = None,
                    bounds: tuple[float, float] | None = None, clusters=None,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """estimate for R repetitions at once: M (R, k, n) seeds x examples per repetition (no NaN, weights > 0).
    Returns the means, the lower and the upper ends."""
    M = np.asarray(M, dtype=float)
    n = M.shape[2]
    w = np.ones(n) / n if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    c, _ = _cell(M, w, fixed, seed_var, bounds, level, _groups(clusters, n))
    return c.mean, c.lo, c.hi


@dataclass(frozen=True)
class Differences:
    """compare_arrays' answer, one entry per repetition; `method`, `unmeasured` and `borrowed` are the
    same for all (they follow from the design, not the data)."""

    diff: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p: np.ndarray
    method: str  # "seeds+examples" | "examples" | "seeds"
    unmeasured: bool  # one seed on both sides and none borrowed: the interval covers examples only
    borrowed: str  # "" | "other" (one side's seed noise taken as the other's) | "given" (seed_var)


def compare_arrays(A, B, weights=None, *, paired: bool = False, fixed_a: bool = False, fixed_b: bool = False,
                   seed_var: tuple[float, float] | None = None, bounds: tuple[float, float] | None = None,
                   clusters=None, level: float = 0.95) -> Differences:
    """compare_runs for R repetitions at once: A (R, k, n) and B (R, m, n) are each repetition's seeds x
    examples (no NaN, weights > 0). `paired`: the rows are the same seeds (k == m). What compare_runs
    does once, a calibration does thousands of times: one code path for both."""
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    R, k, n = A.shape
    m = B.shape[1]
    w = np.ones(n) / n if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    if fixed_a:
        A = A.mean(axis=1, keepdims=True)
        k = 1
    if fixed_b:
        B = B.mean(axis=1, keepdims=True)
        m = 1
    g = _groups(clusters, n)
    dfx = _df_examples(w, g)
    nan = np.full(R, np.nan)
    borrowed, unmeasured = "", False
    side_var = seed_var  # the seed variance a one-seed side's own cell takes (None: unmeasured)
    if fixed_a or fixed_b or (paired and k == m >= 2):
        # Paired (seed by seed, or against a fixed run): one layout of differences, its own residual.
        M = B - A
        diff = (M @ w).mean(axis=1)
        _, S, E, O = _parts(M, w, g)
        s = max(M.shape[1], 1)
        if fixed_a and fixed_b:
            seeds, O = [], 0.0
        elif s >= 2:
            seeds = [(S, s - 1)]
        elif seed_var is not None:
            seeds, O, borrowed = [(np.full(R, seed_var[0]), seed_var[1])], 0.0, "given"
        else:
            seeds, O, unmeasured = [], 0.0, True
        cells, cw, N = M.reshape(R, -1), np.tile(w, s) / s, 1 / float(np.sum(w**2)) if n >= 2 else s
        seeds_in = s >= 2 or borrowed == "given"
    else:
        X, Sa, Ea, Oa = _parts(A, w, g)
        Y, Sb, Eb, Ob = _parts(B, w, g)
        diff = Y.mean(axis=1) - X.mean(axis=1)
        E = _jack(B.mean(axis=1) - A.mean(axis=1), w, g)
        if k >= 2 and m >= 2:
            seeds, O = [(Sa, k - 1), (Sb, m - 1)], Oa + Ob
        elif seed_var is not None:
            # A seed variance measured elsewhere (the workspace's repeated runs): the unmeasured sides', one
            # estimate for both (one term, its own df). Their seed-by-example noise is then counted twice
            # (in it and in E): on the safe side.
            seeds = [(S, d) for S, d, s in ((Sa, k - 1, k), (Sb, m - 1, m)) if s >= 2]
            seeds.append((np.full(R, seed_var[0]) * sum(1 / s for s in (k, m) if s < 2), seed_var[1]))
            O, borrowed = Oa + Ob, "given"
        elif max(k, m) >= 2:
            # One seed on one side: its seed noise (and seed-by-example noise) taken as the other side's.
            kk, S1, O1 = (k, Sa, Oa) if k >= 2 else (m, Sb, Ob)
            one = m if k >= 2 else k
            seeds, O, borrowed = [(S1 * kk * (1 / k + 1 / m), kk - 1)], O1 * (1 + kk / one), "other"
            side_var = (S1 * kk, kk - 1)
        else:
            seeds, O, unmeasured = [], 0.0, True
        if n >= 2:
            cells, cw, N = B.mean(axis=1) - A.mean(axis=1), w, 1 / float(np.sum(w**2))
        else:  # per-run values: each side's spread around its own median
            cells = np.concatenate([A[:, :, 0] - np.median(A[:, :, 0], axis=1, keepdims=True),
                                    B[:, :, 0] - np.median(B[:, :, 0], axis=1, keepdims=True)], axis=1)
            cw, N = np.ones(k + m), k + m
        seeds_in = not unmeasured
    if n == 1 and not seeds_in and not (fixed_a and fixed_b):
        return Differences(diff, nan, nan, nan, "seeds", True, borrowed)
    V, df = _floored(_combine(seeds, E, O, dfx), cells, cw, N, w, A, B, bounds, dfx if n >= 2 else max(k + m - 2, 1))
    scalebig = np.maximum(np.abs(A).max(axis=(1, 2)), np.abs(B).max(axis=(1, 2)))
    diff = np.where(np.abs(diff) <= 8 * np.finfo(float).eps * scalebig, 0.0, diff)  # round-off is no difference
    t = _t_ppf(level, df)
    half = t * np.sqrt(V)
    lo, hi = diff - half, diff + half
    if bounds is not None:
        diff, lo, hi = _share_ends(A, B, w, (fixed_a, fixed_b), (side_var if k < 2 else None, side_var if m < 2 else None),
                                   bounds, level, g, V, diff, lo, hi)
    p = _p_of(diff, lo, hi, df, t)
    method = "seeds" if n == 1 else "examples" if unmeasured else "seeds+examples"
    return Differences(diff, lo, hi, p, method, unmeasured, borrowed)


def _floored(combined, cells, cw, N, w, A, B, bounds, design_df):
    """The combined variance, never below what the data's resolution allows (a variance estimated as 0 is
    not certainty); where the floor binds on cells that all agree, the design's degrees of freedom."""
    V, df = combined
    R, n = A.shape[0], A.shape[2]
    scale = (np.full(R, bounds[1] - bounds[0]) if bounds is not None and n >= 2 else
             _resolution(np.concatenate([A.reshape(R, -1), B.reshape(R, -1)], axis=1)))
    F = _floor(cells, cw, N, scale, cells.shape[1] * float(np.sum(w**2)) if n >= 2 else 1.0)
    alike = _deviating(cells, cw) == 0  # as in _cell
    return np.maximum(V, F), np.where(alike & (F > V), design_df, df)


def _share_ends(A, B, w, fixed: tuple[bool, bool], side_vars: tuple, bounds: tuple[float, float], level: float, g,
                V, diff, lo, hi):
    """Shares: each side's score interval, joined by MOVER (Newcombe's method, with the correlation the
    pairing leaves), is asymmetric near 0% and 100% as a share's uncertainty is; its correlation comes from
    three variance estimates and can overstate the pairing (one seed against five: 15% false calls alone),
    so each end is the farther of it and the t interval's, within +-(range)."""
    ca, _ = _cell(A, w, fixed[0], side_vars[0], bounds, level, g)
    cb, _ = _cell(B, w, fixed[1], side_vars[1], bounds, level, g)
    va, vb = _lend(ca.var, cb.var)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.clip(np.nan_to_num((va + vb - V) / (2 * np.sqrt(va * vb))), -1.0, 1.0)
    lb, ua, ub, la = cb.mean - cb.lo, ca.hi - ca.mean, cb.hi - cb.mean, ca.mean - ca.lo
    lo = np.minimum(lo, diff - np.sqrt(np.maximum(lb**2 + ua**2 - 2 * rho * lb * ua, 0)))
    hi = np.maximum(hi, diff + np.sqrt(np.maximum(ub**2 + la**2 - 2 * rho * ub * la, 0)))
    span = bounds[1] - bounds[0]
    diff = np.clip(diff, -span, span)  # a weighted mean's round-off at 0% or 100%
    return diff, np.minimum(np.clip(lo, -span, span), diff), np.maximum(np.clip(hi, -span, span), diff)


def _lend(va: np.ndarray, vb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A side whose cell variance is unmeasured (NaN) takes the other's."""
    return np.where(np.isnan(va), vb, va), np.where(np.isnan(vb), va, vb)


def _p_of(diff, lo, hi, df, t) -> np.ndarray:
    """The two-sided p-value that agrees with the interval: the half facing 0, read as t standard
    errors (so p < 1 - level exactly when the interval excludes 0; a zero difference has p = 1)."""
    from scipy import stats as scipy_stats

    half = np.where(diff > 0, diff - lo, hi - diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(half > 0, np.abs(diff) / (half / t), np.where(diff == 0, 0.0, np.inf))
    return np.where(np.isnan(half), np.nan, np.where(diff == 0, 1.0, 2 * scipy_stats.t.sf(z, df)))


def _matrices(a: Side, b: Side | None, weights, clusters=None):
    """Both sides as seeds x examples, keeping the examples every row measured; normalised weights (and
    the kept examples' cluster ids, when given)."""
    A = _rows(a.rows)
    B = None if b is None else _rows(b.rows)
    if B is not None and A.size and B.size and B.shape[1] != A.shape[1]:
        raise ValueError(f"both sides need rows over the same examples; got {A.shape[1]} and {B.shape[1]}")
    if A.size == 0 or (B is not None and B.size == 0):
        return np.empty((0, 0)), (None if B is None else np.empty((0, 0))), np.empty(0), None
    bad = np.isnan(A).any(axis=0) | (np.isnan(B).any(axis=0) if B is not None else False)
    w = np.ones(A.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    keep = ~bad & (w > 0)
    w = w[keep]
    if clusters is not None:
        if len(clusters) != len(keep):
            raise ValueError(f"clusters needs one id per example; got {len(clusters)} for {len(keep)} examples")
        clusters = [c for c, kept in zip(clusters, keep) if kept]
    return A[:, keep], (None if B is None else B[:, keep]), (w / w.sum() if w.size else w), clusters


def _rows(rows) -> np.ndarray:
    """Seeds x examples; a per-run metric (one value per seed) loses its NaN seeds (failed runs)."""
    x = np.atleast_2d(np.asarray(rows, dtype=float)).reshape(len(rows), -1) if len(rows) else np.empty((0, 0))
    return x[~np.isnan(x[:, 0])] if x.shape[1] == 1 else x


def compare_runs(metric: str, a: Side, b: Side, weights: Sequence[float] | None = None, *, level: float = 0.95,
                 floor: float | None = None, bounds: tuple[float, float] | None = None,
                 seed_var: tuple[float, float] | None = None, clusters: Sequence[Any] | None = None) -> Verdict:
    """mean(b) - mean(a), where each run's value is the (weighted) mean over eval examples averaged over
    its seeds, with an interval that holds both sources of noise the runs have:

    - seeds (initialisation, data order, dropout): the spread of each seed's run-level value; when both
      runs were trained with the same seeds (they share the random streams), of the per-seed differences;
    - eval examples (another eval set would give other numbers): the spread of the per-example
      differences, less the seed-by-example noise already counted with the seeds.

    Variance components with Satterthwaite degrees of freedom (docs/statistics.md); per-run metrics
    (one value per seed) have the seed part only, a Welch interval. No variance is taken as 0 when the
    data cannot show it (a floor from the data's granularity), and a difference of exactly 0 is 0.

    One seed a side: a seed spread measured on the other side is assumed for it (said in `note`).
    `seed_var` = (variance of one seed's run-level value, its df), measured on other runs of the same
    model and data: used for the sides with one seed instead. One seed on both sides and nothing
    borrowed: seed noise is unmeasured, so the interval covers examples only, and a difference beyond
    it is `untested`, never `higher`/`lower`: one seed is no verdict. `floor`: the smallest difference
    worth acting on; an interval inside (-floor, floor) is "negligible". `bounds`: the range of a share
    (0, 1): score intervals that stay inside it. `weights`: per-example weights (answer tokens, so eval
    loss is token-weighted as its stored value is). `clusters`: a group id per example (near-duplicate
    or related eval items): the example part is then cluster-robust, df = clusters - 1."""
    _check_level(level)
    A, B, w, clusters = _matrices(a, b, weights, clusters)
    k, m, n = A.shape[0], B.shape[0], A.shape[1]
    if n == 0 or k == 0 or m == 0:
        return Verdict(metric, math.nan, math.nan, math.nan, 0, "untested", "", "nothing measured on both sides")
    paired = not (a.fixed or b.fixed) and k == m >= 2 and list(a.seeds) == list(b.seeds) and len(a.seeds) == k
    r = compare_arrays(A[None], B[None], w, paired=paired, fixed_a=a.fixed, fixed_b=b.fixed, seed_var=seed_var,
                       bounds=bounds, clusters=clusters, level=level)
    diff, lo, hi, p = (float(x[0]) for x in (r.diff, r.lo, r.hi, r.p))
    count = n if n > 1 else k + m
    notes: list[str] = []
    if r.borrowed == "other":
        one = "first" if k < m else "second"
        notes.append(f"one seed for the {one} run: its seed noise taken as the other's ({max(k, m)} seeds)")
    elif r.borrowed == "given":
        notes.append(BORROWED)
    label = verdict_label(lo, hi, floor)
    if r.unmeasured:
        if math.isnan(lo):
            return Verdict(metric, diff, math.nan, math.nan, count, "untested", "",
                           "no CI: one seed a run gives a per-run number no interval, and `repeats: 3` measures seed "
                           "noise")
        notes.append("seed noise unmeasured (one seed): the interval covers eval examples only, "
                     "and `repeats: 3` measures it")
        if label != "within noise":  # a wider interval (seeds too) still holds 0; nothing else survives
            label, lo, hi, p = "untested", math.nan, math.nan, math.nan
            notes.append(ONE_SEED)
    return Verdict(metric, diff, lo, hi, count, label, r.method, "; ".join(notes), p)


# The notes of verdicts whose seed noise is borrowed, or unmeasured (one sentence each for the legend).
BORROWED = "one seed: its seed noise taken as that of other runs of the same model and data with several seeds"
ONE_SEED = ("untested: the difference is larger than the eval-example noise, but with one seed a run nothing "
            "says it is larger than seed noise (identical settings differ that much about half the time)")


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


def estimate(metric_rows: Side, weights: Sequence[float] | None = None, level: float = 0.95, *,
             bounds: tuple[float, float] | None = None, seed_var: tuple[float, float] | None = None,
             clusters: Sequence[Any] | None = None) -> Estimate:
    """One run's value (the weighted mean over examples, averaged over seeds) with an interval from the
    same sources as compare_runs: seeds, and eval examples. One seed of a per-run number: no interval
    (unless `seed_var` lends one); one seed of a per-example metric: examples only. `bounds`: a share's
    range, for a score interval inside it. `clusters`: as for compare_runs."""
    _check_level(level)
    A, _, w, clusters = _matrices(metric_rows, None, weights, clusters)
    k, n = A.shape
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    c, _ = _cell(A[None], w, metric_rows.fixed, seed_var, bounds, level, _groups(clusters, n))
    if n == 1 and metric_rows.fixed:
        return Estimate(float(c.mean[0]), math.nan, math.nan, k)
    return Estimate(float(c.mean[0]), float(c.lo[0]), float(c.hi[0]), k)
