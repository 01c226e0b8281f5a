"""A sweep's search space as configuration: knobs and their Optuna parameters, the run config of one
point, the checks `loralab validate` makes of a `sweep:` section, and which metrics an objective needs.

No torch and no Optuna at import (Optuna only to name a sampler class), so the experiment schema
(spec.py) checks a sweep here without importing the machinery that runs it (sweep.py)."""

from __future__ import annotations

import copy
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loralab.errors import Problem, SpecError
from loralab.metrics.table import METRICS
from loralab.config.schema import PRIOR_REASONS, _TOPICS, Experiment, KnobSpec, ObjectiveSpec, RunSpec, SweepSpec, deep_merge

STRATEGIES = {"grid": "GridSampler", "random": "RandomSampler", "tpe": "TPESampler", "cmaes": "CmaEsSampler",
              "qmc": "QMCSampler", "gp": "GPSampler", "nsgaii": "NSGAIISampler", "nsgaiii": "NSGAIIISampler",
              "bruteforce": "BruteForceSampler"}
_NOT_STANDALONE = {"BaseSampler", "BaseGASampler", "PartialFixedSampler"}  # need another sampler or are abstract
MAX_GRID_POINTS = 100_000  # a grid beyond this would never finish, and Optuna builds its list of points first
MAX_CHECKED_POINTS = 5000  # trial configs validated when the file is loaded (a grid beyond this is checked at its corners)


# ---------------------------------------------------------------------------------------------
# The search space: knobs, their Optuna parameters, and the run config of one point


def knob_kind(path: str) -> str | None:
    """"int", "float", "caps" (generate.max_new_tokens), "other", or None for no such knob."""
    section, _, name = path.partition(".")
    model = _TOPICS.get(section)
    if model is None or name not in model.model_fields:
        return None
    if path == "generate.max_new_tokens":
        return "caps"
    ann = model.model_fields[name].annotation
    args = [a for a in (typing.get_args(ann) or (ann,)) if a is not type(None)]
    if typing.get_origin(ann) is list or bool in args:
        return "other"
    return "int" if int in args else "float" if float in args else "other"


@dataclass(frozen=True)
class Dimension:
    """One knob as an Optuna parameter. A ratio knob's parameter is the ratio ("lora.alpha/lora.r")."""

    path: str
    knob: KnobSpec

    @property
    def param(self) -> str:
        return f"{self.path}/{self.knob.ratio_of}" if self.knob.ratio_of else self.path

    @property
    def is_int(self) -> bool:
        default = "float" if self.knob.ratio_of else ("int" if knob_kind(self.path) == "int" else "float")
        return (self.knob.type or default) == "int"

    def suggest(self, trial) -> Any:
        k = self.knob
        if k.values is not None:
            return trial.suggest_categorical(self.param, k.values)
        if self.is_int:
            return trial.suggest_int(self.param, int(k.low), int(k.high), step=int(k.step or 1), log=k.log)
        return trial.suggest_float(self.param, k.low, k.high, step=k.step, log=k.log)

    def edges(self) -> list[Any]:
        """The values whose trial configs are checked when the file is loaded: choices, or both ends."""
        if self.knob.values is not None:
            return list(self.knob.values)
        return [int(self.knob.low), int(self.knob.high)] if self.is_int else [self.knob.low, self.knob.high]


