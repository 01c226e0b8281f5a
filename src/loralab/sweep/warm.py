"""A study that starts from what the workspace knows.

Finished runs (and pruned ones) of the same model, data and evaluation whose settings are a point of
the sweep's space are added to its Optuna study as completed (or pruned) trials before it proposes new
points, so widening a space or adding a knob pays only for the new points. A run is such a point when
its stored id is the id the sweep would give that point's run (execute.identity.run_id): the same base,
data, system prompt, device, dtype, every LoRA/train/generate setting and the same evaluation; a run
measured fully also stands for a loss-only trial (it measured the losses the same way, and more).

Added trials carry `from_workspace` and count for the search (the sampler learns from them, a grid
skips them) but not against `budget.trials` (sweep.study.counts_in_budget), nor as time spent."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from loralab.config.schema import Experiment
from loralab.config.space import Space, experiment_start, make_run, needs_full_eval, needs_probe, objective_value
from loralab.errors import LoralabError
from loralab.naming import trial_name
from loralab.workspace.status import Status


@dataclass
class Point:
    """One configuration of the space the workspace measured: its knobs, parameters and runs by seed."""

    knobs: dict[str, Any]
    params: dict[str, Any]
    runs: dict[int, Any] = field(default_factory=dict)  # seed -> RunRecord


def _value_at(config: dict, path: str) -> Any:
    section, _, key = path.partition(".")
    v = (config.get(section) or {}).get(key)
    if path == "generate.max_new_tokens" and isinstance(v, list):
        return v[0] if len(v) == 1 else None
    return v


def _inside(dim, v: Any) -> Any:
    """The parameter value `v` as the dimension would suggest it, or None when it is not a point of it."""
    k = dim.knob
    if v is None or isinstance(v, bool) and k.values is None:
        return None
    if k.values is not None:
        for c in k.values:
            same = (c == v) if not (isinstance(c, float) or isinstance(v, float)) else (
                isinstance(c, (int, float)) and isinstance(v, (int, float)) and not isinstance(c, bool)
                and math.isclose(float(c), float(v), rel_tol=1e-9, abs_tol=1e-12))
            if same:
                return c
        return None
    if not isinstance(v, (int, float)) or not (k.low - 1e-12 <= v <= k.high + 1e-12):
        return None
    if dim.is_int:
        if float(v) != int(v) or (k.step and (int(v) - int(k.low)) % int(k.step)):
            return None
        return int(v)
    if k.step and not math.isclose(((v - k.low) / k.step) % 1, 0, abs_tol=1e-9) and \
            not math.isclose(((v - k.low) / k.step) % 1, 1, abs_tol=1e-9):
        return None
    return float(v)


def _params_of(space: Space, config: dict) -> tuple[dict, dict] | None:
    """(knob values, Optuna parameters) of a stored run's config in this space, or None if outside it."""
    knobs, params = {}, {}
    for d in space.dims:
        v = _value_at(config, d.path)
        if d.knob.ratio_of:
            base = _value_at(config, d.knob.ratio_of)
            if not isinstance(v, (int, float)) or not isinstance(base, (int, float)) or not base:
                return None
            p = _inside(d, v / base)
        else:
            p = _inside(d, v)
        if p is None:
            return None
        params[d.param] = p
    knobs = space.knobs(params)
    return knobs, params


def measured_points(exp: Experiment, prepared, store, space: Space) -> list[Point]:
    """The configurations of the space that stored runs of this model, data and evaluation measured."""
    from loralab.execute.identity import run_id

    full, probe = needs_full_eval(exp.sweep), needs_probe(exp.sweep)
    start = experiment_start(exp)
    points: dict[str, Point] = {}
    for rec in store.all_runs(light=True):  # every row, aliased or not; samples and curves left unread
        if rec.kind != "lora" or rec.status not in (Status.FINISHED, Status.PRUNED) or rec.seed is None:
            continue
        if rec.model.get("fingerprint") != prepared.base.fingerprint or rec.data.get("fingerprint") != prepared.dataset.fingerprint:
            continue
        found = _params_of(space, rec.config)
        if found is None:
            continue
        knobs, params = found
        try:
            run = make_run(start, knobs, "warm").with_seed(rec.seed)
        except (ValueError, LoralabError):
            continue
        ids = {run_id(prepared, run, full, probe), run_id(prepared, run, True, True)}
        if rec.id not in ids:
            continue
        key = repr(sorted(knobs.items()))
        pt = points.setdefault(key, Point(knobs, params))
        prev = pt.runs.get(rec.seed)
        if prev is None or (prev.status != Status.FINISHED and rec.status == Status.FINISHED):
            pt.runs[rec.seed] = rec
    return list(points.values())


