"""The report: goal and setup, the runs, the main differences, confounds, per-knob effects, pictures,
samples side by side, what we learned and a TL;DR, written from the stored evidence as Markdown
(`report.md`, plots in `plots/`) and as one self-contained HTML page (`report.html`, plots inline).

Every number comes from the workspace; every sentence comes from the rules in `findings`. Model outputs
are untrusted text: the HTML template escapes everything (autoescape), and the Markdown template
escapes every value by default (`md_text`), so an answer holding `<script>` or `|` stays text.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.analysis import ablate as ablate_mod
from loralab.analysis import findings as fnd
from loralab.report import plots as plots_mod
from loralab.analysis.ablate import Effect
from loralab.analysis.comparison import (Comparison, _md_cell, _norm, verdict_of, caps_of, cell_estimate, compare, evaluation_of, fmt_estimate, fmt_value,
                         fmt_verdict, knobs, legend, to_markdown)
from loralab.errors import Problem, RunNotFound, SpecError
from loralab.config.schema import Experiment, cost_of
from loralab.workspace.status import Status
from loralab.workspace.store import DB_NAME, DONE, OPTUNA_DB, RunRecord, Store, is_url, shown
from loralab.naming import is_trial, trial_name

DEFAULT_SAMPLES = 4
STARRED = ("An interval marked * excludes 0 on its own, but not once the other questions asked of the same runs are "
           "counted (Benjamini-Hochberg): within noise.")
MAX_CURVES = 24  # loss curves drawn; a long sweep would be a tangle beyond this


# ---------------------------------------------------------------------------------------------
# Which runs a report covers


@dataclass
class Sources:
    """The runs behind a report: those compared in the main table, plus ablations and sweep trials."""

    title: str
    goal: str
    workspace: Path
    chosen: list[list[RunRecord]]  # base first when stored, then the compared runs
    ablations: list[tuple[str, list[list[RunRecord]]]] = field(default_factory=list)  # (label, groups A … B)
    trials: list[list[RunRecord]] = field(default_factory=list)
    confirmations: list[list[RunRecord]] = field(default_factory=list)  # fresh-seed reruns (findings.CONFIRMS)
    experiment: Experiment | None = None
    study: Any = None  # the sweep's Optuna study, when there is one
    notes: list[str] = field(default_factory=list)
    reproduce: list[str] = field(default_factory=list)  # the commands that make these runs and this report


def group_by_name(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Records by run name, seeds in order; names in the order of their first (oldest) run."""
    out: dict[str, list[RunRecord]] = {}
    for r in sorted(records, key=lambda r: (r.created_at, r.seed if r.seed is not None else -1)):
        out.setdefault(r.name, []).append(r)
    return {k: sorted(v, key=lambda r: r.seed if r.seed is not None else -1) for k, v in out.items()}


def goal_from_file(path: str | None) -> str:
    """The file's leading comment block, minus its `Run it:` line: where example files state their purpose."""
    if not path or not Path(path).is_file():
        return ""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.lower().startswith("run it:"):
            continue
        lines.append(text)
    return " ".join(" ".join(lines).split())


def _open(ws: Path | str) -> Store:
    if not is_url(ws) and not (Path(ws) / DB_NAME).is_file():  # a database workspace: Store says what is missing
        raise RunNotFound(f"no loralab workspace at {ws}",
                          [Problem("workspace", "no loralab.db in this folder", str(ws),
                                   "run the experiment first (`loralab run FILE`), or pass --workspace DIR")])
    return Store(ws, create=False)


def from_file(exp: Experiment, workspace: str | Path | None = None) -> Sources:
    """The runs of an experiment file as stored: base and the file's runs (every stored seed whose
    settings still match the file), its sweep trials, and the ablations `loralab ablate` made of it."""
    from loralab.execute.prepare import resolve_workspace

    ws = resolve_workspace(exp, workspace)
    with _open(ws) as store:
        everything = store.list()
    own = {name: kept for name, g in group_by_name([r for r in everything if r.experiment == exp.name]).items()
           if (kept := settled(g, []))}
    src = Sources(title=exp.name, goal=goal_from_file(exp.source), workspace=ws, chosen=[], experiment=exp)
    for name in [r.name for r in exp.resolved_runs]:
        settled([r for r in everything if r.experiment == exp.name and r.name == name], src.notes)
    if "base" in own:
        src.chosen.append(own["base"])
    missing = []
    for run in exp.resolved_runs:
        group = own.get(run.name)
        if not group:
            missing.append(run.name)
            continue
        want = ablate_mod.run_knobs(run)
        keep = [r for r in group if _same(knobs(r), want)]
        if len(keep) < len(group):
            src.notes.append(f"{run.name}: {len(group) - len(keep)} stored seed(s) were trained with other settings "
                             "than the file's (an earlier version of the file) and are left out.")
        if keep:
            src.chosen.append(keep)
        else:
            missing.append(run.name)
    if exp.sweep is not None:
        if not src.goal:
            objectives = " and ".join(o.metric for o in exp.sweep.objective)
            src.goal = (f"Search {', '.join(exp.sweep.space)} ({exp.sweep.strategy}) for the best {objectives}: "
                        "which knobs matter, and what the best settings cost.")
        src.trials = [g for name, g in sorted(own.items()) if is_trial(name)]
        src.study = _load_study(exp, ws, src.notes)
        for name in _best_trials(src.study):
            g = own.get(name)
            if g and g not in src.chosen:
                src.chosen.append(g)
    src.confirmations = [g for _, g in sorted(own.items()) if fnd.confirmation_of(g)]
    if missing and (exp.sweep is None or exp.runs):
        src.notes.append(f"No outcome in the workspace yet for: {', '.join(missing)} (`loralab run {exp.source or 'FILE'}`).")
    for name in sorted({r.experiment for r in everything}):
        found = ablate_mod.ablation_of(exp.name, name)
        if found is None:
            continue
        a, b, design = found
        groups = [kept for n, g in group_by_name([r for r in everything if r.experiment == name]).items()
                  if n != "base" and (kept := settled(g, src.notes))]
        src.ablations.append((f"{'one knob at a time' if design == 'ofat' else 'factorial'} ablation of {a} vs {b}",
                              ablation_order(groups, a, b)))
    src.reproduce = _commands(exp, src)
    if not src.chosen and not src.trials:
        raise RunNotFound(f"no runs of experiment {exp.name!r} in workspace {shown(ws)}",
                          [Problem("experiment", "nothing stored for this file yet", exp.source or exp.name,
                                   f"run it first: loralab run {exp.source or 'FILE'}")])
    return src


