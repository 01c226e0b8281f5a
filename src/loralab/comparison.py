"""The "Main differences" table: the knobs that differ between runs, then the outcomes side by side,
grouped (quality, verbosity, drift, stability, cost), each as a mean with its confidence interval
across seeds, and a verdict for each run against the first: the difference, its CI, and
`within noise` when the CI contains zero.

Metrics measured per eval example (quality, verbosity, eval loss) get a paired bootstrap over the
examples (each example's value averaged over seeds); per-run metrics (drift, stability, cost) get a
Welch interval across seeds when both runs have at least two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .stats import Estimate, Verdict, compare_paired, mean_ci, welch_diff
from .store import RunRecord

KNOB_SECTIONS = ("lora", "train", "generate")

# (metric key, label, format). Per-cap keys get "@cap" appended.
LOSS_ROWS = [("eval_loss", "eval loss", "f4"), ("eval_ppl", "eval perplexity", "f2"),
             ("train_eval_loss", "loss on training examples", "f4"),
             ("generalization_gap", "eval − train loss (overfitting)", "f4")]
QUALITY_CAP = [("rouge_l", "ROUGE-L", "f3"), ("chrf", "chrF", "f3"), ("token_f1", "token F1", "f3"),
               ("exact_match", "exact match", "pct")]
VERBOSITY_CAP = [("mean_tokens", "mean tokens", "f1"), ("median_tokens", "median tokens", "f1"),
                 ("p90_tokens", "p90 tokens", "f1"), ("length_ratio", "length / reference", "f2"),
                 ("cap_hit_rate", "hit the cap", "pct"), ("stop_rate", "stopped on its own", "pct"),
                 ("repeated_3gram", "repeated 3-grams", "pct"), ("distinct_2", "distinct 2-grams", "pct")]
DRIFT_ROWS = [("drift_kl", "KL from base (nats/token)", "f4"), ("drift_agreement", "same answer as base", "pct")]
STABILITY_ROWS = [("loss_spikes", "loss spikes", "f1"), ("grad_norm_median", "grad norm median", "f3"),
                  ("grad_norm_max", "grad norm max", "f3"), ("steps_to_90pct_drop", "steps to 90% of loss drop", "f1"),
                  ("loss_final", "final train loss", "f4"), ("final_minus_best", "final − best train loss", "f4"),
                  ("diverged_step", "diverged at step", "f0")]
COST_ROWS = [("train_s", "train time (s)", "f1"), ("eval_s", "eval time (s)", "f1"), ("total_s", "total time (s)", "f1"),
             ("tokens_per_s", "train tokens/s", "f1"), ("train_tokens", "train tokens", "int"),
             ("peak_mem_mb", "peak memory (MB)", "f0"), ("trainable_params", "trainable params", "int"),
             ("adapter_bytes", "adapter size (bytes)", "int"), ("cost", "cost", "money")]

# Per-example keys behind per-cap metrics (samples[i]["outputs"][cap]["metrics"][key]).
PER_EXAMPLE = {"rouge_l": "rouge_l", "chrf": "chrf", "token_f1": "token_f1", "exact_match": "exact_match",
               "mean_tokens": "tokens", "length_ratio": "length_ratio", "cap_hit_rate": "hit_cap",
               "stop_rate": "stopped", "repeated_3gram": "repeated_3gram", "distinct_2": "distinct_2"}


def knobs(rec: RunRecord) -> dict[str, Any]:
    """A run's settings as flat `section.key` pairs (base has none: it is the untrained model)."""
    out: dict[str, Any] = {}
    for section in KNOB_SECTIONS:
        for k, v in (rec.config.get(section) or {}).items():
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
    currency: str | None = None

    @property
    def statuses(self) -> list[str]:
        return [_status(g) for g in self.groups]

    def row(self, key: str) -> Row:
        for _, rows in self.sections:
            for r in rows:
                if r.key == key:
                    return r
        raise KeyError(key)

    def to_json(self) -> dict[str, Any]:
        def est(e: Estimate | None):
            return None if e is None else {"mean": _num(e.mean), "lo": _num(e.lo), "hi": _num(e.hi), "n": e.n}

        def ver(v: Verdict | None):
            return None if v is None else {"diff": _num(v.diff), "lo": _num(v.lo), "hi": _num(v.hi), "n": v.n,
                                           "verdict": v.label}

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


def _per_example(group: list[RunRecord], key: str) -> dict[str, float] | None:
    """Each eval example's value of `key`, averaged over the group's seeds (None when not stored)."""
    if "@" in key:
        base, cap = key.split("@")
        field_ = PER_EXAMPLE.get(base)
        if field_ is None:
            return None
        get = lambda s: ((s.get("outputs") or {}).get(cap) or {}).get("metrics", {}).get(field_)  # noqa: E731
    elif key == "eval_loss":
        get = lambda s: s.get("loss")  # noqa: E731
    else:
        return None
    sums: dict[str, list[float]] = {}
    for r in group:
        for s in r.samples:
            v = get(s)
            if v is not None:
                sums.setdefault(s["id"], []).append(float(v))
    if not sums:
        return None
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _verdict(key: str, ref: list[RunRecord], other: list[RunRecord], level: float, resamples: int) -> Verdict | None:
    a, b = _per_example(ref, key), _per_example(other, key)
    if a is not None and b is not None:
        ids = [i for i in a if i in b]
        if ids:
            return compare_paired(key, [a[i] for i in ids], [b[i] for i in ids], n_resamples=resamples, level=level)
    va = [r.metrics[key] for r in ref if isinstance(r.metrics.get(key), (int, float))]
    vb = [r.metrics[key] for r in other if isinstance(r.metrics.get(key), (int, float))]
    if len(va) >= 2 and len(vb) >= 2:
        return welch_diff(key, va, vb, level=level)
    return None


