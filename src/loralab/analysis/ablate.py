"""Ablations: which knob did it?

When two runs differ in several knobs, their difference cannot be credited to any one of them. An
ablation plan trains the runs that can: one knob at a time from A toward B (`ofat`), or a two-level
fractional factorial over the differing knobs (`factorial`). The plan is an ordinary experiment file,
so `loralab run` executes it, and runs already trained (A and B themselves) are reused by their ids.

Generation settings (`generate.*`) are never trained: every cap comes from one greedy generation at
the largest, so a max_new_tokens difference is answered by the stored metrics at each cap.

This module also estimates each knob's own effect, with its interval, from whatever runs exist: pairs
of runs that differ in exactly one training knob, the main effects of a two-level orthogonal design,
and the same answers measured at a smaller and a larger cap.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from loralab.analysis.comparison import KNOB_SECTIONS, _by_seed, flat_knobs, _norm, _per_example, verdict_of, floor_of, knobs, pair_levels
from loralab.errors import Problem, SpecError
from loralab.config.loading import parse_experiment
from loralab.config.schema import Experiment, RunSpec, config_hash
from loralab.metrics.stats import Side, Verdict, adjust_for_multiplicity, compare_runs, mean_ci
from loralab.workspace.status import Status
from loralab.workspace.store import RunRecord

DESIGNS = ("ofat", "factorial")
HOLDS = ("alpha/r", "alpha")  # what stays fixed when lora.r moves: the update scale (default) or alpha
SCALE = "lora.alpha/r"  # LoRA's update scale, a knob of its own when alpha/r is held
TRAINED_SECTIONS = ("lora", "train")  # what changes the trained adapter; generate.* only changes evaluation
MAX_NAME = 64  # spec.RUN_NAME's limit
MAX_EXPERIMENT_NAME = 128  # spec.Experiment.name's limit
# Short names for run names such as "A+lr"; other knobs use their key ("A+dropout").
SHORT = {"train.learning_rate": "lr", "train.gradient_accumulation": "grad_accum", "train.max_seq_len": "seq_len",
         "train.weight_decay": "wd", "lora.target_modules": "targets", SCALE: "scale"}


# ---------------------------------------------------------------------------------------------
# Knobs of a run


def run_knobs(run: RunSpec) -> dict[str, Any]:
    """A resolved run's settings as flat `section.key` pairs, as comparison.knobs gives for a stored run."""
    return flat_knobs({s: getattr(run, s).model_dump() for s in KNOB_SECTIONS})


def trained_knobs(flat: dict[str, Any], hold: str = "alpha/r") -> dict[str, Any]:
    """The knobs that shape the adapter (lora.*, train.* but the seed: seeds are repeats, not a knob).

    `hold="alpha/r"` (the default) reads LoRA's update scale alpha/r as the knob in place of alpha, so
    r moving with alpha at a constant ratio is one knob (capacity), and alpha at a fixed r is the scale:
    the effect of r is then not also the effect of a smaller update. `hold="alpha"`: the knobs as set."""
    out = {}
    for k, v in flat.items():
        if k.split(".")[0] not in TRAINED_SECTIONS or k == "train.seed":
            continue
        if k == "lora.alpha" and hold == "alpha/r" and _num(v) and _num(flat.get("lora.r")):
            out[SCALE] = round(float(v) / float(flat["lora.r"]), 12)
        else:
            out[k] = v
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def moved_knobs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The trained knobs that differ between two runs' flat settings, alpha read as alpha/r; r moved at a
    fixed alpha counts as the one knob the user moved (r), its change of scale said by scale_note."""
    d = differing(trained_knobs(a), trained_knobs(b))
    if SCALE in d and "lora.r" in d and _norm(a.get("lora.alpha")) == _norm(b.get("lora.alpha")):
        d.remove(SCALE)
    return d


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (lists compared as values), in a's order then b's."""
    keys = list(a) + [k for k in b if k not in a]
    return [k for k in keys if _norm(a.get(k)) != _norm(b.get(k))]


