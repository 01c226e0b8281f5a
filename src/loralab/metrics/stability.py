"""Numbers from a training curve (one value per optimizer step) behind words such as "stable",
"slower to adapt" or "risk of instability", plus an early stop for runs that have diverged."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

# Modified z-score of Iglewicz & Hoaglin: 0.6745 * (x - median) / MAD, with 3.5 as the usual outlier cut.
_MAD_TO_Z = 0.6745
# MAD floor as a share of the rolling median: a perfectly flat stretch has MAD 0, and a jump after it must
# still count, while wobbles under 0.1% of the loss never do.
_MAD_FLOOR = 1e-3
_TINY = 1e-12  # floor of the floor, for a median near 0
_MIN_HISTORY = 3  # a median and MAD of fewer values say nothing about "usual"


def smooth(values: Sequence[float], alpha: float = 0.2) -> list[float]:
    """Debiased exponential moving average (as TensorBoard and Adam do), to see the trend under the noise.

    Each output is a weighted mean of the values so far, weights shrinking by (1 - alpha) per step back.
    Debiasing, rather than starting from the first value, keeps the first (often highest) loss from
    weighing on the early smoothed curve more than any other value. NaN propagates from where it appears.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    out: list[float] = []
    s, weight = 0.0, 0.0
    for x in values:
        weight = (1.0 - alpha) * weight + alpha  # = 1 - (1 - alpha)^t, the total weight given so far
        # Same as (zero-started EMA) / weight, written as a step towards x: exact for a constant curve,
        # so float round-off never shows up as a tiny "drop".
        s += (alpha / weight) * (float(x) - s)
        out.append(s)
    return out


def loss_spikes(losses: Sequence[float], window: int = 10, threshold: float = 3.5) -> list[int]:
    """1-based steps whose loss jumps far above the recent usual level: the "instability" events.

    Robust z-score against the median and MAD of the previous `window` steps, so one spike does not hide
    the next. Only upward jumps count (a sudden drop is not instability). The MAD is floored at 0.1% of
    the median, so a jump after a flat stretch counts. Non-finite previous losses are left out of the
    history; a step needs 3 finite ones before it can be judged, and a NaN/inf loss then always counts.
    """
    if window < _MIN_HISTORY:
        raise ValueError(f"window must be at least {_MIN_HISTORY}, got {window}")
    spikes = []
    for i, x in enumerate(losses):
        prev = np.array([v for v in losses[max(0, i - window) : i] if math.isfinite(v)], dtype=float)
        if len(prev) < _MIN_HISTORY:
            continue
        if not math.isfinite(x):
            spikes.append(i + 1)
            continue
        med = float(np.median(prev))
        mad = max(float(np.median(np.abs(prev - med))), _MAD_FLOOR * abs(med), _TINY)
        if _MAD_TO_Z * (x - med) / mad > threshold:
            spikes.append(i + 1)
    return spikes


