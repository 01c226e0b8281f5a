"""Sweeps: an Optuna search over lora/train/generate knobs that stops bad trials early and respects a budget.

One trial is one configuration, trained once per seed (`repeats`) as ordinary runs of the workspace,
so finished runs with the same resolved config are reused, and `loralab show/compare` read trials
like any run. The study lives in an Optuna RDB storage (`optuna.db` in the workspace unless
`sweep.storage` names another), so Optuna's own API and dashboard can inspect it, and running the
same command again after a crash, Ctrl-C or kill -9 continues it:

- trials that finished or were pruned are kept and counted against the budget once;
- a trial left RUNNING by a dead process is marked FAIL (user attr status=interrupted, not counted)
  and its parameters are enqueued, so the same configuration runs next.

Several sweep processes may share a study: each trial records its owner process (host, pid, start
time), only trials whose owner is gone are recovered, and the next trial is picked under a workspace
lock, so two processes never take the same grid point (see locks.py and docs/reliability.md).

Pruning judges trials by held-out loss every `pruner.every` steps, whatever the objective: it is the
one signal available mid-training. A pruned run is stored with status `pruned`, its eval loss at the
stop, and the steps (and estimated seconds) it did not spend.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from .errors import Problem, SpecError
from .metric_table import METRICS
from .progress import Reporter
from .spec import (_TOPICS, Experiment, KnobSpec, ObjectiveSpec, PrunerSpec, RunSpec, SweepSpec, config_hash,
                   deep_merge)

OPTUNA_DB = "optuna.db"
# With nothing measured yet, --dry-run estimates train tokens/s as matmul FLOP/s / (4 x parameters)
# (forward + input gradients through a frozen base) times this efficiency: a plain loop reached ~68%.
TRAIN_EFFICIENCY = 0.68
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
                     + (f" on the first {pr.eval_examples} eval examples" if pr.eval_examples else ""))
    budget = sweep.budget.model_dump(exclude_none=True)
    lines.append("  budget: " + (_budget_text(budget) if budget
                                 else "none (a grid stops when every point is done)"))
    return lines


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
# Validation (called by spec.parse_experiment, so every problem is reported with the others)


def check_sweep(raw: dict, resolved: list[RunSpec], lines: dict[str, int]) -> list[Problem]:
    """Problems the sweep schema alone cannot see: knob paths, links, strategy, budget, and whether
    every trial config is a valid run. Schema errors were already reported by the Experiment model."""
    try:
        sw = SweepSpec.model_validate(raw["sweep"])
    except ValidationError:
        return []
    out: list[Problem] = []

    def problem(path: str, message: str, value: Any, fix: str, has_value: bool = True) -> None:
        parents = [path[:i] for i in range(len(path), 0, -1) if i == len(path) or path[i] == "."]
        line = next((lines[q] for q in parents if q in lines), None)  # a missing key: its section's line
        out.append(Problem(path + (f" (line {line})" if line else ""), message, value, fix, has_value))

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
    b = sw.budget
    if b.money is not None and not isinstance(raw.get("cost"), dict):
        problem("sweep.budget.money", "a money budget needs a price", b.money,
                "add `cost: {per_hour: 2.5}` (your machine's or cloud GPU's price per hour), or use budget.minutes")
    if not grid and b.trials is None and b.minutes is None and b.money is None:
        problem("sweep.budget", f"strategy {sw.strategy} has no end", None,
                "give budget.trials, budget.minutes or budget.money (only a grid ends by itself)", False)
    if sw.storage is not None:
        why, fix = storage_problem(sw.storage)
        if why:
            problem("sweep.storage", why, sw.storage, fix)
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
    if out or start is None:
        return out
    try:
        make_run(start, {}, "start")
    except ValidationError:  # the start settings themselves are wrong: already reported under defaults/runs
        return out
    space = Space(sw)
    n_grid = math.prod(len(d.knob.values) for d in space.dims) if grid else 0
    if n_grid > MAX_GRID_POINTS:  # Optuna's grid lists every point up front: memory and time before trial 0
        problem("sweep.space", f"a grid of {n_grid:,} points", n_grid,
                f"keep a grid under {MAX_GRID_POINTS:,} points, or use strategy tpe or random with budget.trials")
        return out
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
    return out[:10]


def storage_problem(url: str) -> tuple[str | None, str]:
    """Why a `sweep.storage` URL cannot hold a study (unknown scheme, missing driver, missing folder), and the fix."""
    from sqlalchemy.engine import make_url

    fix = ("use sqlite:///PATH/optuna.db, or a server such as postgresql://user@host/db; "
           "or leave sweep.storage out (optuna.db in the workspace)")
    try:
        parsed = make_url(url)
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
    from .metrics import summarize_examples

    per_cap = set(summarize_examples([])) - {"n"}
    out = set(LOSS_SIDE_METRICS) - ({"cost"} if not cost else set())
    out |= per_cap | {f"{k}@{c}" for k in per_cap for c in caps}
    if drift:
        out |= {"drift_kl", "drift_agreement"}
    return out


# ---------------------------------------------------------------------------------------------
# One trial: a configuration, trained once per seed


@dataclass
class TrialRuns:
    """What one configuration's runs came to; a plain function result a remote worker can return."""

    status: str  # finished | pruned | diverged | failed
    run_ids: list[str]
    values: list[float] | None  # the objectives, each a mean over seeds (finished only)
    reused: int  # runs taken from the store instead of trained
    steps: int = 0  # of the first seed: where it stopped
    planned_steps: int = 0
    saved_steps: int = 0
    saved_s: float = 0.0
    error: str | None = None


