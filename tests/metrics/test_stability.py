"""Training-curve numbers checked on crafted curves whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralab.metrics.stability import (
    DivergenceMonitor,
    diagnose,
    loss_spikes,
    smooth,
    stability_summary,
    steps_to_fraction_of_drop,
)

NAN, INF = math.nan, math.inf

# --- smooth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "alpha", "expected"),
    [
        # Debiased: step 2 = (0.25 * 1 + 0.5 * 0) / 0.75 = 1/3 (starting from the first value would give 0.5).
        ([1.0, 0.0], 0.5, [1.0, 1 / 3]),
        # Weights 0.125, 0.25, 0.5 at step 3: (0.25 + 1 + 3) / 0.875 = 34/7.
        ([2.0, 4.0, 6.0], 0.5, [2.0, 10 / 3, 34 / 7]),
        ([3.0, 3.0, 3.0], 0.2, [3.0, 3.0, 3.0]),  # a constant stays put (no pull towards 0)
        ([5.0, 1.0, 2.0], 1.0, [5.0, 1.0, 2.0]),  # alpha 1: no smoothing
        # Default 0.2 on 1, 0, 0: step 2 = 0.16 / 0.36, step 3 = 0.128 / 0.488.
        ([1.0, 0.0, 0.0], 0.2, [1.0, 0.16 / 0.36, 0.128 / 0.488]),
        ([], 0.2, []),
    ],
)
def test_smooth_by_hand(values, alpha, expected):
    assert smooth(values, alpha) == pytest.approx(expected)


def test_smooth_default_alpha_is_0_2():
    assert smooth([1.0, 0.0]) == pytest.approx([1.0, 0.16 / 0.36])


def test_smooth_keeps_a_constant_curve_exactly():
    # Exactly, not approximately: round-off here would read as a tiny drop in steps_to_fraction_of_drop.
    assert smooth([0.1] * 20, 0.3) == [0.1] * 20


def test_smooth_propagates_nan_from_where_it_appears():
    out = smooth([1.0, 2.0, NAN, 1.0], 0.5)
    assert out[:2] == pytest.approx([1.0, 5 / 3])
    assert math.isnan(out[2]) and math.isnan(out[3])


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_smooth_rejects_alpha_outside_0_1(alpha):
    with pytest.raises(ValueError, match="alpha"):
        smooth([1.0], alpha)


# --- loss_spikes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses", "kwargs", "expected"),
    [
        # Step 6: previous 2.0..1.6 have median 1.8, MAD 0.1 -> z = 0.6745 * 3.2 / 0.1 = 21.6.
        # Step 7 (1.5) is below its median: drops never count.
        ([2.0, 1.9, 1.8, 1.7, 1.6, 5.0, 1.5, 1.4, 1.3], {}, [6]),
        # Previous 1, 2, 3: median 2, MAD 1 -> z = 0.6745 * (x - 2) > 3.5 needs x > 7.189.
        ([1.0, 2.0, 3.0, 7.1], {}, []),
        ([1.0, 2.0, 3.0, 7.3], {}, [4]),
        ([1.0, 2.0, 3.0, 7.1], {"threshold": 3.0}, [4]),  # z = 0.6745 * 5.1 = 3.44
        ([1.0, 2.0, 50.0], {}, []),  # only 2 previous values: not judged
        # Flat then a jump: MAD 0, floored at 0.1% of the median (0.001) -> z = 0.6745 * 0.5 / 0.001 = 337.
        ([1.0, 1.0, 1.0, 1.0, 1.5], {}, [5]),
        # ... while a wobble of 0.05% after the flat stretch is z = 0.337: not a spike.
        ([1.0, 1.0, 1.0, 1.0, 1.0005], {}, []),
        # window 3 looks at 1, 2, 3 only (z = 3.57 for 7.3); window 10 also sees the 10s:
        # median 6.5, MAD 3.5 -> z = 0.15.
        ([10.0, 10.0, 10.0, 1.0, 2.0, 3.0, 7.3], {"window": 3}, [7]),
        ([10.0, 10.0, 10.0, 1.0, 2.0, 3.0, 7.3], {"window": 10}, []),
        # Non-finite: counts once it can be judged; left out of later histories.
        ([1.0, 2.0, 3.0, NAN], {}, [4]),
        ([1.0, 2.0, 3.0, INF], {}, [4]),
        ([NAN, 1.0, 2.0, 3.0, 7.3], {}, [5]),  # the first NaN has no history; 7.3 vs finite 1, 2, 3
        ([1.0, 2.0, NAN, 3.0, 7.3], {}, [5]),  # step 4 has only 2 finite predecessors
        ([], {}, []),
    ],
)
def test_loss_spikes_on_crafted_curves(losses, kwargs, expected):
    assert loss_spikes(losses, **kwargs) == expected


def test_loss_spikes_finds_only_the_spike_in_a_noisy_decreasing_curve():
    rng = np.random.default_rng(1)
    losses = list(2.0 * np.exp(-np.arange(100) / 30) + 0.5 + rng.uniform(-0.02, 0.02, 100))
    losses[59] += 1.0  # step 60
    assert loss_spikes(losses) == [60]


def test_loss_spikes_rejects_a_window_too_small_to_judge():
    with pytest.raises(ValueError, match="window"):
        loss_spikes([1.0] * 5, window=2)


# --- steps_to_fraction_of_drop ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses", "kwargs", "expected"),
    [
        # Unsmoothed 4 3 2 1 1 1: drop 3, target 4 - 2.7 = 1.3, first reached at step 4.
        ([4.0, 3.0, 2.0, 1.0, 1.0, 1.0], {"alpha": 1.0}, 4),
        ([4.0, 3.0, 2.0, 1.0, 1.0, 1.0], {"alpha": 1.0, "fraction": 0.5}, 3),  # target 2.5
        ([4.0, 3.0, 2.0, 1.0, 1.0, 1.0], {"alpha": 1.0, "fraction": 1.0}, 4),  # the minimum itself
        # alpha 0.5 on 1, 0, 0, 0, 0, 0: s_t = 1 / (2^t - 1) = 1, 1/3, 1/7, 1/15, 1/31, 1/63;
        # drop 62/63, target 1 - 0.9 * 62/63 = 0.114; 1/7 is above it, 1/15 below: step 4 (unsmoothed: 2).
        ([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], {"alpha": 0.5}, 4),
        # Default alpha 0.2 on 1 then nine 0s: s_t = 0.2 * 0.8^(t-1) / (1 - 0.8^t) = 1, 0.444, 0.262, 0.173,
        # 0.122, ..., 0.0301 (step 10); target 1 - 0.9 * 0.9699 = 0.1271: step 5.
        ([1.0] + [0.0] * 9, {}, 5),
        # Cut at the first NaN: 2, 1 smooth to 2, 1.444 (0.52 / 0.36); drop 0.556, target 1.5: step 2.
        ([2.0, 1.0, NAN, 0.0], {}, 2),
        ([3.0, 3.0, 3.0], {}, None),  # flat: no drop
        ([0.1] * 10, {"alpha": 0.3}, None),  # flat at a value with round-off in its arithmetic
        ([1.0, 2.0, 3.0], {}, None),  # rising: the start is the lowest
        ([1.0], {}, None),
        ([], {}, None),
        ([NAN, 1.0, 0.5], {}, None),  # nothing before the first NaN
    ],
)
def test_steps_to_fraction_of_drop_on_crafted_curves(losses, kwargs, expected):
    assert steps_to_fraction_of_drop(losses, **kwargs) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_steps_to_fraction_of_drop_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction"):
        steps_to_fraction_of_drop([2.0, 1.0], fraction)


# --- stability_summary ------------------------------------------------------------------------------

_SUMMARY_KEYS = {"loss_spikes", "spike_steps", "grad_norm_median", "grad_norm_max", "steps_to_90pct_drop",
                 "loss_first", "loss_final", "loss_best", "final_minus_best"}


def test_stability_summary_by_hand_reports_logged_step_numbers():
    curve = {
        "step": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100],  # logged every 10 steps
        "loss": [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5],
        "grad_norm": [0.5, 1, 1, 2, 3, 1, 1, 1, 1, 40],
        "lr": [1e-4] * 10,  # ignored
    }
    assert stability_summary(curve) == {
        "loss_spikes": 1,
        "spike_steps": [100],  # 0.5 after a flat 0 (MAD floored): position 10 -> step 100
        "grad_norm_median": 1.0,  # sorted 0.5 1 1 1 1 1 1 2 3 40
        "grad_norm_max": 40.0,
        # smoothed (see test above) 1, 0.444, 0.262, 0.173, 0.122, ..., 0.0388 at position 9, then up to 0.142;
        # drop 0.961, target 0.135: position 5 -> step 50
        "steps_to_90pct_drop": 50,
        "loss_first": 1.0,
        "loss_final": 0.5,
        "loss_best": 0.0,
        "final_minus_best": 0.5,
    }


def test_stability_summary_of_a_run_that_broke():
    summary = stability_summary({"loss": [2.0, 1.0, NAN], "grad_norm": [1.0, 3.0, NAN]})  # no "step": positions
    assert set(summary) == _SUMMARY_KEYS
    assert summary["loss_spikes"] == 0 and summary["spike_steps"] == []  # the NaN has only 2 steps of history
    assert summary["grad_norm_median"] == 2.0  # finite norms only
    assert math.isnan(summary["grad_norm_max"])  # the worst case says it broke
    assert summary["steps_to_90pct_drop"] == 2
    assert summary["loss_first"] == 2.0 and summary["loss_best"] == 1.0
    assert math.isnan(summary["loss_final"]) and math.isnan(summary["final_minus_best"])


def test_stability_summary_counts_spikes():
    loss = [2.0, 1.9, 1.8, 1.7, 1.6, 5.0, 1.5, 1.4, 1.3, 1.2, 1.1, 6.0, 1.0]
    summary = stability_summary({"step": list(range(1, 14)), "loss": loss, "grad_norm": [1.0] * 13})
    assert summary["loss_spikes"] == 2 and summary["spike_steps"] == [6, 12]
    assert summary["final_minus_best"] == 0.0


def test_stability_summary_of_an_empty_curve():
    summary = stability_summary({"step": [], "loss": [], "grad_norm": []})
    assert set(summary) == _SUMMARY_KEYS
    assert summary["loss_spikes"] == 0 and summary["spike_steps"] == [] and summary["steps_to_90pct_drop"] is None
    for key in ("grad_norm_median", "grad_norm_max", "loss_first", "loss_final", "loss_best", "final_minus_best"):
        assert math.isnan(summary[key])


# --- DivergenceMonitor ------------------------------------------------------------------------------


def _feed(monitor, losses):
    """Reasons returned for steps 1, 2, ..."""
    return [monitor.update(step, loss) for step, loss in enumerate(losses, start=1)]


@pytest.mark.parametrize(("bad", "word"), [(NAN, "nan"), (INF, "inf"), (-INF, "-inf")])
def test_divergence_monitor_stops_at_once_on_a_non_finite_loss(bad, word):
    monitor = DivergenceMonitor()
    reasons = _feed(monitor, [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, bad])
    assert reasons == [None] * 6 + [f"loss became {word} at step 7"]
    assert monitor.last_good_loss == 1.5 and monitor.last_good_step == 6


def test_divergence_monitor_stops_an_exploding_run_at_the_right_step():
    monitor = DivergenceMonitor()  # window 5, factor 2, grace 3
    # Step 5: mean(2, 1.9, 1.8, 3, 6) = 2.94 <= 4; step 6: mean(1.9, 1.8, 3, 6, 12) = 4.94 > 2 * 2.0.
    reasons = _feed(monitor, [2.0, 1.9, 1.8, 3.0, 6.0, 12.0])
    expected = "loss stayed above 2.0x its start (2.00) on average for 5 steps, up to step 6"
    assert reasons == [None] * 5 + [expected]
    assert monitor.last_good_loss == 12.0 and monitor.last_good_step == 6
    assert monitor.update(7, 1.0) == expected  # latched: once diverged, stays diverged


def test_divergence_monitor_never_stops_a_noisy_decreasing_run():
    rng = np.random.default_rng(0)
    t = np.arange(300)
    losses = list(0.5 + 2.0 * np.exp(-t / 30) + rng.uniform(-0.2, 0.2, 300))
    losses[50] = 10.0  # one spike that recovers: mean of its window ~ (10 + 4 * 0.9) / 5 < 2 * 2.5
    monitor = DivergenceMonitor()
    assert _feed(monitor, losses) == [None] * 300
    assert monitor.last_good_step == 300 and monitor.last_good_loss == losses[-1]


@pytest.mark.parametrize(
    ("grace", "expected"),
    [
        # window 2: step 2 mean(1, 3) = 2 is not above 2; step 3 mean(3, 3) = 3 is, unless still in grace.
        (0, [None, None, "loss stayed above 2.0x its start (1.00) on average for 2 steps, up to step 3"]),
        (3, [None, None, None, None]),  # step 4: mean(3, 0.5) = 1.75
    ],
)
def test_divergence_monitor_grace_forgives_an_early_bump(grace, expected):
    monitor = DivergenceMonitor(window=2, factor=2.0, grace=grace)
    assert _feed(monitor, [1.0, 3.0, 3.0, 0.5])[: len(expected)] == expected


def test_divergence_monitor_uses_its_factor_and_window():
    monitor = DivergenceMonitor(window=3, factor=1.5, grace=0)
    # Step 3: mean(1, 1.6, 1.6) = 1.4 <= 1.5; step 4: mean(1.6, 1.6, 1.6) = 1.6 > 1.5.
    assert _feed(monitor, [1.0, 1.6, 1.6, 1.6]) == [None, None, None,
                                                    "loss stayed above 1.5x its start (1.00) on average "
                                                    "for 3 steps, up to step 4"]


def test_divergence_monitor_ratio_rule_is_off_for_a_non_positive_start():
    assert _feed(DivergenceMonitor(), [0.0, 5.0, 5.0, 5.0, 5.0, 5.0]) == [None] * 6


def test_divergence_monitor_before_any_step():
    monitor = DivergenceMonitor()
    assert monitor.last_good_loss is None and monitor.last_good_step is None
    assert monitor.update(1, NAN) == "loss became nan at step 1"
    assert monitor.last_good_loss is None


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"factor": 1.0}, {"factor": 0.5}])
def test_divergence_monitor_rejects_settings_that_cannot_work(kwargs):
    with pytest.raises(ValueError):
        DivergenceMonitor(**kwargs)


# --- diagnose ---------------------------------------------------------------------------------------

_LR_SUSPECT = "learning_rate {} is not above the usual LoRA range, but is still the usual suspect: try 10x lower"


@pytest.mark.parametrize(
    ("lr", "r", "alpha", "expected"),
    [
        (1.0, 8, 16, ["learning_rate 1.0 is far above the usual LoRA range (1e-5 to 1e-3): try 10x lower"]),
        (0.002, 8, 16, ["learning_rate 0.002 is above the usual LoRA range (1e-5 to 1e-3): try 10x lower"]),
        (0.0002, 1, 16, ["alpha/r = 16 scales the update 8x more than the common alpha = 2r: lower alpha",
                         _LR_SUSPECT.format(0.0002)]),
        (0.01, 4, 64, ["learning_rate 0.01 is far above the usual LoRA range (1e-5 to 1e-3): try 10x lower",
                       "alpha/r = 16 scales the update 8x more than the common alpha = 2r: lower alpha"]),
        (0.0002, 8, 16, [_LR_SUSPECT.format(0.0002)]),  # neither: still the usual suspect
        (0.001, 4, 16, [_LR_SUSPECT.format(0.001)]),
        (1e-06, 8, 16, [_LR_SUSPECT.format("1e-06")]),  # below the range: still named, last  # both exactly at their limits: not blamed
        (0.0002, 2, 9, ["alpha/r = 4.5 scales the update 2.25x more than the common alpha = 2r: lower alpha",
                        _LR_SUSPECT.format(0.0002)]),
    ],
)
def test_diagnose_rules(lr, r, alpha, expected):
    assert diagnose(lr, r, alpha) == expected


def test_diagnose_rejects_a_non_positive_rank():
    with pytest.raises(ValueError, match="r must be positive"):
        diagnose(1e-4, 0, 16)
