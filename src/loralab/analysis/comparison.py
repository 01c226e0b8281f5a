"""The "Main differences" table: the knobs that differ between runs, then the outcomes side by side,
grouped (quality, verbosity, drift, stability, cost), each as a mean with its interval over seeds and
eval examples, and verdicts: each trained run against the untrained base, then against the first run:
the difference, its interval, and `within noise` when the interval contains zero.

The intervals are metrics.stats': per-example metrics (quality, verbosity, eval loss) pair the runs by
example (and by seed where they share seeds); per-run metrics (drift, stability, cost) have the seed
part only. Each verdict column is one family of questions (Benjamini-Hochberg).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from loralab.config.schema import lora_variant_defaults
from loralab.metrics.stats import (MULTIPLE, Estimate, Side, Verdict, adjust_for_multiplicity, compare_runs, estimate,
                                   mean_ci, verdict_label)
from loralab.metrics.table import (COST_ROWS, DRIFT_ROWS, LOSS_ROWS, PER_EXAMPLE, QUALITY_CAP,  # noqa: F401 (re-exported)
                                   STABILITY_ROWS, VERBOSITY_CAP, metric)
from loralab.workspace.status import Status
from loralab.workspace.store import RunRecord

KNOB_SECTIONS = ("lora", "train", "generate")


def knobs(rec: RunRecord) -> dict[str, Any]:
    """A run's settings as flat `section.key` pairs (base has none: it is the untrained model)."""
    return flat_knobs(rec.config) if rec.kind != "base" else {}


def flat_knobs(config: dict[str, Any]) -> dict[str, Any]:
    """Settings by section as `section.key` pairs; LoRA variants a run left out (at their defaults) are
    filled in, so runs from before the variants and runs with them compare knob by knob."""
    out: dict[str, Any] = {}
    for section in KNOB_SECTIONS:
        values = config.get(section) or {}
        if section == "lora" and values:
            values = {**values, **{k: v for k, v in lora_variant_defaults().items() if k not in values}}
        for k, v in values.items():
            out[f"{section}.{k}"] = v
    return out


def caps_of(records: list[RunRecord]) -> list[int]:
    caps = set()
    for r in records:
        for key in r.metrics:
            m = re.match(r"^rouge_l@(\d+)$", key)
            if m:
                caps.add(int(m.group(1)))
    return sorted(caps)


@dataclass
class Row:
    key: str
    label: str
    fmt: str
    cells: list[Estimate | None]
    verdicts: list[Verdict | None]  # one per verdict column


@dataclass
class Comparison:
    runs: list[str]
    groups: list[list[RunRecord]]
    knobs: dict[str, list[Any]] = field(default_factory=dict)
    sections: list[tuple[str, list[Row]]] = field(default_factory=list)
    verdict_columns: list[str] = field(default_factory=list)  # "B vs A"
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (reference, other) behind each column
    currency: str | None = None
    floors: dict[str, float] = field(default_factory=dict)  # evaluation.min_effect
    levels: list[float] = field(default_factory=list)  # each verdict column's confidence level (pair_levels)

    def column(self, ref: str, other: str) -> int | None:
        """The verdict column of `other` against `ref`, if the table has one."""
        for col, (i, j) in enumerate(self.pairs):
            if (self.runs[i], self.runs[j]) == (ref, other):
                return col
        return None

    @property
    def notes(self) -> list[str]:
        """What the intervals leave out or assume, once each (shown under the table)."""
        out: list[str] = []
        for _, rows in self.sections:
            for r in rows:
                for v in r.verdicts:
                    if v is not None and " not compared: " in v.note:  # one sentence for all of them
                        parts = [NOT_COMPARED]
                    else:
                        parts = v.note.split("; ") if v is not None and v.note else []
                    for part in parts:
                        if part not in out:
                            out.append(part)
        return out

    @property
    def statuses(self) -> list[str]:
        return [_status(g) for g in self.groups]

    def row(self, key: str) -> Row:
        for _, rows in self.sections:
            for r in rows:
                if r.key == key:
                    return r
        raise KeyError(key)

    def to_json(self, indent: int | None = 2) -> str:
        """The comparison as a JSON string (what `loralab compare --json` prints); `to_dict` for the data."""
        import json

        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_dict(self) -> dict[str, Any]:
        """Runs (ids, seeds, statuses), knobs, outcomes and verdicts as plain data (NaN as None)."""
        def est(e: Estimate | None):
            return None if e is None else {"mean": _num(e.mean), "lo": _num(e.lo), "hi": _num(e.hi), "n": e.n}

        def ver(v: Verdict | None):
            return None if v is None else {"diff": _num(v.diff), "lo": _num(v.lo), "hi": _num(v.hi), "n": v.n,
                                           "verdict": v.label, "interval_covers": v.method, "note": v.note or None}

        out: dict[str, Any] = {
            "runs": [{"name": n, "ids": [r.id for r in g], "seeds": [r.seed for r in g],
                      "statuses": [r.status for r in g]} for n, g in zip(self.runs, self.groups)],
            "knobs": self.knobs, "outcomes": {}, "verdicts": {}, "sections": {},
        }
        for title, rows in self.sections:
            out["sections"][title] = [r.key for r in rows]
            for r in rows:
                out["outcomes"][r.key] = {n: est(c) for n, c in zip(self.runs, r.cells)}
                if self.verdict_columns:
                    out["verdicts"][r.key] = {col: ver(v) for col, v in zip(self.verdict_columns, r.verdicts)}
        return out


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else x


