"""What we learned: sentences written from measured effects by explicit rules, never by judgement.

The rules, each unit-tested:
1. An effect is stated only when its confidence interval excludes zero, with the numbers it rests on
   (the change, its interval, how the interval was computed, how many seeds, which runs).
2. An interval that contains zero reads "no measurable effect of X on Y within N seeds", with the
   interval, so a reader sees how large an effect could still hide in it.
3. Without an interval (one seed of a per-run number) nothing is claimed: the sentence says why.
4. Two compared runs that differ in more than one trained knob are a confound: no knob is credited
   with their difference until an ablation measures each knob on its own; then each gets its effect.
5. Common beliefs (the seed report's among them) are checked against the effects: supported,
   contradicted, not shown (within noise), or not tested here.
6. The TL;DR names the best run on the chosen metric, and the cheapest run within noise of it, by the
   verdicts the table shows (adjusted for its many questions); a best picked among several is flattered
   by the choice (the winner's curse): said, with its value on fresh seeds when a confirmation is stored.
7. The first finding says whether any run answered better (or worse) than the untrained base, on every
   answer score at every cap: a lower loss alone is not better answers.
8. Like with like: a metric one run did not measure, or a time that holds different work (a loss-only
   trial against a fully evaluated run, a trained run's total against the base's), is not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from loralab.analysis.ablate import Effect, differing, moved_knobs, scale_note
from loralab.analysis.comparison import (Comparison, bounded, cell_estimate, describe_evaluation, fmt_value, fmt_verdict, knobs,
                                        verdict_of, work_mismatch)
from loralab.metrics.table import better_of as table_better
from loralab.metrics.table import metric as table_metric
from loralab.metrics.stats import MULTIPLE, Estimate, Verdict, adjust_for_multiplicity, mean_ci
from loralab.workspace.status import Status
from loralab.workspace.store import RunRecord
from loralab.naming import confirmed_trial

def label_of(metric: str) -> str:
    base, _, cap = metric.partition("@")
    m = table_metric(base)
    label = m.label if m else base
    return f"{label} @{cap}" if cap else label


def fmt_of(metric: str) -> str:
    m = table_metric(metric)
    return m.fmt if m else "f3"


@dataclass(frozen=True)
class Headline:
    """A metric the report follows per knob (its good direction is the metric table's)."""

    topic: str  # quality, verbosity, drift, stability, time, money
    metric: str  # "{cap}" stands for the largest eval cap


HEADLINES = (
    Headline("quality", "eval_loss"),
    Headline("quality", "rouge_l@{cap}"),
    Headline("quality", "generalization_gap"),  # eval - train loss: overfitting
    Headline("verbosity", "mean_tokens@{cap}"),
    Headline("verbosity", "cap_hit_rate@{cap}"),
    Headline("drift", "drift_kl"),  # drift on general prompts is what a task adapter should not cause
    Headline("stability", "loss_spikes"),
    Headline("stability", "steps_to_90pct_drop"),  # fewer steps: adapts faster
    Headline("time", "total_s"),
    Headline("money", "cost"),
)
CAP_METRICS = ("rouge_l", "mean_tokens", "cap_hit_rate", "repeated_3gram")  # what a larger cap can change


def headline_metrics(caps: list[int]) -> list[str]:
    out = []
    for h in HEADLINES:
        if "{cap}" in h.metric:
            if caps:
                out.append(h.metric.format(cap=max(caps)))
        else:
            out.append(h.metric)
    return out


def better_of(metric: str) -> str | None:
    return table_better(metric)


def topic_of(metric: str) -> str:
    base = metric.partition("@")[0]
    return next((h.topic for h in HEADLINES if h.metric.partition("@")[0] == base), "other")


@dataclass(frozen=True)
class Finding:
    """One sentence of "What we learned" and the verdict it states."""

    kind: str  # effect | null | untested | confound | plan | credit | belief | importance
    text: str
    verdict: str  # higher / lower / within noise / untested / confounded / credited / supported / contradicted / not shown / not tested
    knob: str | None = None
    metric: str | None = None


# ---------------------------------------------------------------------------------------------
# Rules 1-3: one knob's effect


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _move(e: Effect) -> str:
    lo, hi = _num(e.low), _num(e.high)
    verb = "changing" if lo is None or hi is None else ("raising" if hi > lo else "lowering")
    return f"{verb} {e.knob} from {fmt_value(e.low)} to {fmt_value(e.high)}" + (f" ({e.note})" if e.note else "")


def decimals(values: list[float], fmt: str) -> int:
    """The compare table's decimals for `fmt`, or more, so the largest value keeps two significant
    digits: a real but small effect must not read as 0.000."""
    base = {"f0": 0, "f1": 1, "f2": 2, "int": 0, "pct": 1, "money": 4}.get(fmt, 3)
    big = max((abs(x) for x in values if x is not None and math.isfinite(x)), default=0.0)
    if big == 0.0:
        return base
    return min(8, max(base, 1 - math.floor(math.log10(big))))


def number(x: float, fmt: str, places: int | None = None, sign: bool = False) -> str:
    """A number in the metric's unit: percentages as points, money and floats with enough decimals."""
    if fmt == "pct":
        x *= 100
    d = decimals([x], fmt) if places is None else places
    return f"{x:{'+' if sign else ''},.{d}f}" if fmt == "int" else f"{x:{'+' if sign else ''}.{d}f}"


def interval(v: Verdict, fmt: str) -> str:
    """'+0.123 [+0.050, +0.200]': the change and its interval, as the compare table shows them (with
    more decimals when they would hide the effect); percentages in points (pp)."""
    if fmt not in ("f0", "f1", "f2", "f3", "f4", "money", "pct", "int"):
        return fmt_verdict(v, fmt).removesuffix(" " + v.label)
    scale = 100 if fmt == "pct" else 1
    lo, hi = bounded(v.lo, v.hi, fmt, diff=True)
    d = decimals([v.diff * scale, lo * scale, hi * scale], fmt)
    unit = " pp" if fmt == "pct" else ""
    star = "*" if MULTIPLE in v.note else ""  # excludes 0 alone, not among its family's questions
    return (f"{number(v.diff, fmt, d, True)}{unit} [{number(lo, fmt, d, True)}, {number(hi, fmt, d, True)}]{star}")


def testable(v: Verdict | None) -> bool:
    return v is not None and not (math.isnan(v.lo) or math.isnan(v.hi))


def covers(method: str, n: int, seeds: int) -> str:
    """What an interval holds, in words (stats.compare_runs's methods)."""
    return {"seeds+examples": f"over {seeds} seeds and {n} eval examples",
            "examples": f"over {n} eval examples; seed noise unmeasured with one seed",
            "seeds": f"across {seeds} seeds per side"}.get(method, "no interval")


def _evidence(e: Effect, level: float) -> str:
    return f"{level:.0%} CI {covers(e.method, e.verdict.n, e.seeds)}; {e.source}"


ONE_SEED = "one seed per run gives a per-run number no interval: train with `repeats: 3`"


def untested_why(e: Effect) -> str:
    """Why an effect has no interval, from what happened: a metric one of the runs did not measure (a
    loss-only sweep trial has no answers), times of different work, or one seed a run."""
    v = e.verdict
    if v is None or "nothing measured" in v.note:
        return "not measured by both runs (a run evaluated on its losses only has no answers to score)"
    if " not compared: " in v.note:
        return "not compared: " + v.note.split(" not compared: ", 1)[1]
    return ONE_SEED if v.n < 4 or e.seeds < 2 else "too few eval examples for an interval"


def effect_finding(e: Effect, level: float = 0.95) -> Finding:
    """Rules 1-3 for one knob on one metric."""
    label, fmt, v = label_of(e.metric), fmt_of(e.metric), e.verdict
    if not testable(v):
        return Finding("untested", f"The effect of {_move(e)} on {label} was not tested: {untested_why(e)} "
                       f"({e.source}).", "untested", e.knob, e.metric)
    assert v is not None
    if v.label == "within noise":
        text = (f"No measurable effect of {e.knob} ({fmt_value(e.low)} → {fmt_value(e.high)}) on {label} within "
                f"{e.seeds} seed{'s' if e.seeds != 1 else ''}: {interval(v, fmt)} ({_evidence(e, level)}).")
        return Finding("null", text, "within noise", e.knob, e.metric)
    scale = 100 if fmt == "pct" else 1
    size = f"{number(abs(v.diff), fmt, decimals([v.diff * scale, v.lo * scale, v.hi * scale], fmt))}" \
           f"{' points' if fmt == 'pct' else ''}"  # as many decimals as its interval shows
    rel = ""
    if e.reference and fmt != "pct" and math.isfinite(e.reference):
        pct = 100 * v.diff / abs(e.reference)
        rel = f"{pct:+.0f}%; " if abs(pct) >= 10 else f"{pct:+.1f}%; " if abs(pct) >= 1 else f"{pct:+.2g}%; "
    better = better_of(e.metric)
    judged = "" if better is None else (" (better)" if v.label == better else " (worse)")
    tail = ""
    if e.metric == "generalization_gap" and e.reference is not None:
        # "Overfitting" is a gap above zero: eval loss over the loss on training examples.
        high = e.reference + v.diff
        if e.reference > 0 and high > 0:
            label = "overfitting (the eval − train loss gap)"
        else:
            label, rel = "the eval − train loss gap", ""
            judged = "" if max(e.reference, high) <= 0 else judged
            tail = (f" The gap is {e.reference:+.3f} → {high:+.3f}: " +
                    ("below zero on both sides (eval loss under the loss on training examples), so no overfitting "
                     "either way." if max(e.reference, high) <= 0 else "above zero on one side only."))
    text = (f"{_move(e).capitalize()} {'raised' if v.label == 'higher' else 'lowered'} {label} by {size}{judged}: "
            f"{rel}{interval(v, fmt)} ({_evidence(e, level)}).{tail}")
    if e.method == "examples":
        text += " One seed: the interval covers eval examples, not training randomness (`repeats: 3` measures it)."
    return Finding("effect", text, v.label, e.knob, e.metric)


def effect_findings(effects: list[Effect], level: float = 0.95) -> list[Finding]:
    """Stated effects one by one; the nulls of one knob folded into one sentence, each with its numbers."""
    out, nulls, untested = [], {}, {}
    for e in effects:
        f = effect_finding(e, level)
        if f.kind == "effect":
            out.append(f)
        elif f.kind == "null":
            nulls.setdefault((e.knob, _key(e.low), _key(e.high), e.note, e.source), []).append(e)
        else:
            untested.setdefault((e.knob, e.source, untested_why(e)), []).append(e)
    for (knob, _, _, note, source), es in nulls.items():
        e0 = es[0]
        parts = "; ".join(f"{label_of(e.metric)} {interval(e.verdict, fmt_of(e.metric))}" for e in es)
        how = "; ".join(dict.fromkeys(f"{label_of(e.metric)} {covers(e.method, e.verdict.n, e.seeds)}"
                                      if len({x.method for x in es}) > 1 else covers(e.method, e.verdict.n, e.seeds)
                                      for e in es))
        text = (f"No measurable effect of {knob} ({fmt_value(e0.low)} → {fmt_value(e0.high)}"
                + (f"; {note}" if note else "") + ") within "
                f"{e0.seeds} seed{'s' if e0.seeds != 1 else ''} on: {parts} ({level:.0%} CI, {how}; {source}).")
        out.append(Finding("null", text, "within noise", knob, ",".join(e.metric for e in es)))
    for (knob, source, why), es in untested.items():
        labels = ", ".join(label_of(e.metric) for e in es)
        why = {ONE_SEED: "one seed per run gives per-run numbers no interval; train with `repeats: 3`"}.get(why, why)
        out.append(Finding("untested", f"Not tested for {knob} ({source}): {labels}: {why}.", "untested", knob,
                           ",".join(e.metric for e in es)))
    return out


def _key(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# ---------------------------------------------------------------------------------------------
# The first findings: each run against the untrained base, and what its training curves show


ANSWER_METRICS = ("rouge_l", "token_f1", "chrf", "exact_match")  # scores of the answers against the references


def answer_findings(c: Comparison) -> list[Finding]:
    """Did any run answer better than the untrained base? Loss alone can fall while the answers stay as
    they were: every answer score at every cap, against base, as the table's (adjusted) verdicts say;
    the runs that answered better, those that answered worse, and those whose answers were not scored."""
    cols = [(col, j) for col, (i, j) in enumerate(c.pairs) if c.groups[i][0].kind == "base"]
    if not cols:
        return []
    rows = [r for _, rs in c.sections for r in rs if r.key.partition("@")[0] in ANSWER_METRICS]
    names = ", ".join(label_of(m) for m in ANSWER_METRICS)
    caps = sorted({int(r.key.partition("@")[2]) for r in rows})
    where = f"{names} at cap{'s' if len(caps) > 1 else ''} {', '.join(map(str, caps))}"
    better: dict[str, list[str]] = {}
    worse: dict[str, list[str]] = {}
    unscored, level_ = [], []
    for col, j in cols:
        verdicts = [(r, r.verdicts[col]) for r in rows if r.verdicts[col] is not None]
        if not verdicts:
            unscored.append(c.runs[j])
            continue
        for r, v in verdicts:
            if v.label not in ("higher", "lower") or better_of(r.key) is None:
                continue
            side = better if v.label == better_of(r.key) else worse
            side.setdefault(c.runs[j], []).append(f"{label_of(r.key)} {interval(v, fmt_of(r.key))}")
        if c.runs[j] not in better and c.runs[j] not in worse:
            level_.append(c.runs[j])
    if not rows:
        return [Finding("answers", "On the answers: no compared run's answers were scored (evaluated on their losses "
                        "only), so whether fine-tuning improved them over the untrained base is not known; the losses "
                        "below say nothing about it.", "untested")]
    if better:
        text = "On the answers, better than the untrained base: " + "; ".join(
            f"{n} on {', '.join(parts)}" for n, parts in better.items()) + "."
    else:
        text = f"On the answers, no run beat the untrained base measurably ({where})."
    if worse:
        text += " Worse than the base: " + "; ".join(f"{n} on {', '.join(parts)}" for n, parts in worse.items()) + "."
    if level_ and (better or worse):
        text += f" Within noise of the base on every answer score: {', '.join(level_)}."
    if unscored:
        text += f" Not scored (evaluated on losses only): {', '.join(unscored)}."
    verdict = "mixed" if better and worse else "better" if better else "worse" if worse else "within noise"
    return [Finding("answers", text, verdict)]


def base_findings(c: Comparison, metrics: list[str]) -> list[Finding]:
    """Did fine-tuning beat the untrained base? Each trained run against base on the headline metrics,
    better and worse named with their intervals (the comparison's "vs base" columns)."""
    out = []
    # The base trains nothing: its times say nothing about fine-tuning, so they are not compared here.
    metrics = [m for m in metrics if (table_metric(m) is None or table_metric(m).group != "cost")]
    for col, (i, j) in enumerate(c.pairs):
        if c.groups[i][0].kind != "base":
            continue
        parts: dict[str, list[str]] = {"better": [], "worse": [], "changed": [], "within noise": [], "untested": []}
        for m in metrics:
            try:
                v = c.row(m).verdicts[col]
            except KeyError:
                continue
            if v is None:
                continue
            word = _judged(v.label, m).split(", ")[-1] if v.label in ("higher", "lower") else v.label
            word = {"higher": "changed", "lower": "changed", "negligible": "within noise"}.get(word, word)
            parts[word].append(f"{label_of(m)} {interval(v, fmt_of(m))}" if testable(v) else label_of(m))
        said = [f"{k} on {'; '.join(v)}" for k, v in parts.items() if v and k != "untested"]
        if not said:
            continue
        verdict = "worse" if parts["worse"] and not parts["better"] else "better" if parts["better"] and not \
            parts["worse"] else "mixed"
        text = f"{c.runs[j]} against the untrained base: " + "; ".join(said) + "."
        if parts["untested"]:
            text += f" Not tested (one seed): {', '.join(parts['untested'])}."
        out.append(Finding("base", text, verdict, None, None))
    return out


def training_findings(groups: list[list[RunRecord]], level: float = 0.95) -> list[Finding]:
    """What the training curves say: a loss still falling at the last step (train longer), measured as
    the slope of the training loss over the last half of the steps, with its interval across seeds (or,
    with one seed, from the regression itself: steps are not independent, so it is optimistic)."""
    import numpy as np

    out = []
    for g in groups:
        if g[0].kind == "base" or not all(r.status == Status.FINISHED for r in g):
            continue
        slopes, ses, n = [], [], 0
        for r in g:
            loss = [x for x in (r.curves.get("loss") or []) if x is not None and math.isfinite(x)]
            if len(loss) < 8:
                continue
            tail = np.array(loss[len(loss) // 2:])
            n = len(tail)
            x = np.arange(n, dtype=float)
            slope, icept = np.polyfit(x, tail, 1)
            resid = tail - (slope * x + icept)
            slopes.append(float(slope))
            ses.append(math.sqrt(float(resid @ resid) / (n - 2) / float(((x - x.mean()) ** 2).sum())))
        if not slopes:
            continue
        if len(slopes) >= 2:
            e = mean_ci(slopes, level)
            how = f"across {len(slopes)} seeds"
        else:
            from scipy import stats as scipy_stats

            half = float(scipy_stats.t.ppf((1 + level) / 2, n - 2)) * ses[0]
            e = Estimate(slopes[0], slopes[0] - half, slopes[0] + half, 1)
            how = "one seed, from the regression (optimistic: steps are not independent)"
        if e.hi < 0:
            d = decimals([e.mean, e.lo, e.hi], "f3")
            out.append(Finding("training", f"{g[0].name}'s training loss was still falling at its last step: "
                               f"{e.mean:+.{d}f} per step [{e.lo:+.{d}f}, {e.hi:+.{d}f}] over the last {n} steps "
                               f"({level:.0%} CI {how}). Training longer may lower it further.", "still falling",
                               None, "loss_final"))
    return out


def gap_findings(c: Comparison, level: float = 0.95) -> list[Finding]:
    """Overfitting: a run whose eval − train loss gap is larger than its reference's, with the interval."""
    try:
        row = c.row("generalization_gap")
    except KeyError:
        return []
    out = []
    for col, (i, j) in enumerate(c.pairs):
        v = row.verdicts[col]
        if c.groups[i][0].kind == "base" or v is None or v.label != "higher":
            continue
        a, b = row.cells[i], row.cells[j]
        if b.mean > 0:  # eval loss above the loss on training examples: it fits those better than new ones
            text = (f"{c.runs[j]} overfits more than {c.runs[i]}: the eval − train loss gap grew from {a.mean:.3f} to "
                    f"{b.mean:.3f}, {interval(v, 'f4')} ({level:.0%} CI). It fits its training examples better than "
                    "new ones.")
        else:  # both below zero: eval examples are easier than the training probe; no overfitting shown
            text = (f"{c.runs[j]}'s eval − train loss gap is larger than {c.runs[i]}'s ({a.mean:.3f} → {b.mean:.3f}, "
                    f"{interval(v, 'f4')}, {level:.0%} CI) but still below zero: its eval loss stays under its loss "
                    "on training examples, so this is no sign of overfitting yet.")
        out.append(Finding("gap", text, "higher", None, "generalization_gap"))
    return out


# ---------------------------------------------------------------------------------------------
# Rule 4: confounds, and their credit once an ablation ran


@dataclass
class Confound:
    """Run `b` against reference `a` when they differ in more than one knob."""

    a: str
    b: str
    trained: list[str]  # lora.* / train.* knobs that differ
    eval_only: list[str]  # generate.* knobs that differ (every row compares both at the same cap)
    verdicts: dict[str, Verdict | None] = field(default_factory=dict)  # headline metric -> b vs a
    note: str = ""  # what moved with r (alpha, alpha/r), in words


def find_confounds(c: Comparison, metrics: list[str]) -> list[Confound]:
    """Each verdict column of the comparison ("B vs A") whose runs differ in more than one trained knob."""
    firsts = [g[0] for g in c.groups]
    trained_idx = [i for i, r in enumerate(firsts) if r.kind != "base"]
    if len(trained_idx) < 2:
        return []
    ref = trained_idx[0]
    out = []
    for i in trained_idx[1:]:
        col = c.column(c.runs[ref], c.runs[i])
        d = moved_knobs(knobs(firsts[ref]), knobs(firsts[i]))
        d += [k for k in differing(knobs(firsts[ref]), knobs(firsts[i])) if k.startswith("generate.")]
        trained = [k for k in d if not k.startswith("generate.")]
        if len(trained) < 2:  # a generate.* knob plays no part at a fixed cap: one trained knob is creditable
            continue
        conf = Confound(c.runs[ref], c.runs[i], trained, [k for k in d if k.startswith("generate.")],
                        note=scale_note("lora.r", firsts[ref], firsts[i]) if "lora.r" in trained else "")
        for m in metrics:
            try:
                conf.verdicts[m] = c.row(m).verdicts[col] if col is not None else None
            except KeyError:
                pass
        out.append(conf)
    return out


def confound_findings(conf: Confound, effects: list[Effect], level: float = 0.95,
                      plan_text: str | None = None) -> list[Finding]:
    """The confound sentence, then for each metric on which b differs from a, each knob's own share."""
    n = len(conf.trained) + len(conf.eval_only)
    differs = {m: v for m, v in conf.verdicts.items() if testable(v) and v.label != "within noise"}
    what = "; ".join(f"{label_of(m)} {interval(v, fmt_of(m))}" for m, v in differs.items())
    names = [f"{k} ({conf.note})" if k == "lora.r" and conf.note else k for k in conf.trained + conf.eval_only]
    text = (f"{conf.a} and {conf.b} differ in {n} knobs ({', '.join(names)}), so no single "
            f"knob can be credited with {conf.b}'s differences from {conf.a}"
            + (f" ({what}; {level:.0%} CI)" if what else " (none of its headline differences is outside the noise)")
            + ".")
    if conf.eval_only and conf.trained:
        text += (f" {', '.join(conf.eval_only)} plays no part in them: every row compares both runs at the same cap; "
                 "its own effect is read from the stored answers at each cap.")
    out = [Finding("confound", text, "confounded")]
    measured = {k for k in conf.trained if any(e.knob == k and testable(e.verdict) for e in effects)}
    missing = [k for k in conf.trained if k not in measured]
    if missing:
        plan = plan_text or f"`loralab ablate FILE {conf.a} {conf.b} --design ofat`"
        out.append(Finding("plan", f"Not yet measured on its own: {', '.join(missing)}. The ablation plan: {plan}.",
                           "confounded"))
    for m, v in differs.items():
        parts, total = [], 0.0
        for k in conf.trained:
            e = _best_effect(effects, k, m)
            if e is None:
                continue
            total += e.verdict.diff
            parts.append(f"{k} {interval(e.verdict, fmt_of(m))} ({_judged(e.verdict.label, m)})")
        if not parts:
            continue
        fmt = fmt_of(m)
        text = (f"Credit for {conf.b}'s {label_of(m)} vs {conf.a} ({interval(v, fmt)}), each knob on its own: "
                + "; ".join(parts) + ".")
        if not missing:
            d = decimals([total, v.diff], fmt)
            text += (f" Together {number(total, fmt, d, True)} of {number(v.diff, fmt, d, True)}"
                     f"{' pp' if fmt == 'pct' else ''}; the rest is interaction between knobs, or noise.")
        out.append(Finding("credit", text, "credited", None, m))
    return out


def _judged(label: str, metric: str) -> str:
    """'lower, better': the direction and, when the metric has a good direction, what it means."""
    better = better_of(metric)
    if label == "within noise" or better is None:
        return label
    return f"{label}, {'better' if label == better else 'worse'}"


_DESIGN_RANK = {"factorial": 0, "pair": 1, "cap": 2}


def _best_effect(effects: list[Effect], knob: str, metric: str) -> Effect | None:
    """The effect of a knob on a metric from the strongest design available (factorial, then pairs)."""
    cands = [e for e in effects if e.knob == knob and e.metric == metric and testable(e.verdict)]
    return min(cands, key=lambda e: _DESIGN_RANK.get(e.design, 9)) if cands else None


# ---------------------------------------------------------------------------------------------
# Rule 5: common beliefs


@dataclass(frozen=True)
class Belief:
    """A claim a practitioner may hold: raising `knob` moves `metric` in direction `expect`."""

    claim: str
    knob: str
    metric: str  # a metric key without the cap (per-cap metrics match at any cap)
    expect: str  # "higher" or "lower", when the knob is raised
    source: str = "common belief"


# Where the seed report's beliefs come from, said so a reader who never saw it knows what it is.
SEED_REPORT = "the seed report, docs/seed-report/report.md: Run A vs Run B, which `loralab demo` reruns"

BELIEFS = (
    Belief("A higher learning rate trains faster", "train.learning_rate", "steps_to_90pct_drop", "lower", SEED_REPORT),
    Belief("... but is less stable", "train.learning_rate", "loss_spikes", "higher", SEED_REPORT),
    Belief("A higher learning rate reaches a lower loss in the same steps", "train.learning_rate", "eval_loss", "lower"),
    Belief("A larger max_new_tokens makes answers more verbose", "generate.max_new_tokens", "mean_tokens", "higher",
           SEED_REPORT),
    Belief("... with a risk of drift: more repetition", "generate.max_new_tokens", "repeated_3gram", "higher",
           SEED_REPORT),
    Belief("A larger rank r fits the task better", "lora.r", "eval_loss", "lower"),
    Belief("A larger rank r costs more time", "lora.r", "total_s", "higher"),
    Belief("A larger alpha moves the model further from the base", "lora.alpha", "drift_kl", "higher"),
    Belief("More dropout reduces overfitting", "lora.dropout", "generalization_gap", "lower"),
)


# Raising alpha at a fixed r raises the update scale alpha/r: a belief about alpha is tested by either.
KNOB_ALIASES = {"lora.alpha": ("lora.alpha", "lora.alpha/r")}


def belief_finding(b: Belief, effects: list[Effect], level: float = 0.95) -> Finding:
    """Supported / contradicted when an effect's interval excludes zero; not shown when it does not."""
    knobs_ = KNOB_ALIASES.get(b.knob, (b.knob,))
    cands = [e for e in effects if e.knob in knobs_ and e.metric.partition("@")[0] == b.metric and testable(e.verdict)]
    if not cands:
        return Finding("belief", f"\u201c{b.claim}\u201d ({b.source}): not tested here: no measured effect of {b.knob} "
                       f"on {label_of(b.metric)}.", "not tested", b.knob, b.metric)
    e = min(cands, key=lambda e: _DESIGN_RANK.get(e.design, 9))
    v = e.verdict
    lo, hi = _num(e.low), _num(e.high)
    raised = lo is None or hi is None or hi > lo
    fmt = fmt_of(e.metric)
    numbers = f"{_move(e)}: {label_of(e.metric)} {interval(v, fmt)} ({level:.0%} CI, {e.seeds} seed{'s' if e.seeds != 1 else ''}; {e.source})"
    if v.label == "within noise":
        verdict = "not shown"
        text = f"\u201c{b.claim}\u201d ({b.source}): not shown here, within noise: {numbers}."
    else:
        went = v.label if raised else {"higher": "lower", "lower": "higher"}[v.label]
        verdict = "supported" if went == b.expect else "contradicted"
        text = f"\u201c{b.claim}\u201d ({b.source}): {verdict}: {numbers}."
    return Finding("belief", text, verdict, b.knob, e.metric)


def belief_findings(effects: list[Effect], level: float = 0.95, beliefs=BELIEFS) -> list[Finding]:
    return [belief_finding(b, effects, level) for b in beliefs]


# ---------------------------------------------------------------------------------------------
# Sweeps: which knobs mattered


@dataclass(frozen=True)
class Importance:
    """One knob's parameter importance for one objective: the value on all completed trials, and its
    spread (5th-95th percentile) across bootstrap resamples of those trials."""

    knob: str
    value: float
    lo: float
    hi: float


def importance_findings(importances: dict[str, list[Importance]], n_trials: int, resamples: int = 0) -> list[Finding]:
    """Which knob mattered for each objective, with how far resampling the trials moves each number.
    A knob is named "mattered most" only when its lowest resampled importance is above every other
    knob's highest; otherwise the ranking is within the spread and the sentence says so."""
    out = []
    for objective, imp in importances.items():
        if not imp:
            continue
        ranked = sorted(imp, key=lambda x: -x.value)
        parts = ", ".join(f"{x.knob} {x.value:.0%} [{x.lo:.0%}, {x.hi:.0%}]" for x in ranked)
        top, rest = ranked[0], ranked[1:]
        clear = all(top.lo > x.hi for x in rest)
        lead = (f"{top.knob} mattered most for {label_of(objective)}" if clear else
                f"no knob clearly mattered most for {label_of(objective)} (the resampled ranges overlap)")
        out.append(Finding("importance",
                           f"In the sweep's {n_trials} completed trials, {lead}: Optuna parameter importance {parts} "
                           f"(5-95% range over {resamples} bootstrap resamples of the trials; pruned trials left out). "
                           "Importance ranks knobs; it gives no direction.", "importance", top.knob if clear else None,
                           objective))
    return out


def min_trials_for_importance(n_knobs: int) -> int:
    """Completed trials before importances are shown: 8 per searched knob, 16 at least. Optuna's default
    evaluator (PED-ANOVA) contrasts the best 10% of trials with the rest; with fewer, that best set is
    one or two trials and the importances swing from one resample of the trials to the next."""
    return max(16, 8 * n_knobs)


# ---------------------------------------------------------------------------------------------
# Rule 6: the TL;DR


@dataclass
class Pick:
    name: str
    estimate: Estimate
    seconds: Estimate | None
    money: Estimate | None
    vs_best: Verdict | None = None


@dataclass
class TLDR:
    metric: str
    better: str
    best: Pick | None
    cheapest: Pick | None  # the cheapest run within noise of the best (may be the best itself)
    within_noise: list[str] = field(default_factory=list)
    base: Estimate | None = None
    currency: str | None = None
    sentences: list[str] = field(default_factory=list)


def _est(group: list[RunRecord], key: str, level: float) -> Estimate | None:
    """A run's value with the same interval as its cell in the tables (seeds and eval examples)."""
    return cell_estimate(key, group, level)


def _pm(e: Estimate, fmt: str) -> str:
    from loralab.analysis.comparison import fmt_estimate

    text = fmt_estimate(e, fmt)
    return text + (f" ({e.n} seeds)" if e.n > 1 else " (1 seed)")


CONFIRMS = "confirms"  # a confirmation run's config names the run (or sweep trial) it retrains on fresh seeds


def confirmation_of(group: list[RunRecord]) -> str | None:
    """The run a group confirms: its records' config["confirms"], or the sweep trial a run named
    `trial-NNNN-confirm` retrains (naming.confirm_name); else None."""
    if not group:
        return None
    name = (group[0].config or {}).get(CONFIRMS)
    if not name:
        name = confirmed_trial(group[0].name)
    return str(name) if name else None


def _flip(v: Verdict) -> Verdict:
    """b vs a read as a vs b."""
    return replace(v, diff=-v.diff, lo=-v.hi, hi=-v.lo, label={"higher": "lower", "lower": "higher"}.get(v.label, v.label))


def table_verdict(c: Comparison | None, metric: str, ref: str, other: str) -> Verdict | None:
    """`other` against `ref` as the comparison's table shows it (adjusted for its column's many
    questions), read the other way round when the table has `ref` against `other`; None when absent."""
    if c is None:
        return None
    try:
        row = c.row(metric)
    except KeyError:
        return None
    col = c.column(ref, other)
    if col is not None:
        return row.verdicts[col]
    col = c.column(other, ref)
    return None if col is None or row.verdicts[col] is None else _flip(row.verdicts[col])


def against_best(best: list[RunRecord], others: list[list[RunRecord]], metric: str, level: float = 0.95,
                 floors: dict[str, float] | None = None, comparison: Comparison | None = None) -> dict[str, Verdict | None]:
    """Each other run against the best on `metric`, by name: the table's adjusted verdict where the table
    has the pair; the rest one family of questions ("which runs are within noise of the best?"), adjusted
    the same way (Benjamini-Hochberg), so no sentence calls apart what the table calls within noise.
    A sweep naming its trials within noise of the best asks the same questions."""
    vs = {g[0].name: table_verdict(comparison, metric, best[0].name, g[0].name) for g in others}
    rest = [g for g in others if vs[g[0].name] is None]
    for g, v in zip(rest, adjust_for_multiplicity([verdict_of(metric, best, g, level, floors) for g in rest], level)):
        vs[g[0].name] = v
    return vs


def tldr(groups: list[list[RunRecord]], metric: str = "eval_loss", *, better: str | None = None, level: float = 0.95,
         currency: str | None = None, floors: dict[str, float] | None = None,
         comparison: Comparison | None = None) -> TLDR:
    """The best finished run on `metric`, and the cheapest run whose difference from it is within noise
    (or negligible) and that is measurably cheaper (`_cheaper`).

    Verdicts are the ones the table shows when it has the pair (adjusted for its column's questions);
    the others are one family, adjusted the same way (Benjamini-Hochberg), so the TL;DR never calls a
    difference the table calls within noise. The best of several is flattered by being picked (the
    winner's curse): said, with its value on fresh seeds beside it when a confirmation run is stored.
    Cost is time per run (train + eval seconds), or money when a price per hour is set; runs evaluated
    differently compare their train time only."""
    better = better or better_of(metric) or "lower"
    confirmed = {confirmation_of(g): g for g in groups if g and confirmation_of(g)}
    groups = [g for g in groups if g and not confirmation_of(g)]
    base = next((g for g in groups if g and g[0].kind == "base"), None)
    runs = [g for g in groups if g and g[0].kind == "lora" and all(r.status == Status.FINISHED for r in g)
            and _est(g, metric, level) is not None]
    out = TLDR(metric, better, None, None, base=_est(base, metric, level) if base else None, currency=currency)
    if not runs:
        out.sentences.append(f"No finished run measured {label_of(metric)}: nothing to recommend yet.")
        return out
    sign = 1 if better == "lower" else -1
    best = min(runs, key=lambda g: sign * _est(g, metric, level).mean)

    def pick(g, vs=None) -> Pick:
        return Pick(g[0].name, _est(g, metric, level), _est(g, "total_s", level), _est(g, "cost", level), vs)

    out.best = pick(best)
    others = [g for g in runs if g is not best]
    vs = against_best(best, others, metric, level, floors, comparison)
    close = [out.best]
    untested = [g[0].name for g in others if not testable(vs[g[0].name])]
    for g in others:
        v = vs[g[0].name]
        if testable(v) and v.label in ("within noise", "negligible"):
            close.append(pick(g, v))
    out.within_noise = [p.name for p in close[1:]]
    by_name = {g[0].name: g for g in runs}
    cost_key = "cost" if any(p.money is not None for p in close) else "total_s"
    cheaper = []
    for p in close[1:]:
        claim = _cheaper(by_name[out.best.name], by_name[p.name], cost_key, level, currency)
        if claim is not None:
            cheaper.append((p, claim))
    fmt = fmt_of(metric)
    label = label_of(metric)
    s = f"Best {label}: {out.best.name}, {_pm(out.best.estimate, fmt)}, at {_cost(out.best, currency)} per run"
    if out.base is not None:
        s += f"; the untrained base: {fmt_value(out.base.mean, fmt)}"
    out.sentences.append(s + ".")
    after = [_curse(out.best, len(runs), confirmed.get(out.best.name), metric, level)]
    after += [f.text for f in answer_findings(comparison)] if comparison is not None else []
    if not cheaper:
        out.cheapest = out.best
        if out.within_noise:
            others_ = (f" ({', '.join(out.within_noise)} {'is' if len(out.within_noise) == 1 else 'are'} within noise of "
                       "it, but not measurably cheaper)")
        elif untested:
            others_ = (f" (no other run is measurably within noise of it: {', '.join(untested)} "
                       f"{'has' if len(untested) == 1 else 'have'} no interval against it)")
        else:
            others_ = " (no other run is within noise of it)"
        out.sentences.append(f"Cheapest within noise of the best: {out.best.name} itself{others_}.")
        out.sentences += after
        return out
    c, claim = min(cheaper, key=lambda pc: pc[1][0])
    out.cheapest = c
    out.sentences.append(f"Cheapest within noise of the best: {c.name}, {_pm(c.estimate, fmt)}; "
                         f"{interval(c.vs_best, fmt)} vs {out.best.name}, {c.vs_best.label} ({level:.0%} CI); "
                         f"{claim[1]}.")
    out.sentences += after
    return out


def _curse(best: Pick, n: int, confirmation: list[RunRecord] | None, metric: str, level: float) -> str:
    """The winner's curse, in words: the best observed of n is optimistic; its value on fresh seeds."""
    fmt = fmt_of(metric)
    if confirmation is not None:
        e = _est(confirmation, metric, level)
        if e is not None:
            return (f"Confirmed on fresh seeds: {best.name} {_pm(e, fmt)} against {fmt_value(best.estimate.mean, fmt)} "
                    f"when it was picked as the best of {n} (a value picked as the best is optimistic: the winner's "
                    "curse; the confirmed value is the one to expect).")
    if n < 2:
        return f"{best.name} is the only finished run: nothing was picked, so its value is not flattered by a choice."
    return (f"{best.name} was picked as the best of {n} runs by its observed value, which is optimistic (the winner's "
            f"curse: the best of {n} noisy values is likely above its true value); retrain it on fresh seeds to "
            "confirm it before relying on the number.")


def _cheaper(best: list[RunRecord], other: list[RunRecord], key: str, level: float,
             currency: str | None) -> tuple[float, str] | None:
    """(relative cost, sentence) when `other` is measurably cheaper than `best`, else None.

    Wall time (or money) needs the noise rule like any metric: a time difference is claimed only when its
    interval across seeds excludes zero. With one seed a run, wall time is not compared (machine load moves
    it: the same work took 158 s and 811 s on one busy machine); the tokens processed, which load does not
    move, are compared instead. Runs evaluated differently (a loss-only trial and a fully evaluated run)
    compare their train time: their total times include different work."""
    why = work_mismatch(key, best, other)
    if why is not None:
        key = "train_s"
    v = verdict_of(key, best, other, level)
    mb, mo = _est(best, key, level), _est(other, key, level)
    if v is not None and testable(v) and mb is not None and mo is not None and mb.mean:
        if v.label != "lower":
            return None
        unit = currency or "" if key == "cost" else "s"
        what = {"total_s": "time", "train_s": "train time", "cost": "money"}.get(key, key)
        f = "f0" if unit == "s" else "money"
        text = (f"{fmt_value(mo.mean, f, currency)}{' s' if unit == 's' else ''} per run"
                f"{' of training' if key == 'train_s' else ''} against {fmt_value(mb.mean, f, currency)}"
                f"{' s' if unit == 's' else ''}, {-v.diff / mb.mean:.0%} less {what}: "
                f"{v.diff:+.3g} {unit} [{v.lo:+.3g}, {v.hi:+.3g}] ({level:.0%} CI across seeds)").replace("  ", " ")
        if why is not None:
            text += (f"; train time only: {other[0].name} ({describe_evaluation(other)}) and {best[0].name} "
                     f"({describe_evaluation(best)}) were evaluated differently, so their total times are not compared")
        return (1 + v.diff / mb.mean, text)
    if v is not None and not testable(v) and " not compared: " in v.note:
        return None
    work = [_est(g, "train_tokens", level) for g in (best, other)]
    if any(w is None for w in work) or not work[0].mean or work[1].mean >= work[0].mean:
        return None
    share = work[1].mean / work[0].mean
    return (share, f"{1 - share:.0%} fewer tokens trained ({work[1].mean:,.0f} vs {work[0].mean:,.0f}); wall time "
                   "is not compared with one seed a run: machine load moves it")


def _cost(p: Pick, currency: str | None) -> str:
    parts = []
    if p.seconds is not None:
        parts.append(f"{p.seconds.mean:.0f} s")
    if p.money is not None:
        parts.append(f"{p.money.mean:.4f} {currency or ''}".strip())
    return " and ".join(parts) or "unknown cost"