def _commands(exp: Experiment, src: Sources) -> list[str]:
    """`loralab` commands that give these runs again (run ids make done runs free), then this report."""
    file = exp.source or "FILE"
    seeds = max((len(g) for g in src.chosen + [g for _, gs in src.ablations for g in gs] if g[0].kind == "lora"),
                default=1)
    repeats = f" --repeats {seeds}" if exp.seeds is None and seeds > exp.repeats else ""
    out = [f"loralab {'sweep' if exp.sweep is not None and not exp.runs else 'run'} {file}{repeats}"]
    for label, groups in src.ablations:
        a, b = groups[0][0].name, groups[-1][0].name
        out.append(f"loralab ablate {file} {a} {b} --design {'ofat' if label.startswith('one') else 'factorial'}"
                   f"{repeats} --run")
    return out + [f"loralab report {file}"]


def ablation_order(groups: list[list[RunRecord]], a: str, b: str) -> list[list[RunRecord]]:
    """An ablation's runs as its plan lists them: A, then by how many knobs moved and which (in A's knob
    order), then B. Stored times cannot order them: runs trained in the same second tie."""
    start = next((g for g in groups if g[0].name == a), None)
    if start is None:
        return groups
    ka = ablate_mod.trained_knobs(knobs(start[0]))
    order = list(ka)

    def key(g: list[RunRecord]):
        if g[0].name == b:
            return (1, 0, [])
        moved = ablate_mod.differing(ka, ablate_mod.trained_knobs(knobs(g[0])))
        return (0, len(moved), [order.index(k) if k in order else len(order) for k in moved])

    return sorted(groups, key=key)


def settled(group: list[RunRecord], notes: list[str]) -> list[RunRecord]:
    """The seeds with an outcome (finished, diverged, pruned); running, interrupted and failed ones are
    left out, with a note, so a report written while runs train says only what is known."""
    keep = [r for r in group if r.status in DONE]
    for r in group:
        if r.status not in DONE:
            seed = f" seed {r.seed}" if r.seed is not None else ""
            notes.append(f"{r.experiment}/{r.name}{seed} is {r.status}: left out"
                         + (" (see `loralab show`)." if r.status == Status.FAILED else " until it finishes."))
    return keep


def _same(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(_norm(stored.get(k)) == _norm(v) for k, v in wanted.items() if k != "train.seed")


def _load_study(exp: Experiment, ws: Path, notes: list[str]):
    from loralab.sweep.study import storage_url

    url = storage_url(exp, ws)
    if url.startswith("sqlite:///") and not (Path(ws) / OPTUNA_DB).is_file() and not exp.sweep.storage:
        notes.append("The sweep has not run yet: no Optuna study in the workspace.")
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=exp.name, storage=url)
    except KeyError:
        notes.append(f"No Optuna study named {exp.name!r} in {shown(url)}.")
    except Exception as err:  # an unreachable or broken storage costs the importances, not the report
        notes.append(f"The sweep's Optuna study could not be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
                     "no parameter importances.")
    return None


def _best_trials(study, limit: int = 3) -> list[str]:
    """The sweep's best trials for the main table: the top `limit` on one objective, or its Pareto set."""
    if study is None:
        return []
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) == 1:
        sign = 1 if study.direction == StudyDirection.MINIMIZE else -1
        best = sorted(done, key=lambda t: sign * t.value)
    else:
        best = study.best_trials
    return [trial_name(t.number) for t in best[:limit]]


