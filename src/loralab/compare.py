"""The "Main Differences" table: the knobs that differ between runs, then the outcomes side by side."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .store import RunRecord

KNOB_SECTIONS = ("lora", "train", "generate")
# Outcomes per cap, in the order they are shown: (metric key, label, format).
CAP_OUTCOMES = [
    ("rouge_l", "ROUGE-L", "f3"),
    ("exact_match", "exact match", "pct"),
    ("mean_tokens", "mean tokens", "f1"),
    ("cap_hit_rate", "hit the cap", "pct"),
    ("stop_rate", "stopped on its own", "pct"),
]
RUN_OUTCOMES = [
    ("eval_loss", "eval loss", "f4"),
    ("train_loss_final", "final train loss", "f4"),
    ("train_s", "train time (s)", "f1"),
    ("tokens_per_s", "train tokens/s", "f1"),
    ("peak_mem_mb", "peak memory (MB)", "f0"),
    ("trainable_params", "trainable params", "int"),
    ("eval_s", "eval time (s)", "f1"),
]


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
class Comparison:
    runs: list[str]
    ids: list[str]
    statuses: list[str]
    knobs: dict[str, list[Any]] = field(default_factory=dict)
    outcomes: list[tuple[str, str, str, list[Any]]] = field(default_factory=list)  # key, label, fmt, values

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": [{"name": n, "id": i, "status": s} for n, i, s in zip(self.runs, self.ids, self.statuses)],
            "knobs": self.knobs,
            "outcomes": {key: dict(zip(self.runs, _json_safe(vals))) for key, _, _, vals in self.outcomes},
        }


def _json_safe(vals: list[Any]) -> list[Any]:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in vals]


def compare(records: list[RunRecord], all_knobs: bool = False) -> Comparison:
    """Build the comparison; knobs shown are those that differ among the trained runs."""
    c = Comparison(runs=[r.name for r in records], ids=[r.id for r in records], statuses=[r.status for r in records])
    per_run = [knobs(r) for r in records]
    trained = [k for r, k in zip(records, per_run) if r.kind != "base"]
    keys: list[str] = []
    for k in trained:
        keys += [x for x in k if x not in keys]
    for key in keys:
        values = [k.get(key) for k in trained]
        differ = any(_norm(v) != _norm(values[0]) for v in values)
        if all_knobs or differ or len(trained) < 2:
            c.knobs[key] = [k.get(key) if r.kind != "base" else None for r, k in zip(records, per_run)]
    c.outcomes.append(("eval_loss", "eval loss", "f4", [r.metrics.get("eval_loss") for r in records]))
    for cap in caps_of(records):
        for key, label, fmt in CAP_OUTCOMES:
            c.outcomes.append((f"{key}@{cap}", f"{label} @{cap}", fmt, [r.metrics.get(f"{key}@{cap}") for r in records]))
    for key, label, fmt in RUN_OUTCOMES[1:]:
        c.outcomes.append((key, label, fmt, [r.metrics.get(key) for r in records]))
    return c


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def fmt_value(v: Any, fmt: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, list):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if fmt == "pct":
        return f"{100 * v:.0f}%"
    if fmt == "int":
        return f"{int(v):,}"
    if fmt.startswith("f") and isinstance(v, (int, float)):
        return f"{v:.{int(fmt[1:])}f}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render(c: Comparison, title: str = "Main differences"):
    """A rich Table: knobs first, then outcomes."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("", style="bold")
    for name, status in zip(c.runs, c.statuses):
        t.add_column(name if status == "finished" else f"{name} ({status})", justify="right")
    for key, vals in c.knobs.items():
        t.add_row(key, *[fmt_value(v) for v in vals])
    if c.knobs:
        t.add_section()
    for _, label, fmt, vals in c.outcomes:
        if any(v is not None for v in vals):
            t.add_row(label, *[fmt_value(v, fmt) for v in vals])
    return t