def _status(group: list[RunRecord]) -> str:
    statuses = sorted({r.status for r in group})
    return statuses[0] if len(statuses) == 1 else "/".join(statuses)


def _getter(key: str):
    """How to read `key` off one stored eval sample, or None when it is not measured per example."""
    if key == "eval_loss":
        return lambda s: s.get("loss")
    base, _, cap = key.partition("@")
    field_ = PER_EXAMPLE.get(base) if cap else None
    if field_ is None:
        return None
    return lambda s: ((s.get("outputs") or {}).get(cap) or {}).get("metrics", {}).get(field_)


def _per_example(group: list[RunRecord], key: str) -> dict[str, list[float]] | None:
    """Each eval example's values of `key`, one per seed of the group (None when not stored per
    example by every seed: then the run-level numbers are compared instead)."""
    get = _getter(key)
    if get is None:
        return None
    out: dict[str, list[float]] = {}
    for i, r in enumerate(group):
        found = {s["id"]: get(s) for s in r.samples if get(s) is not None}
        if not found:
            return None
        for sid, v in found.items():
            if i == 0:
                out[sid] = [float(v)]
            elif sid in out and len(out[sid]) == i:
                out[sid].append(float(v))
        out = {sid: v for sid, v in out.items() if len(v) == i + 1}
    return out or None


def _weights(group: list[RunRecord], key: str, ids: list[str]) -> list[float] | None:
    """Eval loss is a token-weighted mean: each example weighs its scored tokens (None: unweighted,
    for other metrics, and for runs stored before token counts were kept)."""
    if key != "eval_loss":
        return None
    tokens = {s["id"]: s.get("loss_tokens") for s in group[0].samples}
    if any(not isinstance(tokens.get(i), (int, float)) for i in ids):
        return None
    return [float(tokens[i]) for i in ids]


def _by_seed(group: list[RunRecord]) -> list[RunRecord]:
    return sorted(group, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))


def _values(group: list[RunRecord], key: str) -> list[float]:
    return [float(r.metrics[key]) for r in group if isinstance(r.metrics.get(key), (int, float))
            and not isinstance(r.metrics.get(key), bool) and not math.isnan(r.metrics[key])]


def _fixed(group: list[RunRecord], key: str) -> bool:
    """The untrained base, evaluated once and greedily, has no seed noise: a fixed point. Not so its
    times, which the machine's load moves like anyone's."""
    m = metric(key)
    return group[0].kind == "base" and not (m is not None and m.group == "cost")


def _clusters(group: list[RunRecord], ids: list[str]) -> list[str] | None:
    """Each example's group of related items (data.group_field), None when the data named none; an
    example without one is its own group."""
    found = {s["id"]: s.get("group") for s in group[0].samples}
    return None if all(found.get(i) is None for i in ids) else [
        f"g:{found[i]}" if found.get(i) is not None else f"id:{i}" for i in ids]