class Space:
    """The sweep's knobs in file order; turns Optuna parameters into knob values and back."""

    def __init__(self, sweep: SweepSpec):
        self.dims = [Dimension(path, knob) for path, knob in sweep.space.items()]

    def knobs(self, params: dict[str, Any]) -> dict[str, Any]:
        """Knob values of a point: ratio knobs resolved (alpha = ratio * r), in file order."""
        plain = {d.path: params[d.param] for d in self.dims if not d.knob.ratio_of}
        out = {}
        for d in self.dims:
            if d.knob.ratio_of:
                v = params[d.param] * plain[d.knob.ratio_of]
                out[d.path] = int(round(v)) if knob_kind(d.path) == "int" else float(v)
            else:
                out[d.path] = plain[d.path]
        return out

    def grid(self) -> dict[str, list]:
        """Optuna GridSampler's search space (every knob has choices)."""
        return {d.param: list(d.knob.values) for d in self.dims}

    def expand(self) -> list[dict[str, Any]]:
        """Every point of the grid as knob values, in file order (the first knob varies slowest)."""
        names = [d.param for d in self.dims]
        return [self.knobs(dict(zip(names, combo))) for combo in itertools.product(*(d.knob.values for d in self.dims))]

    def corners(self) -> list[dict[str, Any]]:
        """Each knob at each of its edge values with the others at their first: cheap config checks."""
        first = {d.param: d.edges()[0] for d in self.dims}
        points = [first]
        for d in self.dims:
            points += [{**first, d.param: v} for v in d.edges()[1:]]
        return [self.knobs(pt) for pt in points]


def _budget_text(budget: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in budget.items())


def describe(sweep: SweepSpec) -> list[str]:
    """What a sweep section will do, in words (for `loralab validate`); needs no model."""
    space = Space(sweep)
    n = len(space.expand()) if is_grid(sweep) else None
    knobs = ", ".join(d.path + (f" (= {', '.join(f'{v:g}' for v in d.knob.values)} x {d.knob.ratio_of})"
                                if d.knob.ratio_of else "") for d in space.dims)
    lines = [f"sweep: strategy {sweep.strategy}" + (f", a grid of {n} point(s)" if n is not None else "")
             + f"; knobs {knobs}"]
    lines.append("  objective: " + ", ".join(f"{o.metric} ({o.resolved_direction})" for o in sweep.objective)
                 + ("" if needs_full_eval(sweep) else "; trials measure the losses only (no generation)"))
    pr = sweep.resolved_pruner
    if pr.name != "none":
        where = (f"at steps {pr.every} x {pr.resolved_reduction_factor}^k" if pr.name in ("successive_halving", "hyperband")
                 else f"every {pr.every} steps")
        lines.append(f"  pruner: {pr.name}, held-out loss {where}"
                     + (f" on the first {pr.eval_examples} eval examples" if pr.eval_examples else "")
                     + (f" ({pr.resolved_reduction_factor}x more at each later rung)"
                        if pr.eval_examples and pr.name in ("successive_halving", "hyperband") else ""))
    budget = sweep.budget.model_dump(exclude_none=True)
    lines.append("  budget: " + (_budget_text(budget) if budget
                                 else "none (a grid stops when every point is done)"))
    return lines + prior_lines(sweep)


def prior_lines(sweep: SweepSpec) -> list[str]:
    """For `space: auto`: the proposed space and why, knob by knob (citations in docs/priors.md)."""
    if not sweep.from_priors:
        return []
    return ["  space: auto, proposed from published evidence (docs/priors.md):"] + [
        f"    {path}: {reason}" for path, reason in PRIOR_REASONS.items()]


EDGE_TOLERANCE = 0.05  # of a range's width, in the knob's own scale (log for a log-scaled knob)