def steps_to_fraction_of_drop(losses: Sequence[float], fraction: float = 0.9, *, alpha: float = 0.2) -> int | None:
    """Speed of adaptation: the first 1-based step where the smoothed loss has made `fraction` of its
    total drop (first smoothed value minus lowest).

    Smoothed (see `smooth`) so one lucky batch does not count as arrival. The curve is cut at its first
    non-finite loss: a diverged tail says nothing about adaptation. None when the loss never drops.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    finite = []
    for x in losses:
        if not math.isfinite(x):
            break
        finite.append(x)
    if not finite:
        return None
    s = smooth(finite, alpha)
    drop = s[0] - min(s)
    if drop <= 0:
        return None
    target = s[0] - fraction * drop
    # Smoothing is a weighted mean, so min(s) is reached and the loop always returns for fraction <= 1.
    return next(i + 1 for i, v in enumerate(s) if v <= target)


def stability_summary(curve: dict[str, list[float]]) -> dict[str, float | int | list[int] | None]:
    """The numbers a report needs from one run's training curve.

    Step positions are reported as the curve's own "step" values (the logged step numbers), falling back
    to 1-based positions without a "step" list. grad_norm_median skips non-finite norms (typical size);
    grad_norm_max keeps them (worst case: inf or NaN means the run broke). loss_best is the lowest finite
    loss; final_minus_best > 0 says the run ended worse than its best (drifting up or unstable at the end).
    """
    losses = [float(x) for x in curve.get("loss", [])]
    grads = np.array(curve.get("grad_norm", []), dtype=float)
    steps = list(curve.get("step", range(1, len(losses) + 1)))

    def at(position: int) -> int:
        return int(steps[position - 1])

    spikes = [at(p) for p in loss_spikes(losses)]
    to_drop = steps_to_fraction_of_drop(losses, 0.9)
    finite_losses = [x for x in losses if math.isfinite(x)]
    finite_grads = grads[np.isfinite(grads)]
    first = losses[0] if losses else math.nan
    final = losses[-1] if losses else math.nan
    best = min(finite_losses) if finite_losses else math.nan
    return {
        "loss_spikes": len(spikes),
        "spike_steps": spikes,
        "grad_norm_median": float(np.median(finite_grads)) if finite_grads.size else math.nan,
        "grad_norm_max": float(np.max(grads)) if grads.size else math.nan,
        "steps_to_90pct_drop": at(to_drop) if to_drop is not None else None,
        "loss_first": first,
        "loss_final": final,
        "loss_best": best,
        "final_minus_best": final - best,
    }


class DivergenceMonitor:
    """Called after every optimizer step; says when a run has diverged so training can stop early.

    Two signs: a NaN/inf loss (stops at once), or the mean of the last `window` losses above `factor`
    times the first loss, checked only after `grace` steps so an early bump during warmup is forgiven.
    A mean over a window, not one loss, so a single spike that recovers does not stop the run. Assumes a
    positive loss (cross-entropy); with a first loss <= 0 only the NaN/inf rule applies. Once it has
    said "diverged" it keeps returning the same reason.
    """

    def __init__(self, window: int = 5, factor: float = 2.0, grace: int = 3):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if factor <= 1.0:
            raise ValueError(f"factor must be above 1, got {factor}")
        self.window, self.factor, self.grace = window, float(factor), grace
        self.first_loss: float | None = None
        self.last_good_loss: float | None = None
        self.last_good_step: int | None = None
        self.reason: str | None = None
        self._recent: deque[float] = deque(maxlen=window)
        self._updates = 0

    def after_step(self, step) -> str | None:
        """The step hook (train.StepHook): the reason the run diverged, or None."""
        return self.update(step.step, step.loss)

    def update(self, step: int, loss: float) -> str | None:
        """Feed one optimizer step's loss; the reason the run diverged, or None to go on."""
        if self.reason is not None:
            return self.reason
        self._updates += 1
        if not math.isfinite(loss):
            self.reason = f"loss became {float(loss)} at step {step}"
            return self.reason
        self.last_good_loss, self.last_good_step = float(loss), step
        if self.first_loss is None:
            self.first_loss = float(loss)
        self._recent.append(float(loss))
        if (
            self._updates > self.grace
            and len(self._recent) == self.window
            and self.first_loss > 0
            and math.fsum(self._recent) / self.window > self.factor * self.first_loss
        ):
            self.reason = (
                f"loss stayed above {self.factor}x its start ({self.first_loss:.2f}) on average "
                f"for {self.window} steps, up to step {step}"
            )
        return self.reason


_LR_TOP = 1e-3  # top of the usual LoRA learning-rate range (1e-5 to 1e-3)
_SCALE_TOP = 4.0  # alpha/r above this: twice the common alpha = 2r or more


def diagnose(learning_rate: float, r: int, alpha: float) -> list[str]:
    """The knobs most likely to blame for a divergence, most likely first, as sentences naming values.

    The learning rate is always named: above the usual range it comes first; within it, it comes last,
    as the usual suspect. LoRA's update is scaled by alpha/r, so a large ratio acts like a larger rate.
    """
    if r <= 0:
        raise ValueError(f"r must be positive, got {r}")
    lr = float(learning_rate)
    scale = alpha / r
    found = []
    if lr > _LR_TOP:
        how = "far above" if lr >= 10 * _LR_TOP else "above"
        found.append(f"learning_rate {lr} is {how} the usual LoRA range (1e-5 to 1e-3): try 10x lower")
    if scale > _SCALE_TOP:
        found.append(
            f"alpha/r = {scale:g} scales the update {scale / 2:g}x more than the common alpha = 2r: lower alpha"
        )
    if lr <= _LR_TOP:
        # "not above", not "within": a rate below 1e-5 is just as well a candidate to name last.
        found.append(f"learning_rate {lr} is not above the usual LoRA range, but is still the usual suspect: "
                     "try 10x lower")
    return found