def _stats_kw(key: str, clusters: list[str] | None) -> dict[str, Any]:
    """What stats needs beyond the rows: a share's bounds (its interval stays in [0, 1]) and clusters."""
    m = metric(key.partition("@")[0])
    return {"bounds": (0.0, 1.0) if m is not None and m.fmt == "pct" else None, "clusters": clusters}


def _sides(key: str, groups: list[list[RunRecord]]):
    """The groups as stats.Side rows over the same examples (per-example metrics) or one value per
    seed (per-run metrics); the weights; how the examples are weighed, in words; and their clusters."""
    groups = [_by_seed(g) for g in groups]
    per = [_per_example(g, key) for g in groups]
    if all(p is not None for p in per):
        ids = [i for i in per[0] if all(i in p for p in per[1:])]
        if ids:
            weights = _weights(groups[0], key, ids)
            sides = [Side([[p[i][s] for i in ids] for s in range(len(g))], [r.seed for r in g], _fixed(g, key))
                     for g, p in zip(groups, per)]
            how = "" if key != "eval_loss" else ("token-weighted" if weights else
                                                 "per-example mean, unweighted: these runs stored no token counts")
            return sides, weights, how, _clusters(groups[0], ids)
    sides = []
    for g in groups:
        kept = [r for r in g if _values([r], key)]
        if not kept:
            return None
        sides.append(Side([[_values([r], key)[0]] for r in kept], [r.seed for r in kept], _fixed(g, key)))
    return sides, None, "", None


def _ppl_of(v: Verdict, loss_a: float) -> Verdict:
    """Perplexity is exp(eval loss): its verdict is the loss verdict carried through exp at A's loss,
    so the two can never disagree."""
    e = math.exp
    return replace(v, metric="eval_ppl", diff=e(loss_a + v.diff) - e(loss_a), lo=e(loss_a + v.lo) - e(loss_a),
                   hi=e(loss_a + v.hi) - e(loss_a))


# Times that include the evaluation: two runs' values compare only when both did the same work.
EVAL_TIMED = ("eval_s",)
TOTAL_TIMED = ("total_s", "cost")


def evaluation_of(group: list[RunRecord]) -> tuple:
    """How a run was evaluated, as what its evaluation time pays for: trained or the untrained base (the
    base runs no drift pass and trains nothing), the caps it generated answers at (none: losses only, as a
    sweep trial with `evaluate: auto`), the training-probe loss, drift, and how many eval examples."""
    r = group[0]
    caps = tuple(sorted({int(k.partition("@")[2]) for k in r.metrics if k.startswith("rouge_l@")}))
    probe = isinstance(r.metrics.get("train_eval_loss"), (int, float)) and math.isfinite(r.metrics["train_eval_loss"])
    drift = r.kind != "base" and "drift_kl" in r.metrics
    return (r.kind == "base", caps, probe, drift, len(r.samples))


def describe_evaluation(group: list[RunRecord]) -> str:
    """A run's evaluation in words ("losses only", "losses and answers at caps 8, 16, drift")."""
    base, caps, probe, drift, _ = evaluation_of(group)
    what = ("losses and answers at cap" + ("s " if len(caps) > 1 else " ") + ", ".join(map(str, caps))) if caps \
        else "losses only"
    what += ", drift" if drift else ""
    return ("the untrained base, evaluated only (" + what + ")") if base else what


def work_mismatch(key: str, ref: list[RunRecord], other: list[RunRecord]) -> str | None:
    """Why `key` cannot compare these two runs (their times include different work), else None: eval time
    only between runs evaluated the same way; total time (and its money) only between trained runs
    evaluated the same way. Train time always compares training with training."""
    base = key.partition("@")[0]
    if base not in EVAL_TIMED + TOTAL_TIMED:
        return None
    ea, eb = evaluation_of(ref), evaluation_of(other)
    # The base's eval time is comparable (the same passes over a model without its adapter); its total is not.
    same = ea[1:] == eb[1:] if base in EVAL_TIMED else (ea == eb and not ea[0])
    if same:
        return None
    return (f"{metric(base).label if metric(base) else base} not compared: {ref[0].name} ({describe_evaluation(ref)}) "
            f"and {other[0].name} ({describe_evaluation(other)}) did different work in it, and "
            + ("train time compares training with training" if not (ea[0] or eb[0]) else
               "the base trains nothing"))