def objective_value(metrics: dict, obj: ObjectiveSpec, run: RunSpec) -> float:
    """A stored metric; a per-cap metric named without a cap is read at the run's largest max_new_tokens."""
    key = obj.metric
    if key not in metrics and "@" not in key:
        key = f"{key}@{max(run.generate.max_new_tokens)}"
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


def decision_steps(pruner: PrunerSpec, planned: int) -> list[int]:
    """The steps where the pruner can decide, so the held-out loss is measured only there.

    Successive halving and Hyperband judge a trial only at their rungs, `every` x reduction_factor^k
    steps (Optuna's rungs with min_resource = `every`); a loss measured between rungs would be
    paid for and ignored. The median pruner decides at every report after its warm-up."""
    if pruner.name == "none":
        return []
    if pruner.name in ("successive_halving", "hyperband"):
        out, step = [], pruner.every
        while step < planned:
            out.append(step)
            step *= pruner.resolved_reduction_factor
        return out
    return [s for s in range(pruner.every, planned, pruner.every) if s >= pruner.warmup_steps]


class PruningHook:
    """A training step hook (train.StepHook): at each decision step the held-out loss goes to
    `report(loss, step)`, which answers whether to stop (Optuna: trial.report then trial.should_prune).

    It remembers what it measured, so a pruned run stores the loss it was judged on instead of
    paying for another evaluation."""

    def __init__(self, p, pruner: PrunerSpec, report: Callable[[float, int], bool], planned: int):
        self.p, self.report = p, report
        self.examples = p.eval_encoded[: pruner.eval_examples]
        self.whole = len(self.examples) == len(p.eval_encoded)
        self.steps = set(decision_steps(pruner, planned))
        self.measured: dict[int, float] = {}

    def after_step(self, step) -> str | None:
        from .train import eval_loss

        if step.step not in self.steps or step.step >= step.total:  # the last step is judged by the objective
            return None
        loss = eval_loss(step.model, self.examples, pad_id=self.p.base.tokenizer.pad_token_id)
        self.measured[step.step] = loss
        return f"pruned at step {step.step}" if self.report(loss, step.step) else None

    def loss_at(self, step: int) -> tuple[float, int, bool] | None:
        """(loss, eval examples it covers, whether that is the whole eval set) measured at `step`."""
        if step not in self.measured:
            return None
        return self.measured[step], len(self.examples), self.whole