def edges(space: Space, knobs: dict[str, Any], others: list[tuple[dict[str, Any], bool]] | None = None) -> list[str]:
    """The knobs of a point that sit at an end of their searched range (numbers only): the best point
    there means the best may lie outside the space, which was then too narrow.

    Choices: the smallest or largest one. A range: within 5% of its width from an end, measured on a log
    scale for a log-scaled knob (a learning rate at 98% of its log range is at the edge, whatever a linear
    tolerance says). `others`: the other finished trials as (knobs, within noise of this point); given,
    a knob counts only when some trial with another value of it is worse beyond noise: when every
    neighbour is within noise, the edge point is not shown to be better, and nothing says to widen."""
    out = []
    for d in space.dims:
        v = knobs.get(d.path)
        if d.knob.ratio_of or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        choices = sorted(c for c in (d.knob.values or []) if isinstance(c, (int, float)) and not isinstance(c, bool))
        if len(choices) > 1:
            lo, hi = choices[0], choices[-1]
            end = "lowest" if v == lo else "highest" if v == hi else None
        else:
            lo, hi = d.knob.low, d.knob.high
            if lo is None or hi is None or lo == hi:
                continue
            log = d.knob.log and lo > 0 and v > 0
            pos = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) if log else (v - lo) / (hi - lo)
            end = "lowest" if pos <= EDGE_TOLERANCE else "highest" if pos >= 1 - EDGE_TOLERANCE else None
        if end is None:
            continue
        if others is not None and not any(not close and o.get(d.path) != v for o, close in others):
            continue
        out.append(f"{d.path} = {v:g}, the {end} value searched ({lo:g} to {hi:g})")
    return out


def start_sections(defaults: dict, override: dict | None) -> dict[str, dict]:
    """The lora/train/generate settings a sweep starts from: defaults, then the `from` run's own."""
    def section(d: Any, t: str) -> dict:
        return d[t] if isinstance(d, dict) and isinstance(d.get(t), dict) else {}

    return {t: deep_merge(section(defaults, t), section(override, t)) for t in _TOPICS}


def experiment_start(exp: Experiment) -> dict[str, dict]:
    sw = exp.sweep
    override = exp.runs[sw.start].model_dump() if sw and sw.start else None
    return start_sections(exp.defaults.model_dump(), override)


def make_run(start: dict[str, dict], knobs: dict[str, Any], name: str) -> RunSpec:
    """The run of one point: knob values applied to the start settings, then validated as any run.

    Applied to the raw settings, not the resolved ones, so a default that follows another knob
    (alpha = 2r when alpha is unset) follows the swept value."""
    parts = copy.deepcopy(start)
    for path, v in knobs.items():
        section, _, key = path.partition(".")
        parts[section][key] = [v] if path == "generate.max_new_tokens" else v
    return RunSpec(name=name, **{t: m.model_validate(parts[t]) for t, m in _TOPICS.items()})


def is_grid(sweep: SweepSpec) -> bool:
    return STRATEGIES.get(sweep.strategy.lower(), sweep.strategy) == "GridSampler"


def sampler_class_name(strategy: str) -> str:
    """The Optuna sampler class a strategy names; LookupError with the choices if none."""
    name = STRATEGIES.get(strategy.lower())
    if name:
        return name
    import optuna.samplers

    usable = [n for n in optuna.samplers.__all__ if n.endswith("Sampler") and n not in _NOT_STANDALONE]
    if strategy in usable:
        return strategy
    raise LookupError(f"use {', '.join(STRATEGIES)} or an Optuna sampler class: {', '.join(usable)}")


# ---------------------------------------------------------------------------------------------
# Validation (called by loading.parse_experiment, so every problem is reported with the others)


class _Problems(list):
    """Problems of a sweep section, each with the YAML line of its key (or of its section when missing)."""

    def __init__(self, lines: dict[str, int]):
        super().__init__()
        self.lines = lines

    def __call__(self, path: str, message: str, value: Any, fix: str, has_value: bool = True) -> None:
        parents = [path[:i] for i in range(len(path), 0, -1) if i == len(path) or path[i] == "."]
        line = next((self.lines[q] for q in parents if q in self.lines), None)
        self.append(Problem(path + (f" (line {line})" if line else ""), message, value, fix, has_value))