NOT_COMPARED = ("times marked — are not compared: the runs were evaluated differently (losses only, answers "
                "at other caps, or the untrained base), so their times include different work; train time "
                "compares training with training")


def floor_of(key: str, floors: dict[str, float] | None) -> float | None:
    """A metric's min_effect floor: by its full key (rouge_l@50), else by its name (rouge_l)."""
    floors = floors or {}
    return floors.get(key, floors.get(key.partition("@")[0]))


GAP = "generalization_gap"
GAP_NOTE = ("the eval − train gap's interval holds seed noise and both example sets' noise (eval examples, and "
            "the training probe's examples, whose spread is set to the eval examples': per-example probe losses "
            "are not stored)")  # no "taken as": fmt_verdict reads that as a borrowed seed spread


def _gap(groups: list[list[RunRecord]], level: float) -> tuple[float, float, float, float, int, str] | None:
    """The eval − train loss gap of one run (value) or of the second run minus the first (difference),
    with an interval over both sources of noise in both of its terms: seeds (the spread of each seed's
    gap, paired by seed where the runs share seeds, so what a seed moves in both losses cancels), the eval
    examples (another eval set, another eval loss) and the training-probe examples (another probe, another
    train loss). The spread of the per-seed gaps alone holds the seeds only, and reads 100x too sure.
    (value, lo, hi, p, n examples, method); None without per-example eval losses (the per-run path then)."""
    from scipy import stats as scipy_stats

    groups = [[r for r in _by_seed(g) if isinstance(r.metrics.get(GAP), (int, float))
               and math.isfinite(r.metrics[GAP])] for g in groups]
    if any(not g for g in groups):
        return None
    per = [_per_example(g, "eval_loss") for g in groups]
    if any(p is None for p in per):
        return None
    ids = [i for i in per[0] if all(i in p for p in per[1:])]
    n = len(ids)
    if n < 2:
        return None
    w = np.asarray(_weights(groups[0], "eval_loss", ids) or [1.0] * n, dtype=float)
    w = w / w.sum()
    means = [np.array([np.mean(p[i]) for i in ids]) for p in per]
    d = means[-1] - (means[0] if len(means) == 2 else 0.0)
    v_eval = n / (n - 1) * float(np.sum(w**2 * (d - w @ d) ** 2))
    n_probe = int((groups[0][0].config.get("evaluation") or {}).get("train_loss_examples") or n)
    comps = [(v_eval, n - 1), (v_eval * n / max(n_probe, 1), max(n_probe - 1, 1))]
    gaps = [np.array([r.metrics[GAP] for r in g]) for g in groups]
    fixed = [g[0].kind == "base" for g in groups]
    value = float(gaps[-1].mean() - (gaps[0].mean() if len(gaps) == 2 else 0.0))
    seeded = [(x, f) for x, f in zip(gaps, fixed) if not f]
    if len(gaps) == 2 and not any(fixed) and len(gaps[0]) == len(gaps[1]) >= 2 \
            and [r.seed for r in groups[0]] == [r.seed for r in groups[1]]:
        comps.append((float((gaps[1] - gaps[0]).var(ddof=1)) / len(gaps[0]), len(gaps[0]) - 1))  # paired by seed
    elif seeded and all(len(x) >= 2 for x, _ in seeded):
        comps += [(float(x.var(ddof=1)) / len(x), len(x) - 1) for x, _ in seeded]
    elif seeded and any(len(x) >= 2 for x, _ in seeded):  # one seed on one side: the other's seed spread for it
        x = next(x for x, _ in seeded if len(x) >= 2)
        comps.append((float(x.var(ddof=1)) * sum(1 / len(y) for y, _ in seeded), len(x) - 1))
    method = "seeds+examples" if len(comps) > 2 or not seeded else "examples"
    var = sum(c for c, _ in comps)
    if var <= 0:  # nothing measured moved: no interval, not certainty
        return value, math.nan, math.nan, math.nan, n, method
    df = var**2 / sum(c**2 / k for c, k in comps if c > 0)
    half = float(scipy_stats.t.ppf((1 + level) / 2, df)) * math.sqrt(var)
    p = float(2 * scipy_stats.t.sf(abs(value) / math.sqrt(var), df))
    return value, value - half, value + half, p, n, method