def run_trial(p, exp: Experiment, knobs: dict[str, Any], store, *, name: str,
              report: Callable[[float, int], bool] | None = None, reporter: Reporter | None = None) -> TrialRuns:
    """Train, evaluate and store one configuration once per seed; a plain function of the prepared
    model (runner.prepare), the experiment, the knob values and the store.

    `report(loss, step) -> stop?` sees the first seed's intermediate eval loss (a pruner); a pruned,
    diverged or failed first seed ends the configuration there."""
    from .models import resolve_target_modules
    from .runner import run_id, train_run
    from .train import plan_steps

    rep = reporter or Reporter()
    try:
        run = make_run(experiment_start(exp), knobs, name)
        p.targets[name] = resolve_target_modules(p.base.model, run.lora.target_modules,
                                                 where=f"sweep: {name}.lora.target_modules")[0]
    except (ValidationError, SpecError, ValueError) as err:  # a point the file check could not foresee
        return TrialRuns("failed", [], None, 0, error=f"invalid trial config: {err}")
    pruner = exp.sweep.resolved_pruner if exp.sweep else PrunerSpec(name="none")
    ids, records, reused = [], [], 0
    seeds = exp.seeds_for(run)
    full, probe = needs_full_eval(exp.sweep), needs_probe(exp.sweep)
    for i, seed in enumerate(seeds):
        rs = run.with_seed(seed)
        hook = (PruningHook(p, pruner, report, plan_steps(len(p.dataset.train), rs.train))
                if report is not None and i == 0 and pruner.name != "none" else None)
        label = name if len(seeds) == 1 else f"{name} (seed {seed})"
        status, was_reused = train_run(p, rs, store, experiment=exp.name, label=label, reporter=rep, pruning=hook,
                                       full_eval=full, probe=probe)
        rid = run_id(p, rs, full, probe)
        ids.append(rid)
        records.append(store.get(rid))
        reused += was_reused
        if status != "finished":
            break
    first = records[0].metrics
    out = TrialRuns(status, ids, None, reused, steps=int(first.get("steps", 0)),
                    planned_steps=int(first.get("planned_steps", 0)), saved_steps=int(first.get("saved_steps", 0)),
                    saved_s=float(first.get("saved_s", 0.0)), error=records[-1].error)
    if status == "finished":
        objectives = exp.sweep.objective if exp.sweep else [ObjectiveSpec()]
        out.values = [statistics.fmean(objective_value(r.metrics, o, run) for r in records) for o in objectives]
    return out


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class TrialSummary:
    """One trial of the study as stored in Optuna (params resolved to knob values)."""

    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    status: str  # loralab's: finished, pruned, diverged, failed, interrupted, running, waiting
    knobs: dict[str, Any]
    values: list[float] | None
    run_ids: list[str]
    spent_s: float
    saved_steps: int
    saved_s: float

    @classmethod
    def from_frozen(cls, t, space: Space) -> "TrialSummary":
        ua = t.user_attrs
        knobs = ua.get("knobs")
        if knobs is None:
            try:
                knobs = space.knobs(t.params)
            except KeyError:
                knobs = dict(t.params)
        return cls(t.number, t.state.name, ua.get("status", t.state.name.lower()), knobs,
                   list(t.values) if t.values is not None else None, list(ua.get("run_ids", [])),
                   float(ua.get("spent_s", 0.0)), int(ua.get("saved_steps", 0)), float(ua.get("saved_s", 0.0)))


@dataclass
class SweepPlan:
    """What --dry-run prints: the trials (a grid's full expansion) and the estimated time."""

    strategy: str
    points: list[dict[str, Any]] | None  # the grid, knob values resolved; None for other strategies
    trials: int | None  # how many the sweep would run (grid size, capped by budget.trials)
    seeds: int
    train_tokens: list[int]  # per trial (grid) or [at the start settings]
    tokens_per_s: float
    throughput_from: str
    eval_s: float | None
    per_trial_s: list[float]
    total_s: float | None
    budget: dict[str, Any]
    lines: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    workspace: Path
    study_name: str
    storage: str
    trials: list[TrialSummary] = field(default_factory=list)  # every trial of the study, by number
    ran: list[int] = field(default_factory=list)  # trial numbers this call ran
    best: list[TrialSummary] = field(default_factory=list)  # the best trial, or the Pareto set
    stopped: str = ""  # why the sweep ended
    spent_s: float = 0.0  # trials counted against the budget, this and earlier sessions
    saved_steps: int = 0
    saved_s: float = 0.0
    cost: float | None = None
    plan: SweepPlan | None = None
    close_to_best: list[int] = field(default_factory=list)  # finished trials within noise of the best


def _counts(t) -> bool:
    """Trials the budget counts: completed, pruned, or failed on their own (not interrupted)."""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and t.user_attrs.get("status") == "failed")