def from_runs(refs: list[str], workspace: str | Path | None = None) -> Sources:
    """Chosen runs by name or id, seeds pooled; the untrained base of the first run's experiment is
    added in front when it is stored, as the reference point of every table."""
    from loralab.workspace.store import workspace_path

    ws = workspace_path(workspace)
    notes: list[str] = []
    with _open(ws) as store:
        chosen = []
        for ref in refs:
            group = settled(store.group(ref), notes)
            if not group:
                raise RunNotFound(f"run {ref!r} has no outcome yet", [Problem("RUN", "running, interrupted or failed", ref,
                                                                              "wait until it finishes, or rerun it")])
            chosen.append(group)
        names = [g[0].name for g in chosen]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise SpecError("the same run is named twice", [Problem("RUN", "given twice", dup, "name each run once")])
        if not any(g[0].kind == "base" for g in chosen):
            try:
                base = store.group("base", chosen[0][0].experiment)
                chosen.insert(0, base)
            except RunNotFound:
                pass
    return Sources(title=", ".join(names), goal="", workspace=ws, chosen=chosen, notes=notes)


# ---------------------------------------------------------------------------------------------
# The report's content


@dataclass
class RunsTable:
    columns: list[str]  # the knobs that differ between runs
    rows: list[dict[str, Any]]  # name, origin, seeds, status, values (one per column), metric
    shared: list[tuple[str, str]]  # knobs every run has the same value of
    metric_label: str


@dataclass
class Answer:
    run: str
    texts: list[tuple[int, str, int, bool]]  # (cap, text, tokens, stopped) per cap
    segments: list[tuple[str, int | None]]  # the largest cap's text cut where each smaller cap ends
    rouge: float | None


@dataclass
class Sample:
    id: str
    prompt: str
    reference: str
    answers: list[Answer]


@dataclass
class EffectColumn:
    knob: str
    change: str  # "0.0002 → 0.0005"
    source: str  # which runs measured it
    seeds: int


@dataclass
class EffectMatrix:
    """Section 5: one column per knob change, one row per headline metric; a cell is the effect with its
    interval and a class: better / worse (the metric has a good direction), changed, noise, untested."""

    columns: list[EffectColumn]
    rows: list[tuple[str, str, list[tuple[str, str] | None]]]  # (topic, metric label, cells)


def verdict_class(label: str, metric: str) -> str:
    if label in ("within noise", "negligible"):
        return "noise"
    if label not in ("higher", "lower"):
        return "untested"
    better = fnd.better_of(metric)
    return "changed" if better is None else ("better" if label == better else "worse")


@dataclass
class Report:
    title: str
    goal: str
    generated: str
    level: float
    setup: list[tuple[str, str]]
    runs: RunsTable
    comparison: Comparison
    confounds: list[fnd.Finding]
    effects: list[Effect]
    matrix: EffectMatrix
    importances: dict[str, list[fnd.Importance]]
    legend: list[str]
    starred: str  # what an interval marked * means, when a finding shows one
    plots: list[plots_mod.Plot]
    samples: list[Sample]
    caps: list[int]
    learned: list[fnd.Finding]
    beliefs: list[fnd.Finding]
    tldr: fnd.TLDR
    notes: list[str]
    metric: str

    @property
    def effect_plots(self) -> list[plots_mod.Plot]:
        return [p for p in self.plots if p.name.startswith("effect-")]

    @property
    def other_plots(self) -> list[plots_mod.Plot]:
        return [p for p in self.plots if not p.name.startswith("effect-")]


def _trained(groups: list[list[RunRecord]]) -> list[list[RunRecord]]:
    return [g for g in groups if g and g[0].kind == "lora"]


def _finished(g: list[RunRecord]) -> bool:
    return all(r.status == Status.FINISHED for r in g)


def _dedupe(groups: list[list[RunRecord]]) -> list[list[RunRecord]]:
    """One group per set of run ids: the same runs reached by two names (A in the file and in its ablation)."""
    seen, out = set(), []
    for g in groups:
        key = frozenset(r.id for r in g)
        if key not in seen:
            seen.add(key)
            out.append(g)
    return out


def resolve_metric(metric: str | None, src: Sources, caps: list[int], present: set[str]) -> str:
    """The metric the TL;DR ranks by: as given, else the sweep's first objective, else eval loss. A
    per-cap metric named without its cap (rouge_l) means the largest cap, as in a sweep objective."""
    exp = src.experiment
    m = metric or (exp.sweep.objective[0].metric if exp is not None and exp.sweep is not None else "eval_loss")
    if m not in present and "@" not in m and caps and f"{m}@{max(caps)}" in present:
        m = f"{m}@{max(caps)}"
    if m not in present:
        raise SpecError(f"no stored run measured {m!r}",
                        [Problem("--metric", "unknown metric", m,
                                 f"use one of: {', '.join(sorted(k for k in present if not k.endswith('_s'))[:40])}")])
    return m