def pooled_seed_var(key: str, groups: list[list[RunRecord]], ref: list[RunRecord]) -> tuple[float, float] | None:
    """Seed noise for one-seed runs, borrowed from what the table already knows: the per-seed values of
    `key` of its trained runs with several seeds, on the same model and data as `ref` (variances pooled,
    df = seeds - 1 summed). None when there are none. Assumes seed noise does not depend on the knobs."""
    def same(r: RunRecord) -> tuple:
        return ((r.model or {}).get("fingerprint"), (r.data or {}).get("fingerprint"))

    want = same(ref[0])
    if None in want:
        return None
    num = df = 0.0
    for g in groups:
        vals = _values(g, key)
        if g[0].kind != "base" and len(vals) >= 2 and same(g[0]) == want:
            num, df = num + float(np.var(vals, ddof=1)) * (len(vals) - 1), df + len(vals) - 1
    return (num / df, df) if df else None


def verdict_of(key: str, ref: list[RunRecord], other: list[RunRecord], level: float,
               floors: dict[str, float] | None = None, seed_var: tuple[float, float] | None = None) -> Verdict | None:
    """`other` against `ref` on one metric, every source of noise in the interval (stats.compare_runs).
    None when either run has no value of the metric. `seed_var`: for one-seed runs (pooled_seed_var)."""
    if key == "eval_ppl":
        v = verdict_of("eval_loss", ref, other, level, floors, seed_var)
        cell = cell_estimate("eval_loss", ref, level)
        if v is None or cell is None:
            return None
        p = _ppl_of(v, cell.mean)
        return p if floor_of(key, floors) is None else replace(p, label=verdict_label(p.lo, p.hi, floor_of(key, floors)))
    if key == GAP and (g := _gap([ref, other], level)) is not None:
        diff, lo, hi, p, n, method = g
        note = GAP_NOTE + ("" if method == "seeds+examples" else "; seed noise unmeasured (one seed)")
        return Verdict(key, diff, lo, hi, n, verdict_label(lo, hi, floor_of(key, floors)), method, note, p)
    found = _sides(key, [ref, other])
    if found is None:
        return None
    if (why := work_mismatch(key, ref, other)) is not None:
        return Verdict(key, math.nan, math.nan, math.nan, 0, "untested", "", why)
    (a, b), weights, how, clusters = found
    v = compare_runs(key, a, b, weights, level=level, floor=floor_of(key, floors), seed_var=seed_var,
                     **_stats_kw(key, clusters))
    if how and "unweighted" in how:
        return replace(v, note="; ".join(x for x in (v.note, how) if x))
    return v


def cell_estimate(key: str, group: list[RunRecord], level: float) -> Estimate | None:
    """A run's value of `key` with the interval of stats.estimate (seeds and eval examples). Eval
    perplexity is exp of the eval-loss cell, interval included, so the two rows always agree."""
    if key == "eval_ppl":
        e = cell_estimate("eval_loss", group, level)
        return None if e is None else Estimate(math.exp(e.mean), math.exp(e.lo) if not math.isnan(e.lo) else math.nan,
                                               math.exp(e.hi) if not math.isnan(e.hi) else math.nan, e.n)
    vals = _values(group, key)
    if not vals:
        return None
    if key == GAP and (g := _gap([group], level)) is not None:
        return Estimate(g[0], g[1], g[2], len(vals))
    found = _sides(key, [group])
    if found is None:
        return mean_ci(vals, level)
    (side,), weights, _, clusters = found
    kw = _stats_kw(key, clusters)
    e = estimate(side, weights, level, **kw)
    # The stored value is the one the run reported (token-weighted over every example it scored); the
    # interval is centred on it so a cell never shows another number than `loralab show`.
    lo, hi, mid = e.lo - e.mean + float(np.mean(vals)), e.hi - e.mean + float(np.mean(vals)), float(np.mean(vals))
    if kw["bounds"] is not None:  # a share's interval stays a share's
        lo, hi = max(lo, kw["bounds"][0]), min(hi, kw["bounds"][1])
    return Estimate(mid, lo, hi, e.n)


