"""Synchronous successive halving: trials paused at a rung, not trained to the end before their rivals.

Optuna's SuccessiveHalvingPruner is asynchronous: it judges a trial at a rung against the trials that
reached that rung before it, so the first trial of a study, having no rivals yet, trains to the end, and
so may the next ones. With one worker the sweep can do better: it asks the whole bracket (the grid, or
budget.trials trials) at once, trains every trial's first seed to the first rung (`pruner.every` steps)
and stops it there, its trainer's state kept in memory while the paused trials fit (execute.parking.park),
else in a checkpoint (execute.checkpoint); once all were measured, the best 1 in
`reduction_factor` continue from their checkpoints to the next rung, the others are stored `pruned` at
the rung they reached; the last ones train to the end (and their other seeds in full). A paused run
resumed from its checkpoint ends exactly where an uninterrupted run ends (the trainer's whole state is
kept: weights, optimizer, scheduler, data position and random generators).

It applies with one worker slot on a folder workspace (no heartbeat: the paused trials of a bracket are
this process's), a single objective, and a bracket of known size (a grid, or `budget.trials`); otherwise,
or with `pruner.synchronous: false`, the sweep keeps Optuna's asynchronous pruner."""

from __future__ import annotations

import math
import time

from loralab.config.space import is_grid
from loralab.sweep.pruning import decision_steps
from loralab.naming import trial_name
from loralab.workspace.status import Status


def synchronous(loop) -> bool:
    """Whether the sweep's trials are halved synchronously (see the module docstring)."""
    sw = loop.sw
    pr = sw.resolved_pruner
    return (pr.name == "successive_halving" and pr.synchronous and len(sw.objective) == 1
            and int(getattr(loop.worker, "slots", 1)) == 1 and str(loop.url).startswith("sqlite")
            and (is_grid(sw) or sw.budget.trials is not None))


def drive_synchronous(loop, prepared, ran: list[int], run_trial, fmt) -> str:
    """Brackets until the budget or the grid ends; returns why the sweep stopped. `run_trial` and `fmt`:
    sweep.study's (given, so this module does not import the one that imports it)."""
    while True:
        bracket, reason, busy = [], None, False
        while True:
            reason, busy, proposal = loop.propose()
            if proposal is None:
                break
            bracket.append(proposal)
        if bracket:
            run_bracket(loop, prepared, bracket, ran, run_trial, fmt)
            continue
        if reason:
            return reason
        if busy:
            loop.wait_for_others()


def run_bracket(loop, prepared, bracket: list[tuple], ran: list[int], run_trial, fmt) -> None:
    """Every trial to each rung in turn; the best 1 in reduction_factor go on, the last ones to the end.
    Paused trials wait in memory while they fit (execute.parking.park), else in their checkpoints."""
    from loralab.execute.parking import unpark

    prepared.park_bytes = park_budget(prepared, loop.worker)
    try:
        _halve(loop, prepared, bracket, ran, run_trial, fmt)
    finally:  # stopped midway (Ctrl-C, an error): paused trials still in memory go to their checkpoints
        unpark(prepared)
        prepared.park_bytes = 0