def warm_start(study, exp: Experiment, prepared, store, space: Space, rep, *, add: bool = True) -> list[int]:
    """Add the measured points the study does not have as trials (see the module docstring); returns the
    numbers of the trials added (with add=False: says what would be added, adds nothing)."""
    import optuna
    from optuna.trial import TrialState

    sw = exp.sweep
    start = experiment_start(exp)
    present = {repr(sorted((t.user_attrs.get("knobs") or {}).items())) for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)}
    dists = _distributions(space)
    pruner = sw.resolved_pruner
    sign = -1.0 if sw.directions[0] == "maximize" else 1.0  # intermediate values in the objective's sense
    added, finished, pruned = [], 0, 0
    for pt in measured_points(exp, prepared, store, space):
        if repr(sorted(pt.knobs.items())) in present:
            continue
        run = make_run(start, pt.knobs, "warm")
        seeds = exp.seeds_for(run)
        recs = [pt.runs.get(s) for s in seeds]
        first = recs[0]
        if first is None:
            continue
        user = {"knobs": pt.knobs, "from_workspace": True, "spent_s": 0.0, "reused": len([r for r in recs if r])}
        if all(r is not None and r.status == Status.FINISHED for r in recs):
            try:
                values = [statistics.fmean(objective_value(r.metrics, o, run) for r in recs) for o in sw.objective]
            except LoralabError:
                continue
            state, inter = TrialState.COMPLETE, rung_values(first, pruner, prepared, sign)
            user.update(status=Status.FINISHED, run_ids=[r.id for r in recs])
        elif first.status == Status.PRUNED and len(sw.objective) == 1 and pruner.name != "none" and \
                isinstance(first.metrics.get("pruned_loss"), (int, float)) and \
                first.metrics.get("pruned_loss_examples") == judged_on(pruner, prepared, first.metrics.get("pruned_step")):
            values, state = None, TrialState.PRUNED
            inter = {**rung_values(first, pruner, prepared, sign),
                     int(first.metrics["pruned_step"]): sign * float(first.metrics["pruned_loss"])}
            user.update(status=Status.PRUNED, run_ids=[first.id], steps=int(first.metrics["pruned_step"]))
        else:
            continue
        if not add:
            added.append(-1)
            finished += state == TrialState.COMPLETE
            pruned += state == TrialState.PRUNED
            continue
        system = {}
        if hasattr(study.sampler, "grid_attrs"):  # a grid: the point counts as visited
            system = study.sampler.grid_attrs(pt.params)
            if system is None:
                continue
        study.add_trial(optuna.trial.create_trial(state=state, values=values, params=pt.params, distributions=dists,
                                                  user_attrs=user, system_attrs=system, intermediate_values=inter))
        number = study.get_trials(deepcopy=False)[-1].number
        for r in recs if state == TrialState.COMPLETE else [first]:
            store.alias(exp.name, trial_name(number), r.id, r.seed)
        added.append(number)
        finished += state == TrialState.COMPLETE
        pruned += state == TrialState.PRUNED
    if added:
        verb = "added to the study" if add else "would be added to the study (not trained again)"
        rep.log(f"Started from the workspace: {len(added)} point(s) of this space already measured "
                f"({finished} finished, {pruned} pruned) {verb}; they count for the search, not against the budget.")
    return added


def judged_on(pruner, prepared, step) -> int | None:
    """How many eval examples this sweep's pruner measures its loss at `step` on (sweep.pruning)."""
    from loralab.sweep.pruning import rung_examples

    return rung_examples(pruner, int(step), len(prepared.dataset.eval)) if isinstance(step, (int, float)) else None


def rung_values(rec, pruner, prepared, sign: float) -> dict[int, float]:
    """The held-out losses a stored trial's pruner measured at its decision steps, as the study's
    intermediate values, each one only when measured on the eval examples this sweep's pruner judges on at
    that step (losses over other examples do not rank against this sweep's)."""
    m = rec.metrics
    counts = m.get("rung_loss_examples") or {}
    return {int(k): sign * float(v) for k, v in (m.get("rung_losses") or {}).items()
            if isinstance(counts, dict) and counts.get(k) == judged_on(pruner, prepared, int(k))}


def _distributions(space: Space) -> dict:
    """Each parameter's Optuna distribution, as Dimension.suggest would create it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for d in space.dims:
        k = d.knob
        if k.values is not None:
            out[d.param] = CategoricalDistribution(k.values)
        elif d.is_int:
            out[d.param] = IntDistribution(int(k.low), int(k.high), log=k.log, step=int(k.step or 1))
        else:
            out[d.param] = FloatDistribution(k.low, k.high, log=k.log, step=k.step)
    return out