def verdict_pairs(groups: list[list[RunRecord]]) -> list[tuple[int, int]]:
    """Which runs each verdict column compares, (reference, other): every trained run against the
    untrained base when it is there (did fine-tuning help at all?), then every other trained run against
    the first one."""
    base = next((i for i, g in enumerate(groups) if g[0].kind == "base"), None)
    trained = [i for i, g in enumerate(groups) if g[0].kind != "base"]
    pairs = [(base, i) for i in trained] if base is not None else []
    return pairs + [(trained[0], i) for i in trained[1:]]


def pair_levels(groups: list[list[RunRecord]], pairs: list[tuple[int, int]], level: float, sequential=None) -> list[float]:
    """Each verdict column's confidence level: the file's, or, for runs whose seeds `repeats: auto`
    planned, the level of the look the pair stopped at (execute.plan), so stopping when the data look
    settled calls no more false differences than fixed seeds would. `sequential`: the plan (default:
    the one stored with the first trained run)."""
    from loralab.config.schema import SequentialSpec
    from loralab.metrics.sequential import pair_level

    if sequential is None:
        sequential = next(((r.config.get("evaluation") or {}).get("sequential") for g in groups for r in g[:1]
                           if r.kind != "base"), None)
    if isinstance(sequential, dict):
        sequential = SequentialSpec.model_validate(sequential)
    return [pair_level(sequential, tuple(None if groups[x][0].kind == "base" else len(groups[x]) for x in (i, j)), level)
            for i, j in pairs]


def compare(groups: list[list[RunRecord]] | list[RunRecord], all_knobs: bool = False, level: float = 0.95,
            floors: dict[str, float] | None = None, sequential=None) -> Comparison:
    """Build the comparison of runs (each a list of its seeds' records; a bare record is one seed).
    `floors`: min_effect per metric (default: the first trained run's `evaluation.min_effect`);
    `sequential`: the seed plan of `repeats: auto` (pair_levels)."""
    groups = [g if isinstance(g, list) else [g] for g in groups]
    c = Comparison(runs=[g[0].name for g in groups], groups=groups)
    firsts = [g[0] for g in groups]
    per_run = [knobs(r) for r in firsts]
    trained = [(i, k) for i, (r, k) in enumerate(zip(firsts, per_run)) if r.kind != "base"]
    if floors is None:
        floors = next(((r.config.get("evaluation") or {}).get("min_effect") or {} for r in firsts if r.kind != "base"), {})
    c.floors = dict(floors)
    keys: list[str] = []
    for _, k in trained:
        keys += [x for x in k if x not in keys and x != "train.seed"]
    for key in keys:
        values = [k.get(key) for _, k in trained]
        differ = any(_norm(v) != _norm(values[0]) for v in values)
        if all_knobs or differ or len(trained) < 2:
            c.knobs[key] = [k.get(key) if r.kind != "base" else None for r, k in zip(firsts, per_run)]
    seeds = [[r.seed for r in g] for g in groups]
    if any(len(s) > 1 for s in seeds) or all_knobs:
        c.knobs["seeds"] = [None if g[0].kind == "base" else s for g, s in zip(groups, seeds)]
    c.pairs = verdict_pairs(groups)
    c.verdict_columns = [f"{c.runs[j]} vs {c.runs[i]}" for i, j in c.pairs]
    c.levels = pair_levels(groups, c.pairs, level, sequential)
    cost = next((r.config.get("cost") for r in firsts if r.config.get("cost")), None)
    c.currency = cost.get("currency") if cost else None

    def rows_for(spec: list[tuple[str, str, str]], cap: int | None = None) -> list[Row]:
        out = []
        for key, label, fmt in spec:
            k = f"{key}@{cap}" if cap is not None else key
            cells = [cell_estimate(k, g, level) for g in groups]
            if all(x is None for x in cells):
                continue
            verdicts = [verdict_of(k, groups[i], groups[j], lv, floors,
                                   pooled_seed_var("eval_loss" if k == "eval_ppl" else k, groups, groups[j]))
                        for (i, j), lv in zip(c.pairs, c.levels)]
            out.append(Row(k, f"{label} @{cap}" if cap is not None else label, fmt, cells, verdicts))
        return out

    caps = caps_of([r for g in groups for r in g])
    quality = rows_for(LOSS_ROWS) + [r for cap in caps for r in rows_for(QUALITY_CAP, cap)]
    verbosity = [r for cap in caps for r in rows_for(VERBOSITY_CAP, cap)]
    for title, rows in (("quality", quality), ("verbosity", verbosity), ("drift", rows_for(DRIFT_ROWS)),
                        ("stability", rows_for(STABILITY_ROWS)), ("cost", rows_for(COST_ROWS))):
        if rows:
            c.sections.append((title, rows))
    rows = [r for _, rs in c.sections for r in rs]
    for col in range(len(c.pairs)):  # each verdict column is one family of questions
        for r, v in zip(rows, adjust_for_multiplicity([r.verdicts[col] for r in rows], c.levels[col])):
            r.verdicts[col] = v
    return c


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def fmt_value(v: Any, fmt: str = "", currency: str | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, list):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if fmt == "pct":
        return f"{100 * v:.0f}%"
    if fmt == "int":
        return f"{int(round(v)):,}"
    if fmt == "money":
        return f"{v:.4f} {currency or ''}".strip()
    if fmt.startswith("f") and isinstance(v, (int, float)):
        return f"{v:.{int(fmt[1:])}f}"
    if isinstance(v, float):  # a knob sampled from a range (0.00179372): three figures read as well
        return f"{v:,.0f}" if v.is_integer() and abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def bounded(lo: float, hi: float, fmt: str, diff: bool = False) -> tuple[float, float]:
    """An interval as far as the quantity can go: a share lies in [0, 1], a difference of shares in
    [-1, 1] (an interval past them says nothing more than the bound)."""
    if fmt != "pct":
        return lo, hi
    floor = -1.0 if diff else 0.0
    return max(lo, floor), min(hi, 1.0)