def short_name(knob: str) -> str:
    return SHORT.get(knob, knob.split(".", 1)[-1])


# ---------------------------------------------------------------------------------------------
# Designs: which knobs sit at B's value in each run


def ofat_rows(n: int) -> list[tuple[int, ...]]:
    """A, then each knob alone moved to B's value, then B (1 = at B's value). One knob needs no
    middle run: A and B already differ in it alone."""
    rows = [(0,) * n]
    if n > 1:
        rows += [tuple(int(i == j) for i in range(n)) for j in range(n)]
    return rows + [(1,) * n]


def factorial_rows(n: int) -> list[tuple[int, ...]]:
    """A two-level design whose main effects are not aliased with two-knob interactions (resolution IV
    or better), in the fewest runs of this construction: 2^m runs for up to 2^(m-1) knobs.

    The first m knobs are a full factorial; each further knob is the product of an odd number (3, 5, …)
    of those. All columns being odd products, the product of two or three columns is never constant, so
    no defining word is shorter than four. A (all at A's value) and B (all at B's) are both rows.
    """
    if n < 1:
        raise ValueError("a design needs at least one knob")
    m = max(1, math.ceil(math.log2(n)) + 1) if n > 2 else n
    words = [c for size in range(3, m + 1, 2) for c in itertools.combinations(range(m), size)]
    columns = [(i,) for i in range(m)] + words
    rows = []
    for levels in itertools.product((0, 1), repeat=m):
        signs = [1 if x else -1 for x in levels]
        rows.append(tuple(int(math.prod(signs[i] for i in col) > 0) for col in columns[:n]))
    return sorted(rows, key=lambda r: (sum(r), [-x for x in r]))


def resolution(rows: list[tuple[int, ...]]) -> int | None:
    """The length of the shortest defining word of a two-level design (None: a full factorial, no word).

    A word is a set of columns whose product is the same in every row: those columns' effects cannot be
    told apart. Resolution III aliases main effects with two-knob interactions; IV and up does not."""
    if not rows:
        return None
    n = len(rows[0])
    signs = [[1 if x else -1 for x in r] for r in rows]
    for size in range(1, n + 1):
        for cols in itertools.combinations(range(n), size):
            if len({math.prod(s[c] for c in cols) for s in signs}) == 1:
                return size
    return None


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedRun:
    name: str
    at_b: list[str]  # knobs moved to B's value
    spec: RunSpec


@dataclass
class AblationPlan:
    """An ablation of A toward B: the runs to train and the experiment file that trains them."""

    design: str
    a: str
    b: str
    knobs: list[str]  # differing trained knobs, in file order
    eval_only: list[str]  # differing generate.* knobs: answered by the stored caps, nothing to train
    runs: list[PlannedRun]
    experiment: Experiment
    seeds: list[int]
    resolution: int | None = None
    path: Path | None = None
    text: str = ""
    result: Any = None  # execute.loop.ExperimentResult once trained
    hold: str = "alpha/r"  # what stayed fixed when r moved

    @property
    def new_runs(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.name not in (self.a, self.b)]

    def summary(self) -> list[str]:
        """What the plan is and costs, for the CLI and the report."""
        n, s = len(self.new_runs), len(self.seeds)
        what = ("one knob at a time from {a} toward {b}" if self.design == "ofat" else
                "a two-level " + ("full factorial" if self.resolution is None else f"fractional factorial (resolution "
                                  f"{roman(self.resolution)})") + " between {a} and {b}").format(a=self.a, b=self.b)
        lines = [f"Ablation of {self.a} vs {self.b}: {what}; {len(self.knobs)} trained knob(s) differ: "
                 f"{', '.join(self.knobs) or 'none'}."]
        lines.append(f"{n} new run(s) x {s} seed(s) = {n * s} training run(s); {self.a} and {self.b} are reused "
                     "when already in the workspace.")
        lines.append(hold_sentence(self.hold, "lora.r" in self.knobs))
        if self.eval_only:
            lines.append(f"{', '.join(self.eval_only)}: nothing to train, every cap comes from one generation; "
                         "the report compares the stored answers at each cap.")
        return lines


