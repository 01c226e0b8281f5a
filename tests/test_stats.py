"""Intervals and paired comparisons checked against t-table values and cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralab import stats
from loralab.stats import (
    Estimate,
    Verdict,
    compare_paired,
    mean_ci,
    paired_bootstrap,
    welch_diff,
)

NAN = math.nan
# Student t quantiles (t-table values, to the digits scipy gives).
T_975_DF1 = 12.706204736174698
T_975_DF2 = 4.302652729749464
T_95_DF3 = 2.3533634348018233
T_975_DF4 = 2.7764451051977934
T_975_DF867_457 = 4.534085204027049  # df 867/457 = 1.897..., see test_welch_diff_by_hand


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)


# --- mean_ci ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "level", "mean", "half", "n"),
    [
        ([1.0, 2.0, 3.0], 0.95, 2.0, T_975_DF2 * 1 / math.sqrt(3), 3),  # sd 1: half = 2.4841...
        ([3.0, 1.0, NAN, 2.0], 0.95, 2.0, T_975_DF2 / math.sqrt(3), 3),  # NaN (a failed seed) dropped
        ([1.0, 2.0, 3.0, 4.0], 0.90, 2.5, T_95_DF3 * math.sqrt(5 / 3) / 2, 4),  # sd^2 = 5/3
        ([0.0, 10.0], 0.95, 5.0, T_975_DF1 * 5.0, 2),  # sd 5*sqrt(2), / sqrt(2)
        ([2.0, 2.0, 2.0], 0.95, 2.0, 0.0, 3),  # no spread: a zero-width interval
    ],
)
def test_mean_ci_is_a_student_t_interval(values, level, mean, half, n):
    assert mean_ci(values, level) == Estimate(pytest.approx(mean), pytest.approx(mean - half),
                                              pytest.approx(mean + half), n)


def test_mean_ci_for_1_2_3_by_hand():
    e = mean_ci([1.0, 2.0, 3.0])  # default level 0.95
    assert (e.mean, e.n) == (2.0, 3)
    assert e.hi - e.mean == pytest.approx(2.4841377, abs=1e-7)
    assert e.mean - e.lo == pytest.approx(2.4841377, abs=1e-7)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.7], (0.7, NAN, NAN, 1)),  # one seed: no spread to estimate
        ([NAN, 0.7], (0.7, NAN, NAN, 1)),
        ([], (NAN, NAN, NAN, 0)),
        ([NAN, NAN], (NAN, NAN, NAN, 0)),
    ],
)
def test_mean_ci_with_too_few_values(values, expected):
    e = mean_ci(values)
    assert all(_same(got, want) for got, want in zip((e.mean, e.lo, e.hi), expected[:3]))
    assert e.n == expected[3]


@pytest.mark.parametrize("level", [0.0, 1.0, 95.0])
def test_mean_ci_rejects_levels_outside_0_1(level):
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level)


def test_estimate_is_frozen():
    with pytest.raises(AttributeError):
        Estimate(1.0, 0.0, 2.0, 3).mean = 5.0


# --- paired_bootstrap -------------------------------------------------------------------------------


def test_paired_bootstrap_of_identical_runs_is_exactly_zero():
    a = list(np.random.default_rng(0).uniform(size=50))
    assert paired_bootstrap(a, list(a)) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_of_a_constant_difference_has_no_width():
    assert paired_bootstrap([0.0, 1.0, 0.5], [1.0, 2.0, 1.5]) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_of_two_pairs_by_hand():
    # Differences 0 and 1: resampled means are 0, 0.5, 1 with chance 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # points of 5000 resamples fall inside the runs of 0s and 1s.
    assert paired_bootstrap([0.0, 0.0], [0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_paired_bootstrap_drops_pairs_with_nan_on_either_side():
    assert paired_bootstrap([0.0, NAN, 0.0, 1.0], [0.0, 5.0, 1.0, NAN]) == (0.5, 0.0, 1.0)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0.2], [0.5], (0.3, NAN, NAN)),  # one pair: a difference but no spread
        ([], [], (NAN, NAN, NAN)),
        ([NAN, 1.0], [1.0, NAN], (NAN, NAN, NAN)),  # nothing left after dropping NaN pairs
    ],
)
def test_paired_bootstrap_with_too_few_pairs(a, b, expected):
    assert all(_same(got, want) for got, want in zip(paired_bootstrap(a, b), expected))


def test_paired_bootstrap_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0, 2.0], [1.0])


@pytest.mark.parametrize(("kwargs", "match"), [({"level": 1.0}, "level"), ({"n_resamples": 0}, "n_resamples")])
def test_paired_bootstrap_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap([0.0, 1.0], [1.0, 1.0], **kwargs)


def _shifted(shift: float, n: int = 200, seed: int = 1):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 0.2, n)
    return list(a), list(a + shift + rng.normal(0.0, 0.1, n))


def test_paired_bootstrap_is_seeded():
    a, b = _shifted(0.0)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3)[1] != paired_bootstrap(a, b, seed=4)[1]
    assert paired_bootstrap(a, b, seed=3)[0] == paired_bootstrap(a, b, seed=4)[0]  # the point estimate is not random


def test_paired_bootstrap_interval_matches_normal_theory_for_many_examples():
    # For 400 differences the percentile interval is close to mean +- 1.96 * sd / sqrt(n).
    rng = np.random.default_rng(2)
    d = rng.normal(0.1, 1.0, 400)
    diff, lo, hi = paired_bootstrap([0.0] * 400, list(d))
    half = 1.959964 * d.std() / math.sqrt(400)
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.1 * half)
    narrow = paired_bootstrap([0.0] * 400, list(d), level=0.5)
    assert narrow[2] - narrow[1] == pytest.approx(2 * 0.674490 * d.std() / math.sqrt(400), rel=0.1)


def test_paired_bootstrap_in_chunks_keeps_the_count_of_resamples(monkeypatch):
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 6)  # 3 resamples of 2 pairs per chunk; 5000 is not a multiple
    assert paired_bootstrap([0.0, 0.0], [0.0, 1.0]) == (0.5, 0.0, 1.0)
    rng = np.random.default_rng(2)
    d = rng.normal(0.1, 1.0, 400)
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 1000)  # 2 resamples per chunk
    diff, lo, hi = paired_bootstrap([0.0] * 400, list(d), n_resamples=2001)
    half = 1.959964 * d.std() / math.sqrt(400)
    assert lo == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_paired_bootstrap_swapping_runs_mirrors_the_interval():
    a, b = _shifted(0.05)
    diff, lo, hi = paired_bootstrap(a, b)
    assert paired_bootstrap(b, a) == (pytest.approx(-diff), pytest.approx(-hi), pytest.approx(-lo))


# --- compare_paired ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shift", "label"), [(1.0, "higher"), (-1.0, "lower"), (0.05, "higher")])
def test_compare_paired_names_a_clear_shift(shift, label):
    a, b = _shifted(shift)
    v = compare_paired("rouge_l", a, b)
    assert (v.metric, v.n, v.label) == ("rouge_l", 200, label)
    assert v.diff == pytest.approx(np.mean(np.array(b) - np.array(a)))
    assert v.diff == pytest.approx(shift, abs=0.03)  # noise sd 0.1 / sqrt(200) = 0.007
    assert (v.lo > 0) if shift > 0 else (v.hi < 0)


def test_compare_paired_pairing_sees_a_shift_that_separate_intervals_miss():
    a, b = _shifted(0.05)  # example spread 0.2 swamps the 0.05 shift unless the pairs are compared
    ea, eb = mean_ci(a), mean_ci(b)
    assert ea.hi > eb.lo  # separate intervals overlap
    assert compare_paired("chrf", a, b).label == "higher"


def test_compare_paired_pure_noise_is_within_noise():
    rng = np.random.default_rng(5)
    a = rng.uniform(size=200)
    noise = rng.normal(0.0, 0.1, 100)
    b = a + np.concatenate([noise, -noise])  # differences average exactly 0
    v = compare_paired("token_f1", list(a), list(b))
    assert v.diff == pytest.approx(0.0, abs=1e-12)
    assert v.lo < 0 < v.hi and v.label == "within noise"


@pytest.mark.parametrize(
    ("a", "b", "label"),
    [
        ([0.3, 0.3], [0.3, 0.3], "within noise"),  # (0, 0, 0): 0 is inside the closed interval
        ([0.0, 0.0], [1.0, 1.0], "higher"),  # every pair agrees: zero width, but all above 0
        ([0.0], [1.0], "within noise"),  # one pair: no interval, so no claim
        ([], [], "within noise"),
    ],
)
def test_compare_paired_edge_labels(a, b, label):
    assert compare_paired("m", a, b).label == label


def test_compare_paired_passes_keywords_and_counts_kept_pairs():
    a, b = [0.0, NAN, 0.0, 1.0], [0.0, 5.0, 1.0, NAN]
    v = compare_paired("exact_match", a, b, seed=7, n_resamples=2000, level=0.9)
    assert v == Verdict("exact_match", 0.5, 0.0, 1.0, 2, "within noise")
    assert (v.diff, v.lo, v.hi) == paired_bootstrap(a, b, seed=7, n_resamples=2000, level=0.9)


# --- welch_diff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "diff", "half", "n"),
    [
        # Variances 1 and 1 over 3 each: se^2 = 2/3; df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4.
        ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 3.0, T_975_DF4 * math.sqrt(2 / 3), 6),
        ([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], -3.0, T_975_DF4 * math.sqrt(2 / 3), 6),
        # Unequal: var 2 over 2 -> 1, var 5/3 over 4 -> 5/12; se^2 = 17/12;
        # df = (17/12)^2 / (1^2 / 1 + (5/12)^2 / 3) = 867/457. (scipy's ttest_ind(equal_var=False) agrees.)
        ([0.0, 2.0], [1.0, 2.0, 3.0, 4.0], 1.5, T_975_DF867_457 * math.sqrt(17 / 12), 6),
        ([0.0, 2.0, NAN], [1.0, NAN, 2.0, 3.0, 4.0], 1.5, T_975_DF867_457 * math.sqrt(17 / 12), 6),  # NaN dropped
        ([1.0, 1.0], [3.0, 3.0, 3.0], 2.0, 0.0, 5),  # no spread: zero width at the difference
    ],
)
def test_welch_diff_by_hand(a, b, diff, half, n):
    v = welch_diff("train_s", a, b)
    assert (v.metric, v.n) == ("train_s", n)
    assert (v.diff, v.lo, v.hi) == (pytest.approx(diff), pytest.approx(diff - half), pytest.approx(diff + half))


@pytest.mark.parametrize(
    ("a", "b", "label"),
    [
        ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], "higher"),  # 3 +- 2.27
        ([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], "lower"),
        ([0.0, 2.0], [1.0, 2.0, 3.0, 4.0], "within noise"),  # 1.5 +- 5.40
        ([1.0, 1.0], [1.0, 1.0], "within noise"),  # (0, 0, 0)
    ],
)
def test_welch_diff_labels(a, b, label):
    assert welch_diff("m", a, b).label == label


def test_welch_diff_level():
    v = welch_diff("m", [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], level=0.5)  # t(0.75, 4) = 0.740697
    assert v.hi - v.diff == pytest.approx(0.740697 * math.sqrt(2 / 3), abs=1e-6)


@pytest.mark.parametrize(
    ("a", "b", "diff", "n"),
    [([1.0], [2.0, 3.0], 1.5, 3), ([1.0, NAN], [2.0, 3.0], 1.5, 3), ([], [2.0, 3.0], NAN, 2), ([], [], NAN, 0)],
)
def test_welch_diff_with_fewer_than_two_values_a_side_has_no_interval(a, b, diff, n):
    v = welch_diff("m", a, b)
    assert _same(v.diff, diff) and math.isnan(v.lo) and math.isnan(v.hi)
    assert (v.n, v.label) == (n, "within noise")


def test_welch_diff_rejects_bad_level():
    with pytest.raises(ValueError, match="level"):
        welch_diff("m", [1.0, 2.0], [1.0, 2.0], level=1.5)


# --- _resampled_means -------------------------------------------------------------------------------


@pytest.mark.parametrize(("chunk_cells", "n_resamples"), [(2_000_000, 5000), (6, 5000), (6, 7), (1, 4), (6, 1)])
def test_resampled_means_gives_exactly_n_resamples_of_the_pairs(monkeypatch, chunk_cells, n_resamples):
    monkeypatch.setattr(stats, "_CHUNK_CELLS", chunk_cells)  # 6 cells: 3 resamples of 2 pairs per chunk
    means = stats._resampled_means(np.array([0.0, 1.0]), n_resamples, np.random.default_rng(0))
    assert means.shape == (n_resamples,)
    assert set(means.tolist()) <= {0.0, 0.5, 1.0}  # each is the mean of 2 draws from {0, 1}
    if n_resamples >= 5000:  # 0.5 has chance 1/2: 2500 +- 35 expected
        assert 2300 < np.count_nonzero(means == 0.5) < 2700