def check_sweep(raw: dict, resolved: list[RunSpec], lines: dict[str, int], base_dir: Path | None = None) -> list[Problem]:
    """Problems the sweep schema alone cannot see: knob paths, links, strategy, budget, objectives, and
    whether every trial config is a valid run. Schema errors were already reported by the Experiment model."""
    try:
        sw = SweepSpec.model_validate(raw["sweep"])
    except ValidationError:
        return []
    problem = _Problems(lines)
    runs_raw = raw.get("runs") if isinstance(raw.get("runs"), dict) else {}
    defaults_raw = raw.get("defaults") if isinstance(raw.get("defaults"), dict) else {}
    names = [r.name for r in resolved]
    start = None
    if sw.start is not None and sw.start not in runs_raw:
        problem("sweep.from", "no such run in this file", sw.start,
                f"use one of: {', '.join(names)}; or leave it out to start from `defaults`" if runs_raw else
                "declare it under `runs:`, or leave `from` out to start from `defaults`")
    else:
        start = start_sections(defaults_raw, runs_raw.get(sw.start) if sw.start else None)
    try:
        sampler_class_name(sw.strategy)
    except LookupError as err:
        problem("sweep.strategy", "unknown strategy", sw.strategy, str(err))
    _check_knobs(sw, problem)
    _check_budget(sw, raw, problem, base_dir)
    _check_objectives(sw, raw, resolved, start, problem)
    if problem or start is None:
        return list(problem)
    _check_points(sw, start, problem)
    return list(problem)[:10]


def _check_knobs(sw: SweepSpec, problem: _Problems) -> None:
    """Each knob: a field of lora/train/generate, searchable, with choices or a range its type allows."""
    grid = is_grid(sw)
    topics = "; ".join(f"{t}: {', '.join(m.model_fields)}" for t, m in _TOPICS.items())
    for path, knob in sw.space.items():
        where = f"sweep.space.{path}"
        kind = knob_kind(path)
        if kind is None:
            problem(where, "unknown knob", path, f"use a field of lora, train or generate ({topics})")
            continue
        if path == "train.seed":
            problem(where, "seeds are not searched", path, "use `repeats:` or `seeds:`; each trial runs every seed")
            continue
        numeric = kind in ("int", "float")
        if knob.values is None:
            if grid:
                problem(where, "grid needs a list of choices", knob.model_dump(exclude_none=True),
                        "write the values to try, e.g. [4, 8, 16], or use strategy tpe or random for ranges")
            elif kind == "caps":
                problem(where, "a range of caps", knob.model_dump(exclude_none=True),
                        "give a list of choices: every trial is evaluated at every cap, so each is generated once")
            elif not numeric and not knob.ratio_of:
                problem(where, "a range needs a numeric knob", knob.model_dump(exclude_none=True), "give a list of choices")
            elif Dimension(path, knob).is_int and not (float(knob.low).is_integer() and float(knob.high).is_integer()):
                problem(where, "an int range needs whole numbers", [knob.low, knob.high],
                        "use whole low/high, or `type: float`")
            elif Dimension(path, knob).is_int and knob.step is not None and not float(knob.step).is_integer():
                problem(f"{where}.step", "a whole-number knob needs a whole step", knob.step,
                        f"use a step of 1 or more whole numbers (the knob takes whole values from {knob.low:g} to {knob.high:g})")
        if knob.ratio_of:
            target = sw.space.get(knob.ratio_of)
            if target is None or target.ratio_of:
                problem(f"{where}.ratio_of", "ratio_of names no plain knob of the space", knob.ratio_of,
                        f"add {knob.ratio_of} to sweep.space with its own values, or give {path} its own values")
            elif knob_kind(knob.ratio_of) not in ("int", "float"):
                problem(f"{where}.ratio_of", "ratio_of needs a numeric knob", knob.ratio_of, "link to a number such as lora.r")
            if not numeric:
                problem(where, "only a numeric knob can be a ratio of another", path, "give it a list of choices")