def build(src: Sources, *, metric: str | None = None, samples: int = DEFAULT_SAMPLES, goal: str | None = None) -> Report:
    """Everything the report says, computed once; the templates only lay it out."""
    chosen = src.chosen
    everything = _dedupe(chosen + [g for _, gs in src.ablations for g in gs] + src.trials + src.confirmations)
    records = [r for g in everything for r in g]
    ref = next((g for g in chosen if g[0].kind == "lora"), None) or next(iter(_trained(everything)), None)
    ev = (ref or everything[0])[0].config.get("evaluation") or {}
    level = ev.get("confidence", 0.95)
    caps = caps_of(records)
    present = {k for r in records for k, v in r.metrics.items() if isinstance(v, (int, float))}
    metric = resolve_metric(metric, src, caps, present)
    floors = ev.get("min_effect") or {}
    c = compare(chosen, level=level, floors=floors)
    currency = c.currency
    headline = [m for m in fnd.headline_metrics(caps) if m in present]

    # Effects: designed ablations first (the strongest evidence), then pairs among the compared runs,
    # then the caps. One effect per knob change and metric.
    effects: list[Effect] = []
    for _, groups in src.ablations:
        effects += ablate_mod.knob_effects(groups, headline, level=level, floors=floors)
    effects += ablate_mod.knob_effects(_trained(chosen), headline, level=level, floors=floors)
    if ref is not None and _finished(ref):
        effects += ablate_mod.cap_effects(ref, caps, list(fnd.CAP_METRICS), level=level,
                                          floors=floors)
    effects = _unique_effects(effects)

    confounds = fnd.find_confounds(c, headline)
    conf_findings = []
    for conf in confounds:
        conf_findings += fnd.confound_findings(conf, effects, level, _plan_text(src, conf.a, conf.b))

    importances = _importances(src)
    n_complete = _n_complete(src.study)
    # The Confounds section states the confounds and their credit; what we learned does not repeat them.
    learned = (fnd.answer_findings(c) + fnd.base_findings(c, headline) + fnd.gap_findings(c, level)
               + fnd.training_findings(_trained(chosen), level) + fnd.effect_findings(_ordered(effects), level)
               + fnd.importance_findings(importances, n_complete, IMPORTANCE_RESAMPLES) + _edge_findings(src))
    beliefs = fnd.belief_findings(effects, level)
    pool = _dedupe([g for g in chosen if g[0].kind == "base"] + _trained(everything))
    tl = fnd.tldr(pool, metric, level=level, currency=currency, floors=floors, comparison=c)

    return Report(
        title=src.title, goal=goal or src.goal or _default_goal(chosen),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), level=level,
        setup=_setup(src, records, currency), runs=_runs_table(chosen, everything, metric, level),
        comparison=c, confounds=conf_findings, effects=effects,
        matrix=effect_matrix(effects), importances=importances, legend=legend(c),
        starred=STARRED if any("]*" in f.text for f in learned + beliefs + conf_findings) else "",
        plots=_plots(chosen, everything, effects, caps, metric, level, currency, headline),
        samples=_samples(chosen, samples, caps), caps=caps, learned=learned, beliefs=beliefs, tldr=tl,
        notes=list(src.notes), metric=metric)


def _unique_effects(effects: list[Effect]) -> list[Effect]:
    """One effect per knob change and metric: the first found (designs before pairs), unless the same kind
    of evidence measured it on more seeds later (two ablations sharing a run, `repeats: auto`)."""
    where: dict[tuple, int] = {}
    out: list[Effect] = []
    for e in effects:
        key = (e.knob, _norm(e.low), _norm(e.high), e.note, e.metric)  # r with alpha/r kept or alpha held: two effects
        if key not in where:
            where[key] = len(out)
            out.append(e)
        elif out[where[key]].design == e.design and e.seeds > out[where[key]].seeds:
            out[where[key]] = e
    return out


def _ordered(effects: list[Effect]) -> list[Effect]:
    """By headline topic (quality first); within a topic, in the order found (designs first, then knobs)."""
    topics = [h.topic for h in fnd.HEADLINES]
    return sorted(effects, key=lambda e: (topics.index(fnd.topic_of(e.metric)) if fnd.topic_of(e.metric) in topics
                                          else len(topics)))


def _default_goal(chosen: list[list[RunRecord]]) -> str:
    names = [g[0].name for g in chosen if g[0].kind != "base"]
    data = chosen[0][0].data.get("name", "the data") if chosen else "the data"
    return (f"Compare {', '.join(names)}" + (" against the untrained base" if any(g[0].kind == "base" for g in chosen)
                                             else "") + f" on {data}: which settings help, by how much, at what cost.")


def _plan_text(src: Sources, a: str, b: str) -> str:
    """The ablate command for a confounded pair, with what each design would train."""
    exp = src.experiment
    file = exp.source if exp is not None and exp.source else "FILE"
    cmd = f"`loralab ablate {file} {a} {b} --design ofat --run`"
    if exp is None:
        return cmd
    try:
        ofat, fact = (ablate_mod.plan(exp, a, b, d, workspace=src.workspace) for d in ("ofat", "factorial"))
    except SpecError:  # a or b is no longer in the file
        return cmd
    kind = "full factorial" if fact.resolution is None else f"resolution {ablate_mod.roman(fact.resolution)} fraction"
    return (f"{cmd} trains {len(ofat.new_runs)} new run(s) × {len(ofat.seeds)} seed(s), one knob at a time from {a}; "
            f"`--design factorial` trains {len(fact.new_runs)} × {len(fact.seeds)}, every knob at both values "
            f"({kind}), and averages each effect over the others")