def budget_reason(trials: list, sweep: SweepSpec, per_hour: float | None) -> str | None:
    """Why no further trial may start, or None while the budget lasts."""
    done = [t for t in trials if _counts(t)]
    spent = sum(float(t.user_attrs.get("spent_s", 0.0)) for t in done)
    b = sweep.budget
    if b.trials is not None and len(done) >= b.trials:
        return f"budget of {b.trials} trials reached"
    if b.minutes is not None and spent >= b.minutes * 60:
        return f"time budget of {b.minutes:g} min reached ({spent / 60:.2f} min spent)"
    if b.money is not None and per_hour is not None and spent / 3600 * per_hour >= b.money:
        return f"money budget of {b.money:g} reached ({spent / 3600 * per_hour:.4f} spent)"
    return None


def storage_url(exp: Experiment, ws: Path) -> str:
    return exp.sweep.storage if exp.sweep and exp.sweep.storage else f"sqlite:///{ws / OPTUNA_DB}"


def _make_sampler(sweep: SweepSpec, space: Space):
    import optuna

    name = sampler_class_name(sweep.strategy)
    if name == "GridSampler":
        return _GridSampler(space.grid(), seed=sweep.seed)
    try:
        return getattr(optuna.samplers, name)(seed=sweep.seed)
    except ImportError as err:  # CmaEsSampler and friends need an optional package
        raise SpecError(f"sweep.strategy {sweep.strategy} needs a package that is not installed",
                        [Problem("sweep.strategy", str(err), sweep.strategy,
                                 "install it with pip, or use tpe or random")]) from None


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid, minus its `study.stop()` after the last point: that works only inside
        `study.optimize`, and the sweep's ask/tell loop checks `is_exhausted` itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

        def unstarted(self, study) -> bool:
            """Whether a grid point is neither done nor being run (by this or another process)."""
            from optuna.trial import TrialState

            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
            taken = {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs
                     and (t.state.is_finished() or t.state == TrialState.RUNNING)}
            return len(taken) < len(self._all_grids)

        def point(self, grid_id: int) -> dict:
            """The parameters of a grid id (the grid as the parent class shuffled it)."""
            return dict(zip(self._param_names, self._all_grids[grid_id]))

    return GridSampler


def _GridSampler(search_space: dict, seed: int):
    return _grid_sampler_class()(search_space, seed=seed)


def _make_pruner(spec: PrunerSpec):
    import optuna

    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_steps)
    if spec.name == "successive_halving":  # the resource is training steps; the first rung at `every`
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.every,
                                                      reduction_factor=spec.resolved_reduction_factor)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.every, reduction_factor=spec.resolved_reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(exp: Experiment, url: str, space: Space, fingerprint: str):
    """Create or load the experiment's study; refuse one made by a different sweep section."""
    import optuna

    sw = exp.sweep
    study = optuna.create_study(storage=url, sampler=_make_sampler(sw, space), pruner=_make_pruner(sw.resolved_pruner),
                                study_name=exp.name, directions=sw.directions, load_if_exists=True)
    done = len(study.get_trials(deepcopy=False))
    if done and not is_grid(sw):  # resumed: a sampler seeded as before would first propose the points it began with
        study.sampler = _make_sampler(sw.model_copy(update={"seed": (sw.seed + done) % 2**31}), space)
    had = study.user_attrs.get("loralab_sweep")
    if had is None:
        study.set_user_attr("loralab_sweep", fingerprint)
    elif had != fingerprint:
        raise SpecError(f"study {exp.name!r} in {url} was made by a different sweep (space, strategy, objective, "
                        "seeds, model or data changed); its trials would not mean the same thing",
                        [Problem("sweep", "changed since the study began", exp.name,
                                 "give the experiment another `name:`, or use another workspace or sweep.storage")])
    return study