def compare(groups: list[list[RunRecord]] | list[RunRecord], all_knobs: bool = False, level: float = 0.95,
            resamples: int = 5000) -> Comparison:
    """Build the comparison of runs (each a list of its seeds' records; a bare record is one seed)."""
    groups = [g if isinstance(g, list) else [g] for g in groups]
    c = Comparison(runs=[g[0].name for g in groups], groups=groups)
    firsts = [g[0] for g in groups]
    per_run = [knobs(r) for r in firsts]
    trained = [(i, k) for i, (r, k) in enumerate(zip(firsts, per_run)) if r.kind != "base"]
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
    ref_index = trained[0][0] if trained else None
    others = [i for i, _ in trained[1:]]
    c.verdict_columns = [f"{c.runs[i]} vs {c.runs[ref_index]}" for i in others]
    cost = next((r.config.get("cost") for r in firsts if r.config.get("cost")), None)
    c.currency = cost.get("currency") if cost else None

    def rows_for(spec: list[tuple[str, str, str]], cap: int | None = None) -> list[Row]:
        out = []
        for key, label, fmt in spec:
            k = f"{key}@{cap}" if cap is not None else key
            cells = []
            for g in groups:
                vals = [r.metrics[k] for r in g if isinstance(r.metrics.get(k), (int, float)) and not isinstance(r.metrics.get(k), bool)]
                cells.append(mean_ci(vals, level) if vals else None)
            if all(x is None for x in cells):
                continue
            verdicts = [_verdict(k, groups[ref_index], groups[i], level, resamples) for i in others]
            out.append(Row(k, f"{label} @{cap}" if cap is not None else label, fmt, cells, verdicts))
        return out

    caps = caps_of([r for g in groups for r in g])
    quality = rows_for(LOSS_ROWS) + [r for cap in caps for r in rows_for(QUALITY_CAP, cap)]
    verbosity = [r for cap in caps for r in rows_for(VERBOSITY_CAP, cap)]
    for title, rows in (("quality", quality), ("verbosity", verbosity), ("drift", rows_for(DRIFT_ROWS)),
                        ("stability", rows_for(STABILITY_ROWS)), ("cost", rows_for(COST_ROWS))):
        if rows:
            c.sections.append((title, rows))
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
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_estimate(e: Estimate | None, fmt: str, currency: str | None = None) -> str:
    if e is None:
        return "—"
    text = fmt_value(e.mean, fmt, currency)
    if e.n > 1 and not math.isnan(e.hi):
        half = (e.hi - e.lo) / 2
        text += " ± " + (fmt_value(half, fmt) if fmt not in ("int", "money") else f"{half:.3g}")
    return text


def fmt_verdict(v: Verdict | None, fmt: str) -> str:
    if v is None:
        return ""
    scale = 100 if fmt == "pct" else 1
    unit = " pp" if fmt == "pct" else ""
    spec = {"int": "+,.0f", "f0": "+.0f", "f1": "+.1f"}.get(fmt, "+.3f")
    d, lo, hi = v.diff * scale, v.lo * scale, v.hi * scale
    return f"{d:{spec}}{unit} [{lo:{spec}}, {hi:{spec}}] {v.label}"


def render(c: Comparison, title: str = "Main differences"):
    """A rich Table: knobs first, then outcomes by section, then verdict columns."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("", style="bold")
    for name, status in zip(c.runs, c.statuses):
        t.add_column(escape(name if status == "finished" else f"{name} ({status})"), justify="right")
    for col in c.verdict_columns:
        t.add_column(escape(col), justify="right")
    pad = [""] * len(c.verdict_columns)
    for key, vals in c.knobs.items():
        t.add_row(escape(key), *[escape(fmt_value(v)) for v in vals], *pad)
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


def to_markdown(c: Comparison) -> str:
    """The same table as `render`, as GitHub Markdown (for reports and BENCHMARKS.md)."""
    head = [""] + [n if st == "finished" else f"{n} ({st})" for n, st in zip(c.runs, c.statuses)] + c.verdict_columns
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |",
             "| --- |" + " ---: |" * (len(head) - 1)]
    pad = [""] * len(c.verdict_columns)
    for key, vals in c.knobs.items():
        lines.append("| " + " | ".join(_md_cell(x) for x in [key, *[fmt_value(v) for v in vals], *pad]) + " |")
    for title, rows in c.sections:
        lines.append("| **" + title + "** |" + " |" * (len(head) - 1))
        for r in rows:
            cells = [r.label, *[fmt_estimate(e, r.fmt, c.currency) for e in r.cells],
                     *[fmt_verdict(v, r.fmt) for v in r.verdicts]]
            lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"