IMPORTANCE_RESAMPLES = 50  # bootstrap resamples of the trials behind each importance's range


def _importances(src: Sources, resamples: int = IMPORTANCE_RESAMPLES) -> dict[str, list[fnd.Importance]]:
    """Optuna's parameter importances per objective, each with its 5-95% range over bootstrap resamples
    of the completed trials; none (and a note saying why) below fnd.min_trials_for_importance."""
    study = src.study
    if study is None:
        return {}
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    # Only knobs that took more than one value count (a knob the sampler never moved has no importance to find)
    knobs_ = sorted(k for k in {k for t in done for k in t.params} if len({repr(t.params.get(k)) for t in done}) > 1)
    need = fnd.min_trials_for_importance(len(knobs_))
    if len(done) < need:
        src.notes.append(f"Parameter importances not shown: {len(done)} completed trial(s), and {need} are needed for "
                         f"{len(knobs_)} searched knob(s) (8 per knob, 16 at least: below that the importance of each "
                         f"knob swings from one resample of the trials to the next)"
                         + (f"; {pruned} pruned trial(s) do not count" if pruned else "") + ".")
        return {}
    out = {}
    objectives = [o.metric for o in src.experiment.sweep.objective] if src.experiment and src.experiment.sweep else ["objective"]
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(done), len(done)) for _ in range(resamples)]
    for i, name in enumerate(objectives):
        target = (lambda t, i=i: t.values[i]) if len(objectives) > 1 else None
        try:
            full = optuna.importance.get_param_importances(study, target=target, params=knobs_)
            spread: dict[str, list[float]] = {k: [] for k in full}
            for idx in draws:
                resampled = optuna.create_study(directions=study.directions)
                resampled.add_trials([done[j] for j in idx])
                for k, v in optuna.importance.get_param_importances(resampled, target=target, params=knobs_).items():
                    spread[k].append(float(v))
        except (ValueError, RuntimeError) as err:
            src.notes.append(f"Parameter importances for {name} not computed: {err}")
            continue
        out[name] = [fnd.Importance(k, float(v), float(np.percentile(spread[k], 5)) if spread[k] else math.nan,
                                    float(np.percentile(spread[k], 95)) if spread[k] else math.nan)
                     for k, v in full.items()]
    return out


def _edge_findings(src: Sources) -> list[fnd.Finding]:
    """A sweep whose best trial sits at an end of a searched range: its space was too narrow there."""
    exp, study = src.experiment, src.study
    if study is None or exp is None or exp.sweep is None or len(exp.sweep.objective) != 1 or not _n_complete(study):
        return []
    from loralab.config.space import Space, edges

    best = study.best_trial
    at_edge = edges(Space(exp.sweep), best.user_attrs.get("knobs") or {})
    if not at_edge:
        return []
    return [fnd.Finding("edge", f"The sweep's best trial ({trial_name(best.number)}) sits at an edge of the space: "
                        + "; ".join(at_edge) + ". The best may lie outside what was searched: widen the space there "
                        "and run the sweep again.", "edge")]