def recover_interrupted(study, space: Space, rep: Reporter, alive: Callable[[Any], bool] | None = None,
                        forget: Callable[[int], None] | None = None) -> list[int]:
    """Trials left RUNNING by a process that died: mark them FAIL (status interrupted, not counted)
    and enqueue their parameters, once, so the same configuration runs next. `alive(trial)` tells a
    trial another sweep process is still running (left alone) from a dead one; None: all are dead.

    A process killed between `ask` and the last `suggest` leaves some parameters unset: a grid trial
    still knows its grid point (the grid counts it as visited, so it must be re-enqueued); any other
    strategy just samples a new point. `forget(number)` drops the trial's run names, so a FAIL trial
    never names a run its retry finishes."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if alive is not None and alive(t):
            continue
        # Through the storage: optuna.Trial(study, id) would run the sampler's before_trial, and a
        # grid trial killed before it got its grid point would then take (and waste) one.
        def set_attr(key: str, value: Any, t=t) -> None:
            study._storage.set_trial_user_attr(t._trial_id, key, value)

        params = t.system_attrs.get("fixed_params") or dict(t.params)
        if len(params) < len(space.dims):
            point = getattr(study.sampler, "point", None)
            params = point(t.system_attrs["grid_id"]) if point and "grid_id" in t.system_attrs else None
        if params is not None:
            if t.number not in retried:
                study.enqueue_trial(dict(params), user_attrs={"retry_of": t.number})
            set_attr("knobs", space.knobs(params))
        set_attr("status", "interrupted")
        study.tell(t.number, state=TrialState.FAIL)
        if forget is not None:
            forget(t.number)
        out.append(t.number)
    if out:
        rep.log(f"Resuming: trial(s) {', '.join(map(str, out))} were interrupted; their configurations run again.")
    return out


# A sampler proposing only configurations already trained this many times in a row has run out of
# new ones (a small discrete space): the sweep stops instead of asking for ever.
MAX_REPEATED_PROPOSALS = 50


def duplicate_of(trials: list, knobs: dict[str, Any], alive: Callable[[Any], bool]) -> int | None:
    """The number of a trial that already has these knob values (finished, pruned, failed on its
    own, or running in a live process), or None. Every trial the budget counts is a new configuration:
    a resumed TPE sampler re-proposes its first points, and two processes may propose the same one."""
    from optuna.trial import TrialState

    for t in trials:
        if t.user_attrs.get("knobs") != knobs or t.user_attrs.get("status") == "duplicate":
            continue
        if _counts(t) or (t.state == TrialState.RUNNING and alive(t)):
            return t.number
    return None


def _fmt(knobs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items())


def _values_text(sw: SweepSpec, values: list[float] | None) -> str:
    if values is None:
        return ""
    return ", ".join(f"{o.metric} {v:.4f}" for o, v in zip(sw.objective, values))


def run_sweep(exp: Experiment, *, workspace: str | Path | None = None, reporter: Reporter | None = None,
              dry_run: bool = False) -> SweepResult:
    """Search the file's `sweep:` space with Optuna within its budget; returns the whole study's
    trials, the best configuration(s), and the compute spent and saved by pruning.

    The base model is loaded once; each trial adds a fresh adapter, trains, evaluates, stores and
    removes it. Running it again continues the study (see the module docstring)."""
    import optuna
    from optuna.trial import TrialState

    from .runner import prepare, resolve_workspace
    from .store import Store

    if exp.sweep is None:
        raise SpecError(f"{exp.source or 'experiment'}: no `sweep:` section",
                        [Problem("sweep", "missing", None, "add `sweep: {space: {lora.r: [4, 8]}, budget: {trials: 4}}`", False)])
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one progress line per trial is ours
    rep = reporter or Reporter()
    sw = exp.sweep
    space = Space(sw)
    p = prepare(exp, reporter=rep)  # everything checked before the workspace is touched
    ws = resolve_workspace(exp, workspace)
    url = storage_url(exp, ws)
    if dry_run:
        plan = make_plan(exp, p, ws, space)
        for line in plan.lines:
            rep.log(line)
        return SweepResult(ws, exp.name, url, plan=plan)
    store = Store(ws)
    start = experiment_start(exp)
    fingerprint = config_hash({"space": {k: v.model_dump() for k, v in sw.space.items()}, "strategy": sw.strategy,
                               "seed": sw.seed, "start": start, "objective": [o.model_dump() for o in sw.objective],
                               "seeds": exp.seeds_for(make_run(start, {}, "start")), "model": p.base.fingerprint,
                               "data": p.dataset.fingerprint})
    result = SweepResult(ws, exp.name, url)
    from .locks import file_lock, process_alive, process_identity
    from .store import LOCKS

    owner = process_identity()

    def alive(t) -> bool:
        return process_alive(t.user_attrs.get("owner"))

    def forget(number: int) -> None:  # an interrupted trial names no run: its retry owns the configuration's run
        store.drop_aliases(exp.name, f"trial-{number:04d}")

    def study_lock():  # creating the study, recovering and asking: one process of this workspace at a time
        return file_lock(ws / LOCKS / f"study-{config_hash([url, exp.name])}.lock")

    waited = False
    repeats = 0  # proposals in a row that repeated a configuration already trained
    try:
        with study_lock():
            study = open_study(exp, url, space, fingerprint)
            recover_interrupted(study, space, rep, alive, forget)
        per_hour = exp.cost.per_hour if exp.cost else None
        sign = {"minimize": 1.0, "maximize": -1.0}[sw.directions[0]]  # pruners read the loss in the objective's sense
        rep.log(f"Sweep {exp.name!r}: strategy {sw.strategy}, {len(space.dims)} knob(s), study in {url}")
        while True:
            with study_lock():
                trials = study.get_trials(deepcopy=False)
                reason = budget_reason(trials, sw, per_hour)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if reason is None and is_grid(sw) and not waiting and study.sampler.is_exhausted(study):
                    reason = "every grid point done"
                # The last grid points are being run by other processes: wait for them rather than repeat one.
                busy = reason is None and is_grid(sw) and not waiting and not study.sampler.unstarted(study)
                if not reason and not busy:
                    trial = study.ask()
                    trial.set_user_attr("owner", owner)
                    params = {d.param: d.suggest(trial) for d in space.dims}
                    knobs = space.knobs(params)
                    trial.set_user_attr("knobs", knobs)
                    twin = duplicate_of(trials, knobs, alive)
                    if twin is not None:  # a configuration trained (or training) already: not a new trial
                        trial.set_user_attr("status", "duplicate")
                        trial.set_user_attr("duplicate_of", twin)
                        study.tell(trial, state=TrialState.FAIL)
                        repeats += 1
                        if repeats >= MAX_REPEATED_PROPOSALS:
                            reason = (f"the search space looks exhausted: the last {repeats} proposals were all "
                                      "configurations already trained")
                        else:
                            continue
                    else:
                        repeats = 0
            if reason:
                result.stopped = reason
                break
            if busy:
                if not waited:
                    rep.log("Waiting for another sweep process to finish the last grid point(s).")
                    waited = True
                time.sleep(1.0)
                with study_lock():
                    recover_interrupted(study, space, rep, alive, forget)  # in case that process died meanwhile
                continue
            name = f"trial-{trial.number:04d}"

            def report(loss: float, step: int, trial=trial) -> bool:
                trial.report(sign * loss, step)
                return trial.should_prune()

            t0 = time.perf_counter()
            try:
                tr = run_trial(p, exp, knobs, store, name=name, reporter=rep,
                               report=report if len(sw.objective) == 1 else None)
            except KeyboardInterrupt:  # same as a dead process: this configuration runs again next time
                study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
                trial.set_user_attr("status", "interrupted")
                study.tell(trial, state=TrialState.FAIL)
                forget(trial.number)
                raise
            except SpecError:  # objective names no recorded metric: not the trial's fault, not counted
                trial.set_user_attr("status", "interrupted")
                study.tell(trial, state=TrialState.FAIL)
                raise
            spent = time.perf_counter() - t0
            for k, v in {"status": tr.status, "run_ids": tr.run_ids, "spent_s": round(spent, 3), "reused": tr.reused,
                         "steps": tr.steps, "planned_steps": tr.planned_steps, "saved_steps": tr.saved_steps,
                         "saved_s": tr.saved_s}.items():
                trial.set_user_attr(k, v)
            if tr.status == "finished":
                study.tell(trial, tr.values)
                what = _values_text(sw, tr.values)
            elif tr.status in ("pruned", "diverged"):  # stopped early because it was bad: Optuna's PRUNED
                study.tell(trial, state=TrialState.PRUNED)
                what = (f"pruned at step {tr.steps}/{tr.planned_steps}, saved {tr.saved_steps} steps (~{tr.saved_s:.1f} s)"
                        if tr.status == "pruned" else f"diverged at step {tr.steps}")
            else:
                if tr.error:
                    trial.set_user_attr("error", tr.error[-2000:])
                study.tell(trial, state=TrialState.FAIL)
                what = "failed" + (f": {tr.error.strip().splitlines()[-1]}" if tr.error else "")
            result.ran.append(trial.number)
            reused = f", reused {tr.reused} stored run(s)" if tr.reused else ""
            rep.log(f"trial {trial.number}: {_fmt(knobs)} -> {tr.status}: {what} ({spent:.1f} s{reused})")
        _finish(result, study, space, sw, per_hour, exp, rep)
        result.close_to_best = _close_to_best(result, store, exp, rep)
    finally:
        store.close()
    return result


def _close_to_best(result: SweepResult, store, exp: Experiment, rep: Reporter) -> list[int]:
    """The finished trials whose objective is within noise of the best trial's, by the report's rule
    (an interval over seeds and eval examples): the best mean alone can be a lucky seed."""
    from .comparison import _verdict

    sw = exp.sweep
    if len(sw.objective) != 1 or not result.best:
        return []
    runs = {r.id: r for r in store.list(exp.name) if r.status == "finished"}
    groups = {t.number: [runs[i] for i in t.run_ids if i in runs] for t in result.trials if t.status == "finished"}
    best = groups.get(result.best[0].number)
    if not best:
        return []
    key = sw.objective[0].metric
    if key not in best[0].metrics and "@" not in key:
        key = f"{key}@{max(best[0].config['generate']['max_new_tokens'])}"
    level = exp.evaluation.confidence
    close = [n for n, g in groups.items() if g and n != result.best[0].number
             and (v := _verdict(key, best, g, level, floors=exp.evaluation.min_effect)) is not None
             and v.label in ("within noise", "negligible")]
    if close:
        rep.log(f"Within noise of the best ({level:.0%} intervals over seeds and eval examples): "
                + ", ".join(f"trial {n}" for n in sorted(close)) + ". `loralab report` compares them.")
    return sorted(close)


def _finish(result: SweepResult, study, space: Space, sw: SweepSpec, per_hour: float | None, exp: Experiment,
            rep: Reporter) -> None:
    """Fill the result from the whole study and print the best configuration(s) and the compute."""
    frozen = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") != "duplicate"]
    result.trials = [TrialSummary.from_frozen(t, space) for t in frozen]
    counted = [TrialSummary.from_frozen(t, space) for t in frozen if _counts(t)]
    result.spent_s = sum(t.spent_s for t in counted)
    result.saved_steps = sum(t.saved_steps for t in counted)
    result.saved_s = sum(t.saved_s for t in counted)
    result.cost = result.spent_s / 3600 * per_hour if per_hour is not None else None
    best_numbers = {t.number for t in study.best_trials}
    result.best = [t for t in result.trials if t.number in best_numbers]
    n = {s: sum(t.status == s for t in counted) for s in ("finished", "pruned", "diverged", "failed")}
    rep.log(f"Sweep stopped: {result.stopped}. Trials: {n['finished']} finished, {n['pruned']} pruned, "
            f"{n['diverged']} diverged, {n['failed']} failed.")
    money = f" ({result.cost:.4f} {exp.cost.currency})" if result.cost is not None else ""
    rep.log(f"Spent {result.spent_s / 60:.2f} min{money}; stopping trials early (pruned or diverged) saved "
            f"{result.saved_steps} steps (~{result.saved_s:.1f} s).")
    title = "Best configuration" if len(sw.objective) == 1 else f"Pareto set ({len(result.best)})"
    for t in result.best:
        rep.log(f"{title}: trial {t.number}: {_fmt(t.knobs)} -> {_values_text(sw, t.values)} "
                f"(loralab show {exp.name}/trial-{t.number:04d})")


# ---------------------------------------------------------------------------------------------
# Dry run: what would run, and about how long it would take


def _throughput(ws: Path, model_fingerprint: str, n_params: int) -> tuple[float, str, float | None]:
    """Train tokens/s and eval seconds measured by finished runs of this model in the workspace."""
    from .store import DB_NAME, Store

    if (ws / DB_NAME).is_file():
        store = Store(ws, create=False)
        try:
            runs = [r for r in store.list() if r.kind == "lora" and r.status == "finished"
                    and r.model.get("fingerprint") == model_fingerprint and r.metrics.get("tokens_per_s")]
        finally:
            store.close()
        runs = list({r.id: r for r in runs}.values())
        if runs:
            tps = statistics.median(r.metrics["tokens_per_s"] for r in runs)
            return tps, f"measured: median of {len(runs)} finished run(s) in {ws}", statistics.median(
                r.metrics.get("eval_s", 0.0) for r in runs)
    flops = matmul_flops()
    tps = TRAIN_EFFICIENCY * flops / (4 * n_params)
    return tps, (f"estimated: {flops / 1e9:.0f} GFLOP/s fp32 matmul measured here / (4 x {n_params / 1e6:.0f} M "
                 f"parameters) x {TRAIN_EFFICIENCY:.0%}; no finished run of this model in the workspace yet"), None


def matmul_flops(n: int = 1024, repeats: int = 5, dtype=None, device: str = "cpu") -> float:
    """This machine's matmul rate (FLOP/s; fp32 unless `dtype`), the ceiling for training throughput."""
    import time

    import torch

    a = torch.randn(n, n, dtype=dtype or torch.float32, device=device)
    b = torch.randn(n, n, dtype=dtype or torch.float32, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def train_tokens(p, run: RunSpec) -> int:
    """About how many non-padding tokens a run trains on: planned examples x their mean length."""
    from .data import encode_example
    from .train import plan_steps

    tok = p.base.tokenizer
    lengths = [len(encode_example(tok, ex, p.dataset.system_prompt, run.train.max_seq_len).input_ids)
               for ex in p.dataset.train]
    steps = plan_steps(len(lengths), run.train)
    return int(steps * run.train.gradient_accumulation * min(run.train.batch_size, len(lengths)) * statistics.fmean(lengths))


def make_plan(exp: Experiment, p, ws: Path, space: Space) -> SweepPlan:
    sw = exp.sweep
    start = experiment_start(exp)
    seeds = len(exp.seeds_for(make_run(start, {}, "start")))
    tps, source, eval_s = _throughput(ws, p.base.fingerprint, p.base.info["params"])
    budget = sw.budget.model_dump(exclude_none=True)
    points = space.expand() if is_grid(sw) else None
    runs = [make_run(start, pt, "trial") for pt in points] if points is not None else [make_run(start, {}, "start")]
    tokens = [train_tokens(p, r) for r in runs]
    per_trial = [seeds * (t / tps + (eval_s or 0.0)) for t in tokens]
    eval_note = f" + {eval_s:.1f} s eval per run" if eval_s is not None else " (eval time not included: not measured yet)"
    lines = []
    if points is not None:
        n = min(len(points), sw.budget.trials or len(points))
        total = sum(per_trial[:n])
        lines.append(f"Dry run of sweep {exp.name!r}: grid of {len(points)} trial(s) x {seeds} seed(s)"
                     + (f", budget runs the first {n}" if n < len(points) else "") + "; nothing is trained or written.")
        for i, (pt, t) in enumerate(zip(points, tokens)):
            lines.append(f"  {i + 1:>3}. {_fmt(pt)}  (~{t:,} train tokens)")
    else:
        n = sw.budget.trials
        total = n * per_trial[0] if n else None
        lines.append(f"Dry run of sweep {exp.name!r}: strategy {sw.strategy}, budget "
                     + _budget_text(budget) + "; nothing is trained or written.")
        lines.append(f"  Per trial at the start settings: ~{tokens[0]:,} train tokens x {seeds} seed(s) "
                     f"= about {per_trial[0]:.1f} s")
    lines.append(f"  Throughput {tps:,.0f} train tokens/s ({source}){eval_note}.")
    if total is not None:
        lines.append(f"  Estimated total: about {total / 60:.1f} min for {n} trial(s), before pruning saves any.")
    if sw.budget.minutes is not None and per_trial[0] > 0:
        lines.append(f"  budget.minutes {sw.budget.minutes:g} fits about {int(sw.budget.minutes * 60 // per_trial[0])} "
                     "trial(s) at that rate.")
    return SweepPlan(sw.strategy, points, n, seeds, tokens, tps, source, eval_s, per_trial, total, budget, lines)