def park_budget(prepared, worker) -> int:
    """Bytes paused trials may keep in memory between rungs: a quarter of what is free on the model's
    device, at most 2 GiB (on CPU), when the trials run in this process; else 0 (checkpoints only)."""
    import psutil
    import torch

    from loralab.execute.local import LocalExecutor

    if not isinstance(worker, LocalExecutor) or worker.prepared is not prepared:
        return 0
    if prepared.base.device.type == "cuda":
        return int(torch.cuda.mem_get_info(prepared.base.device)[0] // 4)
    return int(min(psutil.virtual_memory().available // 4, 2 << 30))


def _halve(loop, prepared, bracket: list[tuple], ran: list[int], run_trial, fmt) -> None:
    from loralab.config.space import experiment_start, make_run
    from loralab.engine.train import plan_steps

    exp, sw, rep = loop.exp, loop.sw, loop.rep
    pr = sw.resolved_pruner
    start = experiment_start(exp)
    n_train = len(prepared.dataset.train)
    planned = {t.number: plan_steps(n_train, make_run(start, knobs, "p").train) for t, _, knobs in bracket}
    rungs = decision_steps(pr, max(planned.values()))
    spent = {t.number: 0.0 for t, _, _ in bracket}
    alive = list(bracket)
    rep.log(f"Successive halving, synchronous: {len(alive)} trial(s) to rung steps {', '.join(map(str, rungs)) or '-'} "
            f"(1 in {pr.resolved_reduction_factor} goes on at each)")
    numbers = {t.number for t, _, _ in bracket}
    for rung in rungs:
        if len(alive) <= 1 and not earlier_values(loop.study, rung, numbers):  # no rival measured there
            break
        measured = []
        for entry in alive:
            trial, params, knobs = entry
            if planned[trial.number] <= rung:  # it ends before this rung: it is judged by its objective
                measured.append((None, entry, None))
                continue
            t0 = time.perf_counter()
            with loop.beat(trial):
                tr = run_trial(prepared, exp, knobs, loop.store, name=trial_name(trial.number), reporter=rep,
                               executor=loop.worker, pause_at=rung)
            spent[trial.number] += time.perf_counter() - t0
            if tr.status == "paused":
                trial.report(loop.sign * tr.rung_loss, rung)
                measured.append((loop.sign * tr.rung_loss, entry, tr))
            else:  # finished early, diverged or failed at its first seed: told as it ended
                _tell(loop, trial, tr, spent[trial.number], ran)
        ranked = sorted((m for m in measured if m[0] is not None), key=lambda m: m[0])
        known = earlier_values(loop.study, rung, numbers)
        goes_on = kept(ranked, known, pr.resolved_reduction_factor)
        dropped = ranked[goes_on:]
        for _, (trial, _, _), tr in dropped:
            _drop(loop, prepared, trial, tr, rung, spent[trial.number], ran)
        alive = [e for _, e, _ in ranked[:goes_on]] + [e for v, e, _ in measured if v is None]
        if dropped:
            also = f" (ranked with {len(known)} earlier trial(s) measured there)" if known else ""
            names = ", ".join(f"trial {e[0].number}" for _, e, _ in ranked[:goes_on]) or "none"
            verb = "goes on" if goes_on == 1 else "go on"
            rep.log(f"rung at step {rung}: {len(ranked)} trial(s) measured{also}; {names} {verb}, {len(dropped)} pruned")
    for trial, params, knobs in alive:
        ran.append(loop.execute(prepared, trial, params, knobs, prune=False, earlier_s=spent[trial.number]))
        rep.log(f"trial {trial.number}: {fmt(knobs)} trained to the end")


def earlier_values(study, step: int, bracket: set[int]) -> list[float]:
    """The values at `step` of the study's finished and pruned trials outside this bracket (an earlier
    bracket, or runs the study started from: sweep.warm), in the sense the pruner reads them."""
    from optuna.trial import TrialState

    return [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
            if t.number not in bracket and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and step in t.intermediate_values]


def kept(ranked: list, known: list[float], reduction_factor: int) -> int:
    """How many of the bracket's `ranked` trials (best first) go on from a rung: the best 1 in
    `reduction_factor` of every trial measured there, the earlier ones (`known`) included, so a bracket
    of a few new points (a widened space) goes on only with those that would have made the cut among
    all. At least one goes on when nothing earlier was measured there."""
    if not known:
        return max(1, math.ceil(len(ranked) / reduction_factor))
    n = max(1, math.ceil((len(ranked) + len(known)) / reduction_factor))
    cut = sorted([v for v, _, _ in ranked] + list(known))[n - 1]
    return sum(1 for v, _, _ in ranked if v <= cut)


def _tell(loop, trial, tr, spent: float, ran: list[int]) -> None:
    for k, v in {"status": tr.status, "run_ids": tr.run_ids, "spent_s": round(spent, 3), "reused": tr.reused,
                 "steps": tr.steps, "planned_steps": tr.planned_steps}.items():
        trial.set_user_attr(k, v)
    loop.tell(trial, tr)
    ran.append(trial.number)


def _drop(loop, prepared, trial, tr, rung: int, spent: float, ran: list[int]) -> None:
    """A trial that did not make the rung: its first seed's run stays stored `pruned` at the rung (what it
    measured there), its checkpoint goes, and Optuna is told PRUNED."""
    from optuna.trial import TrialState

    from loralab.execute.checkpoint import Checkpoints

    from loralab.execute.parking import unpark

    rid = tr.run_ids[0]
    unpark(prepared, rid, keep=False)
    Checkpoints(loop.store.run_dir(rid), None).remove()
    rec = loop.store.get(rid)
    m = rec.metrics if rec is not None else {}
    for k, v in {"status": Status.PRUNED, "run_ids": [rid], "spent_s": round(spent, 3), "reused": tr.reused,
                 "steps": rung, "planned_steps": int(m.get("planned_steps", 0)),
                 "saved_steps": int(m.get("saved_steps", 0)), "saved_s": float(m.get("saved_s", 0.0))}.items():
        trial.set_user_attr(k, v)
    loop.study.tell(trial, state=TrialState.PRUNED)
    ran.append(trial.number)