def _n_complete(study) -> int:
    if study is None:
        return 0
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _setup(src: Sources, records: list[RunRecord], currency: str | None) -> list[tuple[str, str]]:
    first = next((r for r in records if r.kind == "lora"), records[0])
    m, d, env = first.model, first.data, first.env
    machine, versions = env.get("machine", {}), env.get("versions", {})
    out = []
    params = m.get("params")
    out.append(("Model", f"{m.get('name')} ({m.get('arch')}, {params / 1e6:.1f} M parameters, {m.get('dtype')}; "
                         f"fingerprint {m.get('fingerprint')})" if params else str(m.get("name"))))
    out.append(("Data", f"{d.get('name')}: {d.get('n_train')} training / {d.get('n_eval')} eval examples "
                        f"(fingerprint {d.get('fingerprint')})"))
    if len({r.model.get("fingerprint") for r in records}) > 1 or len({r.data.get("fingerprint") for r in records}) > 1:
        src.notes.append("The runs used different models or data (fingerprints differ): their differences are "
                         "not only the knobs'.")
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    out.append(("Machine", f"{machine.get('platform')}, {machine.get('processor')}, {machine.get('cpus')} CPUs, "
                           f"device {machine.get('device')}{gpu}, {machine.get('torch_threads')} torch threads"))
    keys = ("loralab", "torch", "transformers", "peft", "optuna", "python")
    out.append(("Versions", ", ".join(f"{k} {versions[k]}" for k in keys if k in versions)
                + (f"; loralab commit {str(env['git_commit'])[:10]}" if env.get("git_commit") else "")))
    ev = first.config.get("evaluation") or {}
    seeds = sorted({len(g) for g in group_by_name([r for r in records if r.kind == "lora"]).values()})
    out.append(("Evaluation", f"eval caps (max_new_tokens) {', '.join(map(str, caps_of(records))) or '—'}; "
                              f"{ev.get('confidence', 0.95):.0%} confidence intervals over seeds and eval examples, "
                              "each verdict column adjusted for its many questions (Benjamini-Hochberg); "
                              + ("smallest differences that matter (min_effect): "
                                 + ", ".join(f"{k} {v:g}" for k, v in ev["min_effect"].items()) + "; "
                                 if ev.get("min_effect") else "")
                              + f"seeds per run {'/'.join(map(str, seeds)) or '—'}; "
                              f"drift {'on' if ev.get('drift', True) else 'off'}"))
    cost = first.config.get("cost")
    out.append(("Price", f"{cost['per_hour']:g} {cost.get('currency', '')} per hour" if cost else
                "not set (add `cost: {per_hour: 2.5}` to the file to see money)"))
    unique = {r.id: r for r in records}
    # A run that only re-evaluated a stored adapter carries that adapter's training time in its total
    # (so runs compare); counted once here, by the run that trained it, when both are in the report.
    again = [r for r in unique.values() if r.timings.get("train_reused_from") in unique]
    trained_s = [(r.metrics.get("train_s", 0.0) or 0.0) + (r.metrics.get("init_s", 0.0) or 0.0) for r in again]
    total = sum(r.metrics.get("total_s", 0.0) or 0.0 for r in unique.values()) - sum(trained_s)
    money = sum(r.metrics.get("cost", 0.0) or 0.0 for r in unique.values())
    if cost:
        money -= cost_of(sum(trained_s), cost["per_hour"])
    out.append(("Compute", f"{len(unique)} stored runs, {total / 60:.1f} min of training and evaluation"
                + (f", {money:.4f} {currency or ''}".rstrip() if cost else "")))
    out.append(("Workspace", shown(src.workspace)))  # a database URL without its password
    if src.reproduce:
        out.append(("Reproduce", "; ".join(f"`{c}`" for c in src.reproduce)))
    if src.experiment is not None and src.experiment.source:
        out.append(("Experiment file", src.experiment.source))
    return out


def _status(g: list[RunRecord]) -> str:
    counts: dict[str, int] = {}
    for r in g:
        counts[r.status] = counts.get(r.status, 0) + 1
    if len(counts) == 1:
        s = g[0].status
        if s == Status.PRUNED:
            return f"pruned at step {g[0].metrics.get('pruned_step', '?')}"
        if s == Status.DIVERGED:
            return f"diverged at step {g[0].metrics.get('diverged_step', '?')}"
        return s
    return ", ".join(f"{s} ×{n}" for s, n in counts.items())


def _runs_table(chosen, everything, metric: str, level: float) -> RunsTable:
    groups = _dedupe(chosen + everything)
    trained = [g for g in groups if g[0].kind == "lora"]
    flat = [knobs(g[0]) for g in trained]
    for k in flat:
        k.pop("train.seed", None)
    cols = ablate_mod.differing_any(flat)
    shared = [(k, fmt_value(v)) for k, v in (flat[0].items() if flat else []) if k not in cols]
    chosen_ids = {frozenset(r.id for r in g) for g in chosen}
    rows = []
    for g in groups:
        vals = [r.metrics.get(metric) for r in g if isinstance(r.metrics.get(metric), (int, float))]
        k = knobs(g[0])
        rows.append({"name": g[0].name, "experiment": g[0].experiment,
                     "compared": frozenset(r.id for r in g) in chosen_ids,
                     "seeds": "—" if g[0].kind == "base" else ", ".join(str(r.seed) for r in g),
                     "status": _status(g),
                     "values": ["—" if g[0].kind == "base" else fmt_value(k.get(c)) for c in cols],
                     "metric": fmt_estimate(cell_estimate(metric, g, level), fnd.fmt_of(metric)) if vals else "—"})
    return RunsTable(cols, rows, shared, fnd.label_of(metric))


def effect_matrix(effects: list[Effect]) -> EffectMatrix:
    columns: dict[tuple, EffectColumn] = {}
    cells: dict[tuple, dict[str, tuple[str, str]]] = {}
    for e in effects:
        key = (e.knob, _norm(e.low), _norm(e.high), e.source)
        change = f"{fmt_value(e.low)} → {fmt_value(e.high)}" + (f" ({e.note})" if e.note else "")
        columns.setdefault(key, EffectColumn(e.knob, change, e.source, e.seeds))
        v = e.verdict
        cells.setdefault(key, {})[e.metric] = ((fnd.interval(v, fnd.fmt_of(e.metric)), verdict_class(v.label, e.metric))
                                               if fnd.testable(v) else ("—", "untested"))
    metrics: list[str] = []
    for e in _ordered(effects):
        if e.metric not in metrics:
            metrics.append(e.metric)
    rows = [(fnd.topic_of(m), fnd.label_of(m), [cells[k].get(m) for k in columns]) for m in metrics]
    return EffectMatrix(list(columns.values()), rows)