def fmt_estimate(e: Estimate | None, fmt: str, currency: str | None = None) -> str:
    """'mean ± half' for a symmetric interval; 'mean [lo, hi]' when it is not (perplexity, exp of the
    loss interval; a share near 0% or 100%), so no cell implies values the interval does not hold."""
    if e is None:
        return "—"
    text = fmt_value(e.mean, fmt, currency)
    if not math.isnan(e.hi):
        lo, hi = bounded(e.lo, e.hi, fmt)
        if abs((hi - e.mean) - (e.mean - lo)) > 0.01 * (hi - lo):
            return f"{text} [{fmt_value(lo, fmt, currency)}, {fmt_value(hi, fmt, currency)}]"
        half = (hi - lo) / 2
        text += " ± " + (fmt_value(half, fmt) if fmt not in ("int", "money") else f"{half:.3g}")
    return text


def fmt_verdict(v: Verdict | None, fmt: str) -> str:
    if v is None:
        return ""
    scale = 100 if fmt == "pct" else 1
    unit = " pp" if fmt == "pct" else ""
    spec = {"int": "+,.0f", "f0": "+.0f", "f1": "+.1f"}.get(fmt, "+.3f")
    d, (lo, hi) = v.diff * scale, (x * scale for x in bounded(v.lo, v.hi, fmt, diff=True))
    if v.label == "untested":
        why = "untested (1 seed)" if v.method == "examples" else "(no CI)"
        return "—" if math.isnan(d) else f"{d:{spec}}{unit} {why}"
    mark = {"examples": " (1 seed)"}.get(v.method, " (seed noise assumed)" if "taken as" in v.note else "")
    mark += "*" if MULTIPLE in v.note else ""
    return f"{d:{spec}}{unit} [{lo:{spec}}, {hi:{spec}}] {v.label}{mark}"