def _check_budget(sw: SweepSpec, raw: dict, problem: _Problems, base_dir: Path | None = None) -> None:
    """A budget that ends the search (only a grid ends by itself), a price for money, a usable storage."""
    grid = is_grid(sw)
    b = sw.budget
    if b.money is not None and not isinstance(raw.get("cost"), dict):
        problem("sweep.budget.money", "a money budget needs a price", b.money,
                "add `cost: {per_hour: 2.5}` (your machine's or cloud GPU's price per hour), or use budget.minutes")
    if not grid and b.trials is None and b.minutes is None and b.money is None:
        problem("sweep.budget", f"strategy {sw.strategy} has no end", None,
                "give budget.trials, budget.minutes or budget.money (only a grid ends by itself)", False)
    if sw.storage is not None:
        why, fix = storage_problem(storage_location(sw.storage, base_dir or Path.cwd()))
        if why:
            problem("sweep.storage", why, sw.storage, fix)


def _check_objectives(sw: SweepSpec, raw: dict, resolved: list[RunSpec], start: dict | None, problem: _Problems) -> None:
    """Every objective a metric some trial records (at the caps the file evaluates), pruning single-objective."""
    caps = {c for r in resolved for c in r.generate.max_new_tokens}
    try:
        caps |= set(make_run(start, {}, "start").generate.max_new_tokens) if start is not None else set()
    except ValidationError:  # reported under defaults/runs
        pass
    cap_knob = sw.space.get("generate.max_new_tokens")
    if cap_knob is not None and cap_knob.values:
        caps |= {int(c) for c in cap_knob.values if isinstance(c, (int, float)) and not isinstance(c, bool)}
    evaluation = raw.get("evaluation") if isinstance(raw.get("evaluation"), dict) else {}
    known = recordable_metrics(sorted(caps), drift=evaluation.get("drift", True) is not False,
                               cost=isinstance(raw.get("cost"), dict))
    for i, o in enumerate(sw.objective):
        if o.metric not in known:
            near = sorted(k for k in known if "@" not in k)
            problem(f"sweep.objective.{i}.metric" if len(sw.objective) > 1 else "sweep.objective",
                    "no trial records this metric", o.metric,
                    f"use one of: {', '.join(near)} (per-cap ones also as NAME@CAP, caps {sorted(caps) or [64]})")
    if len(sw.objective) > 1 and sw.pruner is not None and sw.pruner.name != "none":
        problem("sweep.pruner", "Optuna prunes only single-objective studies", sw.pruner.name,
                "use `pruner: {name: none}` or one objective")