def _samples(chosen: list[list[RunRecord]], n: int, caps: list[int]) -> list[Sample]:
    """The first n eval prompts (eval order, not picked), with each compared run's first seed's answer."""
    # Runs measured on their losses only (sweep trials with `evaluate: auto`) generated no answers.
    with_samples = [g for g in chosen if any(s.get("outputs") for s in g[0].samples)]
    if n <= 0 or not with_samples:
        return []
    ids = [s["id"] for s in with_samples[0][0].samples][:n]
    out = []
    for sid in ids:
        first = next(s for s in with_samples[0][0].samples if s["id"] == sid)
        answers = []
        for g in with_samples:
            s = next((x for x in g[0].samples if x["id"] == sid), None)
            if s is None:
                continue
            outs = s.get("outputs") or {}
            texts = [(c, str(outs[str(c)].get("text", "")), int(outs[str(c)].get("tokens", 0)),
                      bool(outs[str(c)].get("stopped"))) for c in caps if str(c) in outs]
            if not texts:
                continue
            rouge = outs[str(texts[-1][0])].get("metrics", {}).get("rouge_l")
            answers.append(Answer(g[0].name, texts, _segments(texts), rouge))
        out.append(Sample(sid, str(first.get("prompt", "")), str(first.get("reference", "")), answers))
    return out


def _segments(texts: list[tuple[int, str, int, bool]]) -> list[tuple[str, int | None]]:
    """The longest answer cut where each smaller cap ended it: [(text, cap that ends there), …, (rest, None)].
    A smaller cap's answer is a prefix of a larger one's (one greedy generation); if not, no cuts."""
    longest = texts[-1][1]
    segs, start = [], 0
    for cap, text, _, stopped in texts[:-1]:
        if not longest.startswith(text):
            return [(longest, None)]
        if stopped or len(text) <= start or len(text) >= len(longest):
            continue  # this cap did not cut the answer short
        segs.append((longest[start:len(text)], cap))
        start = len(text)
    segs.append((longest[start:], None))
    return segs


def _plots(chosen, everything, effects, caps, metric, level, currency, headline) -> list[plots_mod.Plot]:
    out = []
    colors = plots_mod.palette([g[0].name for g in chosen + everything])
    trained = _trained(everything)
    curves = []
    for g in trained[:MAX_CURVES]:
        losses = [r.curves.get("loss") or [] for r in g]
        if not any(losses):
            continue
        n = max(len(x) for x in losses)
        mean, lo, hi = [], [], []
        for i in range(n):
            vals = [x[i] for x in losses if i < len(x) and x[i] is not None and math.isfinite(x[i])]
            mean.append(sum(vals) / len(vals) if vals else float("nan"))
            lo.append(min(vals) if vals else float("nan"))
            hi.append(max(vals) if vals else float("nan"))
        band = len(g) > 1
        curves.append(plots_mod.Curve(g[0].name, list(range(1, n + 1)), mean, lo if band else None,
                                      hi if band else None, _status(g).split(" ")[0]))
    if curves:
        out.append(plots_mod.loss_curves(curves, colors))
    points, behind = [], []
    cost_key = "cost" if any("cost" in r.metrics for g in trained for r in g) else "total_s"
    finished = [g for g in trained if _finished(g)]
    if len({evaluation_of(g) for g in finished}) > 1:
        cost_key = "train_s"  # evaluated differently (loss-only trials, full runs): their totals hold different work
    for g in finished:
        eq, ex = cell_estimate(metric, g, level), cell_estimate(cost_key, g, level)
        if eq is not None and ex is not None:
            points.append(plots_mod.Point(g[0].name, ex.mean, eq.mean, _half(ex), _half(eq)))
            behind.append(g)
    better = fnd.better_of(metric) or "lower"

    def beats(j: int, i: int) -> bool:
        """The noise rule for the Pareto front: j beats i when it is better on quality or cheaper with an
        interval that excludes zero, and not worse on the other."""
        q, x = verdict_of(metric, behind[i], behind[j], level), verdict_of(cost_key, behind[i], behind[j], level)
        worse = {"lower": "higher", "higher": "lower"}[better]
        q_label, x_label = (q.label if q else "untested"), (x.label if x else "untested")
        return (q_label == better or x_label == "lower") and q_label != worse and x_label != "higher"

    if points:
        cost_label = {"cost": f"cost per run ({currency})", "total_s": "time per run (s, train + eval)"}.get(
            cost_key, "train time per run (s; evaluated differently, so their eval times are left out)")
        out.append(plots_mod.quality_vs_cost(points, fnd.label_of(metric), cost_label, better, level, colors, beats))
    if len(caps) >= 2:
        series = []
        for g in chosen:
            means, errs = [], []
            for c in caps:
                vals = [r.metrics.get(f"mean_tokens@{c}") for r in g if isinstance(r.metrics.get(f"mean_tokens@{c}"), (int, float))]
                e = cell_estimate(f"mean_tokens@{c}", g, level) if vals else None
                means.append(e.mean if e else float("nan"))
                errs.append(_half(e) if e else 0.0)
            if any(math.isfinite(m) for m in means):
                series.append(plots_mod.CapSeries(g[0].name, caps, means, errs))
        if series:
            out.append(plots_mod.tokens_per_cap(series, colors))
    for m in headline:
        es = [e for e in effects if e.metric == m and fnd.testable(e.verdict)]
        if not es:
            continue
        scale = 100 if fnd.fmt_of(m) == "pct" else 1  # shares in percentage points, as the tables show them
        bars = [plots_mod.Bar(f"{e.knob} {fmt_value(e.low)} → {fmt_value(e.high)}", scale * e.verdict.diff,
                              scale * e.verdict.lo, scale * e.verdict.hi, verdict_class(e.verdict.label, m)) for e in es]
        slug = re.sub(r"[^a-z0-9]+", "-", m.lower()).strip("-")
        out.append(plots_mod.effect_forest(slug, fnd.label_of(m) + (" (points)" if scale == 100 else ""), bars,
                                           fnd.better_of(m)))
    return out