def legend(c: Comparison) -> list[str]:
    """What the table's numbers are, in sentences, under it: the rule, then what an interval leaves out."""
    out = [f"Cells: mean over seeds ± half its {_level(c)} interval, or [low, high] where the interval is not "
           "symmetric (perplexity, shares near 0% or 100%); it holds seed-to-seed and eval-example "
           "noise; eval loss is token-weighted, as stored. Verdicts: the difference, its interval (paired by eval "
           "example, and by seed where both runs used the same seeds) and `higher`/`lower` only when it excludes 0."]
    nominal = float(_level(c).rstrip("%")) / 100
    if any(abs(lv - nominal) > 1e-9 for lv in c.levels):
        out.append("Seeds were planned as the data came in (`repeats: auto`): each verdict column's interval is at the "
                   "level of the look it stopped at (" + ", ".join(f"{col} {lv:.1%}" for col, lv in
                                                                zip(c.verdict_columns, c.levels)) +
                   "), so stopping early calls no more false differences than fixed seeds (docs/statistics.md).")
    if c.floors:
        out.append("`negligible`: the interval sits inside the smallest difference that matters (evaluation.min_effect: "
                   + ", ".join(f"{k} {v:g}" for k, v in c.floors.items()) + ").")
    return out + [n[0].upper() + n[1:] + "." for n in c.notes]


def _level(c: Comparison) -> str:
    ev = next(((g[0].config.get("evaluation") or {}) for g in c.groups if g[0].kind != "base"), {})
    return f"{ev.get('confidence', 0.95):.0%}"


def render(c: Comparison, title: str = "Main differences"):
    """A rich Table: knobs first, then outcomes by section, then verdict columns."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("", style="bold")
    for name, status in zip(c.runs, c.statuses):
        t.add_column(escape(name if status == Status.FINISHED else f"{name} ({status})"), justify="right")
    for col in c.verdict_columns:
        t.add_column(escape(col), justify="right")
    pad = [""] * len(c.verdict_columns)
    for key, vals in c.knobs.items():
        t.add_row(escape(key), *[escape(fmt_value(v)) for v in vals], *pad)
    t.caption = escape(" ".join(legend(c)))
    t.caption_justify = "left"
    for title_, rows in c.sections:
        t.add_section()
        t.add_row(f"[italic]{title_}[/italic]", *[""] * (len(c.runs) + len(pad)))
        for r in rows:
            t.add_row(r.label, *[fmt_estimate(e, r.fmt, c.currency) for e in r.cells],
                      *[fmt_verdict(v, r.fmt) for v in r.verdicts])
    return t


# Everything that ends a line for a Markdown renderer (so ends a table row): \r too, not only \n.
LINE_BREAKS = re.compile("\r\n|[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _md_cell(text: str) -> str:
    """Markdown table cells must not break the table: escape pipes, fold line breaks."""
    return LINE_BREAKS.sub(" ", text.replace("\\", "\\\\").replace("|", "\\|"))


def to_rows(c: Comparison) -> tuple[list[str], list[dict], str]:
    """The same table as `render`, as plain text: the header, the rows (each {"cells": [...]}, or
    {"section": title}) and the legend (what Markdown and the dashboard draw)."""
    head = [""] + [n if st == Status.FINISHED else f"{n} ({st})" for n, st in zip(c.runs, c.statuses)] + c.verdict_columns
    pad = [""] * len(c.verdict_columns)
    rows: list[dict] = [{"cells": [key, *[fmt_value(v) for v in vals], *pad]} for key, vals in c.knobs.items()]
    for title, section in c.sections:
        rows.append({"section": title})
        rows += [{"cells": [r.label, *[fmt_estimate(e, r.fmt, c.currency) for e in r.cells],
                            *[fmt_verdict(v, r.fmt) for v in r.verdicts]]} for r in section]
    return head, rows, " ".join(legend(c))


def to_markdown(c: Comparison) -> str:
    """The same table as `render`, as GitHub Markdown (for reports and BENCHMARKS.md)."""
    head, rows, text = to_rows(c)
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |",
             "| --- |" + " ---: |" * (len(head) - 1)]
    for row in rows:
        if "section" in row:
            lines.append("| **" + row["section"] + "** |" + " |" * (len(head) - 1))
        else:
            lines.append("| " + " | ".join(_md_cell(x) for x in row["cells"]) + " |")
    return "\n".join(lines) + "\n\n" + text + "\n"