def hold_sentence(hold: str, r_moves: bool = True) -> str:
    """Which of alpha and alpha/r stays fixed when r moves, in words (the plan and the report say it)."""
    if hold == "alpha":
        return ("Where lora.r moves, alpha stays as set (`--hold alpha`), so the update scale alpha/r moves with it: "
                "r's effect includes a change of scale." if r_moves else "alpha held as set (`--hold alpha`).")
    return ("Where lora.r moves, alpha moves with it so alpha/r stays (r's effect is capacity, not update scale); "
            "lora.alpha/r is a knob of its own. `--hold alpha` keeps alpha fixed instead." if r_moves else
            "alpha is read as the update scale alpha/r (lora.alpha/r).")


def roman(n: int) -> str:
    return {3: "III", 4: "IV", 5: "V", 6: "VI"}.get(n, str(n))


def experiment_name(exp_name: str, a: str, b: str, design: str, hold: str = "alpha/r") -> str:
    """The ablation experiment's name; the report finds a file's ablations by it. Holding alpha trains
    other middle runs under the same names, so it is an experiment of its own. Long run names are cut
    (with a hash, so two cut names still differ) to keep it within the experiment name's 128 characters."""
    suffix = design + ("-hold-alpha" if hold == "alpha" else "")
    name = f"{exp_name}.{a}-vs-{b}.{suffix}"
    if len(name) <= MAX_EXPERIMENT_NAME:
        return name
    room = max(12, (MAX_EXPERIMENT_NAME - min(len(exp_name), 60) - len(suffix) - 5) // 2)

    def cut(x: str, n: int) -> str:
        return x if len(x) <= n else f"{x[:n - 7]}-{config_hash(x)[:6]}"

    return f"{cut(exp_name, 60)}.{cut(a, room)}-vs-{cut(b, room)}.{suffix}"


def ablation_of(exp_name: str, candidate: str) -> tuple[str, str, str] | None:
    """(a, b, design) when `candidate` names an ablation of experiment `exp_name`, else None."""
    m = re.fullmatch(re.escape(exp_name) + r"\.(.+)-vs-(.+)\.(" + "|".join(DESIGNS) + ")(?:-hold-alpha)?", candidate)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def endpoint(exp: Experiment, ref: str, records: dict[str, RunRecord] | None = None) -> RunSpec:
    """A run of the file by name, else a stored run of the same experiment (a sweep trial) by name."""
    try:
        return exp.run(ref)
    except KeyError:
        pass
    rec = (records or {}).get(ref)
    if rec is not None and rec.kind == "lora":
        return RunSpec(name=ref, **{s: rec.config[s] for s in KNOB_SECTIONS})
    names = list(dict.fromkeys([r.name for r in exp.resolved_runs] + sorted(records or {})))  # a stored run of the file once
    raise SpecError(f"no run {ref!r} to ablate in {exp.source or exp.name}",
                    [Problem("run", "not a run of this file (nor a stored run of its experiment)", ref,
                             f"use one of: {', '.join(names)}")])


def plan(exp: Experiment, a: str, b: str, design: str = "ofat", *, workspace: Path,
         records: dict[str, RunRecord] | None = None, hold: str = "alpha/r") -> AblationPlan:
    """The runs that credit each knob on which A and B differ, and the experiment file that trains them
    (each run with the experiment's seeds: api.with_repeats changes them first, as `--repeats` does).

    `records`: stored runs of the experiment by name, for endpoints that are not in the file (trials).
    `workspace`: written into the file, so running it from any folder reuses the runs stored there.
    `hold`: what stays fixed when r moves: alpha/r (alpha moves with r; the default) or alpha."""
    if hold not in HOLDS:
        raise SpecError(f"unknown --hold {hold!r}", [Problem("--hold", "not a knob that can be held", hold,
                                                              f"use one of: {', '.join(HOLDS)}")])
    if design not in DESIGNS:
        raise SpecError(f"unknown ablation design {design!r}",
                        [Problem("--design", "unknown design", design, f"use one of: {', '.join(DESIGNS)}")])
    if a == b:
        raise SpecError("an ablation needs two different runs", [Problem("runs", "the same run twice", a, "name two runs, e.g. A B")])
    ra, rb = endpoint(exp, a, records), endpoint(exp, b, records)
    ka, kb = run_knobs(ra), run_knobs(rb)
    moved = differing(trained_knobs(ka, hold), trained_knobs(kb, hold))
    eval_only = [k for k in differing(ka, kb) if k.split(".")[0] not in TRAINED_SECTIONS]
    if not moved:
        raise SpecError(f"{a} and {b} train the same adapter: nothing to ablate",
                        [Problem("runs", "no lora or train knob differs", f"{a} vs {b}",
                                 "a generate.* difference needs no ablation: the report compares the stored caps"
                                 if eval_only else "pick two runs with different lora or train settings")])
    rows = ofat_rows(len(moved)) if design == "ofat" else factorial_rows(len(moved))
    # Runs between A and B evaluate like A; caps that only other runs of the file ask for are kept, so
    # the experiment's eval caps, part of every run id, stay those of the file and A and B are reused.
    extra_caps = sorted(set(exp.eval_caps) - set(ra.generate.max_new_tokens) - set(rb.generate.max_new_tokens))
    middle_generate = ra.generate.model_copy(update={"max_new_tokens": sorted({*ra.generate.max_new_tokens, *extra_caps})})
    runs: list[PlannedRun] = []
    for i, row in enumerate(rows):
        at_b = [k for k, x in zip(moved, row) if x]
        if not at_b:
            runs.append(PlannedRun(a, [], ra))
        elif len(at_b) == len(moved):
            runs.append(PlannedRun(b, at_b, rb))
        else:
            name = f"{a}+" + "+".join(short_name(k) for k in at_b)
            if len(name) > MAX_NAME:
                name = f"{a[:MAX_NAME - 7]}+run{i:02d}"  # a long name of A must not make a name the file rejects
            runs.append(PlannedRun(name, at_b, _moved(ra, rb, at_b, middle_generate, name, hold)))
    name = experiment_name(exp.name, a, b, design, hold)
    text = ablation_yaml(exp, name, runs, workspace, design, a, b, moved, eval_only, hold)
    return AblationPlan(design, a, b, moved, eval_only, runs, parse_experiment(yaml.safe_load(text), None, text),
                exp.seeds_for(ra), resolution(rows) if design == "factorial" else None, text=text, hold=hold)


def _moved(ra: RunSpec, rb: RunSpec, at_b: list[str], generate, name: str, hold: str = "alpha/r") -> RunSpec:
    """A's settings with the knobs `at_b` at B's values; with alpha/r held, alpha follows r at the
    scale the run ends up with (A's, or B's when the scale itself moved)."""
    parts = {s: getattr(ra, s).model_dump() for s in TRAINED_SECTIONS}
    for k in at_b:
        if k == SCALE:
            continue
        s, key = k.split(".", 1)
        parts[s][key] = getattr(getattr(rb, s), key)  # not from the dump: it leaves out a variant at its default
    if hold == "alpha/r":
        scale = (rb if SCALE in at_b else ra).lora
        parts["lora"]["alpha"] = float(scale.alpha) / scale.r * parts["lora"]["r"]
    return RunSpec(name=name, **{s: type(getattr(ra, s)).model_validate(parts[s]) for s in TRAINED_SECTIONS},
                   generate=generate)


def _flow(d: dict) -> str:
    return yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10**6).strip()