def _half(e) -> float:
    """An error bar as the table shows the cell's interval (one seed of a per-example metric has one too)."""
    return 0.0 if e is None or math.isnan(e.hi) else (e.hi - e.lo) / 2


# ---------------------------------------------------------------------------------------------
# Rendering


class Md(str):
    """Text already safe for Markdown (our own table syntax); everything else is escaped."""


# What can change a Markdown line's structure: code and emphasis marks, an underscore at a word's edge
# (inside a word, as in learning_rate, it is text), and the bracket pairs that make links and images.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f]")  # shown as \ufffd, as a decoder shows bad bytes
_MD_SPECIAL = re.compile(r"[`*~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\](?=[(\[])")


def md_text(value: Any) -> str:
    """Any value as Markdown text that renders as itself: no raw HTML, links, images, emphasis, code
    or table breaks (pipes escaped, newlines folded, as comparison's table cells)."""
    text = _CONTROL.sub("\ufffd", _md_cell(str(value)))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


_CODE = re.compile(r"`([^`\n]+)`")


def md_code(value: Any) -> Md:
    """Our own sentences: `commands` stay code spans, everything around them is escaped as md_text.
    Never for model outputs (a backtick there is text, and md_text escapes it)."""
    text, out, last = str(value), [], 0
    for m in _CODE.finditer(text):
        out += [md_text(text[last:m.start()]), m.group(0).replace("|", "\\|")]  # GFM: a pipe ends a cell even in code
        last = m.end()
    return Md("".join(out + [md_text(text[last:])]))


def html_code(value: Any):
    """Our own sentences for HTML: escaped, then `commands` set as <code>."""
    from markupsafe import Markup, escape

    return Markup(_CODE.sub(r"<code>\1</code>", str(escape(str(value)))))


def _md_finalize(value: Any) -> Any:
    if value is None:
        return ""
    return value if isinstance(value, Md) else md_text(value)


def _env(kind: str):
    import jinja2

    loader = jinja2.PackageLoader("loralab.report", "templates")
    if kind == "html":
        env = jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters["code"] = html_code
        return env
    env = jinja2.Environment(loader=loader, autoescape=False, finalize=_md_finalize, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["code"] = md_code
    return env


def _table_cells(c: Comparison) -> dict[str, Any]:
    """The comparison as plain cells for the HTML template (same formatting as `loralab compare`)."""
    head = [n if st == Status.FINISHED else f"{n} ({st})" for n, st in zip(c.runs, c.statuses)]
    knob_rows = [(k, [fmt_value(v) for v in vals]) for k, vals in c.knobs.items()]
    sections = []
    for title, rows in c.sections:
        sections.append((title, [(r.label, [fmt_estimate(e, r.fmt, c.currency) for e in r.cells],
                                  [(fmt_verdict(v, r.fmt), verdict_class(v.label, r.key) if v else "none")
                                   for v in r.verdicts]) for r in rows]))
    return {"head": head, "verdict_columns": c.verdict_columns, "knobs": knob_rows, "sections": sections}


def render_markdown(r: Report, plots_dir: str = "plots") -> str:
    return _env("md").get_template("report.md.j2").render(
        r=r, compare_table=Md(to_markdown(r.comparison)), plots_dir=Md(plots_dir), Md=Md)


def render_html(r: Report) -> str:
    from markupsafe import Markup

    svgs = {p.name: Markup(p.inline) for p in r.plots}
    return _env("html").get_template("report.html.j2").render(r=r, table=_table_cells(r.comparison), svgs=svgs)


@dataclass
class Written:
    markdown: Path
    html: Path
    plots: list[Path]
    report: Report


def write(r: Report, out: str | Path) -> Written:
    """report.md with plots/*.svg beside it, and report.html with the same plots inline."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SpecError(f"--out {out} is a file", [Problem("--out", "not a folder", str(out), "give a folder for report.md and report.html")]) from None
    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    paths = []
    for p in r.plots:
        path = pdir / f"{p.name}.svg"
        path.write_text(p.svg, encoding="utf-8")
        paths.append(path)
    md, html = out / "report.md", out / "report.html"
    md.write_text(render_markdown(r), encoding="utf-8")
    html.write_text(render_html(r), encoding="utf-8")
    return Written(md, html, paths, r)