def _check_points(sw: SweepSpec, start: dict, problem: _Problems) -> None:
    """Every trial a valid run (a grid's points, or a range's corners); a grid that could never finish."""
    try:
        make_run(start, {}, "start")
    except ValidationError:  # the start settings themselves are wrong: already reported under defaults/runs
        return
    grid = is_grid(sw)
    space = Space(sw)
    n_grid = math.prod(len(d.knob.values) for d in space.dims) if grid else 0
    if n_grid > MAX_GRID_POINTS:  # Optuna's grid lists every point up front: memory and time before trial 0
        problem("sweep.space", f"a grid of {n_grid:,} points", n_grid,
                f"keep a grid under {MAX_GRID_POINTS:,} points, or use strategy tpe or random with budget.trials")
        return
    points = space.expand() if grid and n_grid <= MAX_CHECKED_POINTS else space.corners()
    seen: set[str] = set()
    for pt in points:
        try:
            make_run(start, pt, "trial")
        except ValidationError as err:
            for e in err.errors():
                loc = ".".join(str(x) for x in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                key = f"{loc}: {msg}"
                if key in seen:
                    continue
                seen.add(key)
                where = next((f"sweep.space.{k}" for k in pt if k.partition(".")[2] == loc.split(".")[0]), "sweep.space")
                shown = ", ".join(f"{k}={v}" for k, v in pt.items())
                problem(where, f"a trial would be invalid: {msg}", shown,
                        "narrow the space (or change the start settings) so every trial is a valid run")


def storage_location(url: str, base_dir: Path) -> str:
    """`sweep.storage` with a relative SQLite path read from the experiment file's folder, as every other
    path in the file is (SQLAlchemy would read it from the current folder: a second study elsewhere)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path, _, query = url[len("sqlite:///"):].partition("?")
        if path and path != ":memory:" and not Path(path).expanduser().is_absolute():
            return f"sqlite:///{(base_dir / path).resolve()}" + (f"?{query}" if query else "")
    return url


def storage_problem(url: str) -> tuple[str | None, str]:
    """Why a `sweep.storage` URL cannot hold a study (unknown scheme, missing driver, missing folder), and the fix."""
    from sqlalchemy.engine import make_url

    from loralab.workspace.store import engine_url

    fix = ("use sqlite:///PATH/optuna.db, or a server such as postgresql://user@host/db; "
           "or leave sweep.storage out (optuna.db in the workspace)")
    try:
        parsed = make_url(engine_url(url))
        dialect = parsed.get_dialect()
    except Exception as err:  # ArgumentError, NoSuchModuleError: not a URL SQLAlchemy knows
        return f"not a database URL ({type(err).__name__}: {str(err).splitlines()[0][:120]})", fix
    try:
        dialect.import_dbapi()
    except ImportError as err:
        return f"the database driver is not installed ({err.name or err})", f"pip install {err.name or 'the driver'}, or {fix}"
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            return f"folder {folder} does not exist", f"create it first, or {fix}"
    return None, fix


def recordable_metrics(caps: list[int], drift: bool, cost: bool) -> set[str]:
    """Every metric key a finished trial stores, per-cap ones with and without their @cap."""
    from loralab.metrics.scores import summarize_examples

    per_cap = set(summarize_examples([])) - {"n"}
    out = set(LOSS_SIDE_METRICS) - ({"cost"} if not cost else set())
    out |= per_cap | {f"{k}@{c}" for k in per_cap for c in caps}
    if drift:
        out |= {"drift_kl", "drift_agreement"}
    return out


def objective_key(metric: str, metrics: dict, caps: list[int]) -> str:
    """The stored metric behind an objective: a per-cap metric named without a cap is read at the run's
    largest max_new_tokens (`caps`)."""
    return f"{metric}@{max(caps)}" if metric not in metrics and "@" not in metric else metric


def objective_value(metrics: dict, obj: ObjectiveSpec, run: RunSpec) -> float:
    """A stored metric; a per-cap metric named without a cap is read at the run's largest max_new_tokens."""
    key = objective_key(obj.metric, metrics, run.generate.max_new_tokens)
    if key not in metrics:
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise SpecError(f"sweep.objective: the trials do not record metric {obj.metric!r} (checked once a trial "
                        "finished: metric names depend on the caps and evaluation settings)",
                        [Problem("sweep.objective.metric", "no such metric in the trial's results", obj.metric,
                                 f"use one of: {', '.join(keys)}")])
    return float(metrics[key])


# Metrics known once the losses are measured (with training and cost numbers): a trial whose objectives
# are all among these skips greedy generation and drift. Any other name (a per-cap or drift metric, or a
# typo that the first trial will report) gets the full evaluation.
LOSS_SIDE_METRICS = frozenset(m.key for m in METRICS if m.stage in ("training", "loss", "cost"))


PROBE_METRICS = frozenset({"train_eval_loss", "train_ppl", "generalization_gap"})


def needs_probe(sweep: SweepSpec | None) -> bool:
    """Whether trials must also measure the loss on training examples (a generalization-gap objective)."""
    return needs_full_eval(sweep) or any(o.metric in PROBE_METRICS for o in sweep.objective)


def needs_full_eval(sweep: SweepSpec | None) -> bool:
    """Whether trials must generate: `evaluate: full`, or an objective the losses alone do not give."""
    if sweep is None or sweep.evaluate == "full":
        return True
    return any(o.metric not in LOSS_SIDE_METRICS for o in sweep.objective)