def ablation_yaml(exp: Experiment, name: str, runs: list[PlannedRun], workspace: Path, design: str,
              a: str, b: str, moved: list[str], eval_only: list[str], hold: str = "alpha/r") -> str:
    """The plan as an experiment file: every run written out in full (a reader sees each knob), with a
    comment saying which knobs it moved. Paths are absolute, so the file works from any folder."""
    model = {**exp.model.model_dump(exclude_defaults=True), "name": exp.model.name}
    local = exp.resolve_path(exp.model.name)
    if not exp.model.name.startswith("builtin:") and local.exists():
        model["name"] = str(local)
    data = exp.data.model_dump(exclude_defaults=True)
    for key in ("path", "eval_path"):
        if data.get(key):
            data[key] = str(exp.resolve_path(data[key]))
    if data.get("hf") and exp.resolve_path(data["hf"]).is_dir():
        data["hf"] = str(exp.resolve_path(data["hf"]))
    head = ["# Run it:  loralab run {path}",
            "#",
            f"# {'One-knob-at-a-time' if design == 'ofat' else 'Two-level factorial'} ablation of "
            f"{a} vs {b} from {exp.source or exp.name}, written by `loralab ablate`. Runs already in the",
            "# workspace (the same settings, model and data) are reused, not trained again.",
            f"# Trained knobs that differ: {', '.join(moved)}.",
            f"# {hold_sentence(hold, 'lora.r' in moved)}"]
    if eval_only:
        head.append(f"# Not trained: {', '.join(eval_only)} (every cap comes from one generation; the report "
                    "compares the stored caps).")
    doc: dict[str, Any] = {"name": name, "model": model if set(model) != {"name"} else model["name"]}
    if data:
        doc["data"] = data
    if exp.device != "auto":
        doc["device"] = exp.device
    doc["workspace"] = str(workspace)
    if exp.seeds is not None:  # as the file says, so each run gets the same seeds as there
        doc["seeds"] = list(exp.seeds)
    elif exp.adaptive is not None:  # repeats: auto, as the file wrote it
        plan = exp.adaptive
        doc["repeats"] = {"min": plan.min_seeds, "max": plan.max_seeds, "metrics": list(plan.metrics)}
    else:
        doc["repeats"] = exp.repeats
    ev = exp.evaluation.model_dump(exclude_defaults=True, exclude={"sequential"})
    if ev:
        doc["evaluation"] = ev
    if exp.cost is not None:
        doc["cost"] = exp.cost.model_dump()
    lines = head + [yaml.safe_dump(doc, sort_keys=False, width=10**6, default_flow_style=None).rstrip(), "runs:"]
    ka = trained_knobs(run_knobs(runs[0].spec), hold)
    for r in runs:
        kr = trained_knobs(run_knobs(r.spec), hold)
        moved_text = ", ".join(f"{k}: {_show(ka[k])} -> {_show(kr[k])}" for k in r.at_b)
        lines.append(f"  # {moved_text}" if r.at_b else f"  # {a} as in {exp.source or exp.name}")
        lines.append(f'  "{r.name}":')  # quoted: a name such as `on` or `1e3` stays text
        for s in KNOB_SECTIONS:
            section = getattr(r.spec, s).model_dump()
            every = getattr(getattr(r.spec, s), "checkpoint_every", "5m")
            if s == "train" and every != "5m":  # in no dump (it changes no id), but the file asked for it
                section["checkpoint_every"] = every
            lines.append(f"    {s}: {_flow(section)}")
    return "\n".join(lines) + "\n"


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_plan(p: AblationPlan, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(p.text.replace("{path}", str(out), 1), encoding="utf-8")
    p.path = out
    p.text = out.read_text(encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Effects: each knob's own effect on a metric, with its interval


@dataclass(frozen=True)
class Effect:
    """How much moving one knob from `low` to `high` changed `metric` (verdict.diff = high - low)."""

    knob: str
    low: Any
    high: Any
    metric: str
    verdict: Verdict | None  # None: nothing to test (e.g. one seed each of a per-run metric)
    seeds: int  # seeds behind each side's runs (the fewest)
    reference: float | None  # the metric's mean on the low side, to read the size of the change
    method: str  # what the interval covers: "seeds+examples" | "examples" (one seed) | "seeds" | "" (untested)
    source: str  # which runs it comes from, in words
    design: str  # "pair" | "factorial" | "cap"
    note: str = ""  # what else moved with the knob (r: alpha and alpha/r), in words


@dataclass
class Design:
    """A two-level orthogonal design found among runs: the knobs, each run's levels, its resolution."""

    knobs: list[str]
    low: dict[str, Any]
    high: dict[str, Any]
    rows: list[tuple[int, ...]]
    resolution: int | None
    runs: list[str] = field(default_factory=list)
    hold: str = "alpha/r"  # how alpha was read: as the scale alpha/r, or as set


def _trained(group: list[RunRecord], hold: str = "alpha/r") -> dict[str, Any]:
    return trained_knobs(knobs(group[0]), hold)


def find_design(groups: list[list[RunRecord]]) -> Design | None:
    """The runs as a two-level orthogonal design (balanced, uncorrelated columns), if they are one:
    read with alpha/r as a knob (a default factorial plan), else with alpha as set (`--hold alpha`).

    Levels are read against the first run (its value is `low`). Needs at least two knobs and four runs:
    fewer is a pair or a line, which single-knob pairs already answer."""
    for hold in HOLDS:
        design = _design(groups, hold)
        if design is not None:
            return design
    return None


def _design(groups: list[list[RunRecord]], hold: str) -> Design | None:
    if len(groups) < 4:
        return None
    tk = [_trained(g, hold) for g in groups]
    varying = differing_any(tk)
    if len(varying) < 2:
        return None
    low = {k: tk[0].get(k) for k in varying}
    high = {}
    for k in varying:
        values = {_norm(t.get(k)) for t in tk}
        if len(values) != 2:
            return None
        high[k] = next(t.get(k) for t in tk if _norm(t.get(k)) != _norm(low[k]))
    rows = [tuple(int(_norm(t.get(k)) != _norm(low[k])) for k in varying) for t in tk]
    if len(set(rows)) != len(rows):
        return None
    signs = [[2 * x - 1 for x in r] for r in rows]
    for i in range(len(varying)):
        if sum(s[i] for s in signs):
            return None
        for j in range(i + 1, len(varying)):
            if sum(s[i] * s[j] for s in signs):
                return None
    return Design(varying, low, high, rows, resolution(rows), [g[0].name for g in groups], hold)


def differing_any(dicts: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return [k for k in keys if len({_norm(d.get(k)) for d in dicts}) > 1]


def _method(v: Verdict | None) -> str:
    """What the effect's interval covers (stats.compare_runs); "" when there is none."""
    return "" if v is None or v.label == "untested" else v.method


def _mean(group: list[RunRecord], key: str) -> float | None:
    vals = [r.metrics[key] for r in group if isinstance(r.metrics.get(key), (int, float))
            and not isinstance(r.metrics.get(key), bool)]
    return mean_ci(vals).mean if vals else None


def knob_effects(groups: list[list[RunRecord]], metrics: list[str], *, level: float = 0.95,
                 floors: dict[str, float] | None = None) -> list[Effect]:
    """Each trained knob's effect on each metric, from the runs given (finished ones; the first is the
    reference): a two-level orthogonal design's main effects when the runs form one, else every pair of
    runs that differ in exactly one trained knob (the earlier run is the low side).

    Knobs are read with alpha/r in place of alpha (trained_knobs): r moving with alpha at one ratio is
    r's effect. A pair that moves r at a fixed alpha also moves the scale; it is still credited to r, and
    the effect says so (`note`), since that is the change the user made."""
    groups = [g for g in groups if g and g[0].kind == "lora" and all(r.status == Status.FINISHED for r in g)]
    out: list[Effect] = []
    design = find_design(groups)
    if design is not None:
        n = len(design.rows)
        kind = "full factorial" if design.resolution is None else f"resolution {roman(design.resolution)} fraction"
        seeds = min(len(g) for g in groups)
        for i, k in enumerate(design.knobs):
            minus = [r for g, row in zip(groups, design.rows) if not row[i] for r in g]
            plus = [r for g, row in zip(groups, design.rows) if row[i] for r in g]
            src = f"main effect over {n} runs ({kind} of {len(design.knobs)} knobs)"
            if design.resolution == 3:
                src += "; aliased with two-knob interactions"
            lv = max(pair_levels([minus, plus], [(0, 1)], level))  # `repeats: auto`: its looks' level
            vs = adjust_for_multiplicity([verdict_of(m, minus, plus, lv, floors) for m in metrics], lv)
            for m, v in zip(metrics, vs):
                out.append(Effect(k, design.low[k], design.high[k], m, v, seeds, _mean(minus, m),
                                  _method(v), src, "factorial", "" if k != "lora.r" else
                                  "alpha held as set, so alpha/r moved with r" if design.hold == "alpha" else
                                  "alpha moved with r, alpha/r held"))
        return out
    best: dict[tuple, tuple[int, int]] = {}  # one pair per change of one knob: the one with the most seeds
    tk = [_trained(g) for g in groups]
    for i, j in itertools.combinations(range(len(groups)), 2):
        d = moved_knobs(knobs(groups[i][0]), knobs(groups[j][0]))
        if len(d) != 1:
            continue
        key = (d[0], _norm(tk[i][d[0]]), _norm(tk[j][d[0]]))
        seeds = min(len(groups[i]), len(groups[j]))
        if key not in best or seeds > min(len(groups[x]) for x in best[key]):
            best[key] = (i, j)
    for (k, _, _), (i, j) in best.items():
        lo, hi = groups[i], groups[j]
        lv = pair_levels([lo, hi], [(0, 1)], level)[0]  # `repeats: auto`: the level of the look it stopped at
        vs = adjust_for_multiplicity([verdict_of(m, lo, hi, lv, floors) for m in metrics], lv)
        for m, v in zip(metrics, vs):
            out.append(Effect(k, tk[i][k], tk[j][k], m, v, min(len(lo), len(hi)), _mean(lo, m),
                              _method(v), f"{hi[0].name} vs {lo[0].name}", "pair", scale_note(k, lo[0], hi[0])))
    return out


def scale_note(knob: str, low: RunRecord, high: RunRecord) -> str:
    """For r's effect: what happened to alpha and the update scale alpha/r meanwhile, in words."""
    if knob != "lora.r":
        return ""
    a, b = knobs(low), knobs(high)
    sa, sb = (trained_knobs(x).get(SCALE) for x in (a, b))
    if sa is None or sb is None:
        return ""
    if _norm(sa) == _norm(sb):
        return f"alpha moved with r, alpha/r kept at {sa:g}"
    return f"alpha held at {a.get('lora.alpha'):g}, so alpha/r moved too: {sa:g} → {sb:g}"


def cap_effects(group: list[RunRecord], caps: list[int], bases: list[str], *, level: float = 0.95,
                floors: dict[str, float] | None = None) -> list[Effect]:
    """generate.max_new_tokens from the smallest cap to the largest: the same answers, cut at each cap
    (greedy decoding makes the smaller cap a prefix), so the difference is paired per eval example and
    per seed, and needs no extra training. Metric keys are named at the larger cap."""
    if len(caps) < 2 or not group:
        return []
    lo, hi = min(caps), max(caps)
    group = _by_seed(group)
    seeds = [r.seed for r in group]
    out = []
    for base in bases:  # one family: the cap's effects on each metric
        a, b = _per_example(group, f"{base}@{lo}"), _per_example(group, f"{base}@{hi}")
        if a is None or b is None:
            continue
        ids = [i for i in a if i in b]
        if not ids:
            continue
        rows_a = [[a[i][s] for i in ids] for s in range(len(group))]
        rows_b = [[b[i][s] for i in ids] for s in range(len(group))]
        v = compare_runs(f"{base}@{hi}", Side(rows_a, seeds), Side(rows_b, seeds), level=level,
                         floor=floor_of(f"{base}@{hi}", floors))
        out.append(Effect("generate.max_new_tokens", lo, hi, f"{base}@{hi}", v, len(group), _mean(group, f"{base}@{lo}"),
                          v.method, f"{group[0].name}'s answers at cap {lo} vs {hi} (one generation)", "cap"))
    adjusted = adjust_for_multiplicity([e.verdict for e in out], level)
    return [replace(e, verdict=v) for e, v in zip(out, adjusted)]
