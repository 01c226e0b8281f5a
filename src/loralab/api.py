"""The Python API. Everything the CLI does goes through these functions."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.errors import LoralabError, Problem, RunNotFound, SpecError
from loralab.config.loading import load_experiment, surprises
from loralab.config.schema import Experiment
from loralab.workspace.status import Status
if TYPE_CHECKING:  # SQLAlchemy loads on first use of the store: `loralab validate` needs none of it
    from loralab.workspace.store import RunRecord, Store


def load(path: str | Path) -> Experiment:
    """Read and validate an experiment file (raises SpecError listing every problem)."""
    return load_experiment(path)


def with_repeats(exp: Experiment, repeats: int | str | None) -> Experiment:
    """The experiment with `repeats` seeds per run, or "auto" (seeds planned as the data come in;
    execute.plan). None: as the file says."""
    from loralab.config.schema import SequentialSpec

    if repeats is None:
        return exp
    if isinstance(repeats, str):
        text = repeats.strip().lower()
        if text != "auto" and not (text.isdigit() and 1 <= int(text) <= 100):
            raise SpecError("--repeats takes a number of seeds or `auto`",
                            [Problem("--repeats", "not a number from 1 to 100, nor auto", repeats[:40],
                                     "give e.g. --repeats 3, or --repeats auto")])
        repeats = "auto" if text == "auto" else int(text)
    if exp.seeds is not None:
        raise SpecError("--repeats conflicts with the file's `seeds:`",
                        [Problem("--repeats", "the file lists its seeds", repeats, "drop --repeats or the file's seeds")])
    if repeats == "auto":
        plan = exp.adaptive or SequentialSpec()
        update = {"repeats": plan.min_seeds, "evaluation": exp.evaluation.model_copy(update={"sequential": plan})}
    else:
        update = {"repeats": repeats, "evaluation": exp.evaluation.model_copy(update={"sequential": None})}
    out = exp.model_copy(update=update)
    out.resolved_runs, out.source = exp.resolved_runs, exp.source
    return out


def with_tracking(exp: Experiment, track: str | None) -> Experiment:
    """The experiment with `--track` (comma-separated tracker names, or `none`) in place of the file's
    `track:`; a tracker both name keeps the file's options for it. None: as the file says."""
    if track is None:
        return exp
    from pydantic import ValidationError

    from loralab.config.schema import TRACKERS, TrackSpec

    names = [n.strip() for n in track.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SpecError("--track names an unknown tracker",
                        [Problem("--track", "unknown tracker", n, f"use some of: {', '.join(TRACKERS)}, or none") for n in unknown])
    try:
        spec = TrackSpec.model_validate({n: (getattr(exp.track, n) or {}) for n in names})
    except ValidationError as err:
        raise SpecError("--track", [Problem("--track", e["msg"], track, "name each tracker once") for e in err.errors()]) from None
    out = exp.model_copy(update={"track": spec})
    out.resolved_runs, out.source = exp.resolved_runs, exp.source
    return out


def check_tracking(exp: Experiment) -> None:
    """Every tracker the experiment names is installed, else one error naming the pip command (exit 2)."""
    if exp.track.names:
        from loralab.track import check_installed
        from loralab.track.base import folder_problems

        check_installed(exp.track.names)
        problems = folder_problems(exp.track)
        if problems:
            raise SpecError(f"{len(problems)} tracker folder{'s' if len(problems) > 1 else ''} cannot be written",
                            problems)


def example_path(name: str) -> Path:
    """A YAML file shipped with the package (examples/ in the repository links to the same files)."""
    return Path(str(resources.files("loralab") / "examples" / name))


def validate(path: str | Path) -> tuple[Experiment, list[str]]:
    """Check a file without training: schema, data files, and LoRA targets when the model is local.

    Returns the experiment and notes on what was checked.
    """
    exp = load_experiment(path)
    check_tracking(exp)
    from loralab.execute.preflight import check_before_reading

    check_before_reading(exp, where=path)
    if exp.device == "cuda":  # what `run` would refuse: asked for a GPU that is not there
        from loralab.engine.models import pick_device

        pick_device("cuda")
    notes = [f"note: {n}" for n in surprises(exp)]
    dataset = _local_data(exp)
    if dataset is None:
        notes.append("data not read: a Hugging Face hub dataset is read when training starts")
    layers = _local_layers(exp)
    if layers is None:
        notes.append("LoRA target modules not checked: the model is not available locally yet "
                     "(they are checked before training starts)")
    else:
        from loralab.engine.models import resolve_target_modules

        for run in exp.resolved_runs:
            _, note = resolve_target_modules(layers, run.lora.target_modules, where=f"runs.{run.name}.lora.target_modules")
            if note and f"note: {note}" not in notes:
                notes.append(f"note: {note}")
        notes.append(f"LoRA target modules checked against {layers.model_type}'s layers")
    if dataset is not None:
        from loralab.engine.data import data_surprises
        from loralab.execute.preflight import check_plan

        check_plan(exp, exp.resolved_runs, len(dataset.train), layers)
        notes.extend(f"note: {n}" for n in data_surprises(dataset))
        if layers is not None and not exp.data.truncate:
            _check_lengths(exp, dataset)
        notes.append(f"data read: {len(dataset.train)} train / {len(dataset.eval)} eval examples")
    notes.append(cost_note(exp, len(dataset.train) if dataset is not None else None,
                           len(dataset.eval) if dataset is not None else None))
    if exp.sweep is not None:
        from loralab.config.space import describe

        notes.extend(describe(exp.sweep))
    if exp.track.names:
        notes.append(f"trackers installed: {', '.join(exp.track.names)}")
    return exp, notes


def cost_note(exp: Experiment, n_train: int | None = None, n_eval: int | None = None) -> str:
    """What `run FILE` will do: trainings (runs x seeds) and the base model's evaluation; with the data's
    size and finished runs of the same model in the file's workspace, about how long (their measured
    seconds per training example and per eval example)."""
    runs = exp.resolved_runs
    trainings = sum(len(exp.seeds_for(r)) for r in runs)
    seeds = {len(exp.seeds_for(r)) for r in runs}
    each = f"{len(runs)} run(s) x {seeds.pop()} seed(s)" if len(seeds) == 1 else f"{len(runs)} run(s)"
    text = f"cost: `run` trains {trainings} adapter(s) ({each}) and evaluates each, plus the base model once"
    if exp.adaptive is not None:  # the planner adds seeds only where a verdict is open
        most = len(runs) * exp.adaptive.max_seeds
        text += f"; `repeats: auto` may add seeds where a verdict is still open, up to {most} adapter(s) in all"
    rates = _stored_rates(exp) if n_train else None
    if rates is None:
        text += "; no time estimate (no finished run of this model in the workspace yet)"
    else:
        from loralab.progress import duration

        per_example, per_eval, n = rates
        seconds = sum(len(exp.seeds_for(r)) * (r.train.planned_steps(n_train) * r.train.batch_size * r.train.gradient_accumulation
                                               * per_example + (n_eval or 0) * per_eval) for r in runs) + (n_eval or 0) * per_eval
        text += f"; about {duration(seconds)} of training and evaluation at the rates of {n} finished run(s) of this model in the workspace"
    if exp.sweep is not None and exp.sweep.budget.trials:
        n, k = exp.sweep.budget.trials, max((len(exp.seeds_for(r)) for r in runs), default=1)
        text += (f"; `sweep` trains up to {n * k} ({n} trial(s) x {k} seed(s), fewer when pruned; "
                 "`loralab sweep --dry-run` estimates its time)")
    return text


# workspace.store's DEFAULT_WORKSPACE and DB_NAME, here so that validate looks for a workspace without
# importing the store (and SQLAlchemy); tests/config/test_validate_messages.py checks they agree.
_WORKSPACE_DB = ("loralab-workspace", "loralab.db")


def _stored_rates(exp: Experiment) -> tuple[float, float, int] | None:
    """Median training seconds per example seen and eval seconds per eval example of the finished runs of
    the file's model in its workspace (a folder; a database is not opened by validate); None without any."""
    import statistics

    ws = exp.workspace or _WORKSPACE_DB[0]
    if "://" in ws or not (Path(ws).expanduser() / _WORKSPACE_DB[1]).is_file():
        return None  # nothing stored (or a database server): validate imports no SQLAlchemy for it
    try:
        records = list_runs(ws)
    except LoralabError:
        return None
    train, evals = [], []
    for r in records:
        m, t = r.metrics, (r.config.get("train") or {})
        if r.kind != "lora" or r.status != Status.FINISHED or r.model.get("name") != exp.model.name:
            continue
        seen = (m.get("steps") or 0) * (t.get("batch_size") or 0) * (t.get("gradient_accumulation") or 1)
        if seen and m.get("train_s"):
            train.append(m["train_s"] / seen)
        if r.data.get("n_eval") and m.get("eval_s") is not None:
            evals.append(m["eval_s"] / r.data["n_eval"])
    if not train:
        return None
    return statistics.median(train), statistics.median(evals) if evals else 0.0, len(train)


def _local_data(exp: Experiment):
    """The data set, read and split as `run` will, unless it lives on the Hugging Face hub (network)."""
    from loralab.engine.data import load_data

    if exp.data.hf and not exp.resolve_path(exp.data.hf).is_dir():
        return None
    return load_data(exp.data, exp.base_dir)


def _check_lengths(exp: Experiment, dataset) -> None:
    """No example longer than the shortest max_seq_len; token counts recorded per model and data, so a
    second validate loads no tokenizer."""
    from loralab.engine.data import check_lengths
    from loralab.engine.models import load_tokenizer, local_folder
    from loralab.execute.preflight import lengths_for, shortest_max_seq_len

    folder = local_folder(exp.model, exp.base_dir)
    check_lengths(lengths_for(folder, dataset, lambda: load_tokenizer(folder, exp.model)), dataset,
                  *shortest_max_seq_len(exp, exp.resolved_runs))


def _local_layers(exp: Experiment):
    """The model's layers when it is on disk (cached built-in or local folder), its weights checked
    against its config; None when it is not on disk yet."""
    from loralab.engine.models import check_weights, local_folder, local_layers

    folder = local_folder(exp.model, exp.base_dir)
    if folder is None or not (folder / "config.json").is_file():
        return None
    layers = local_layers(folder, exp.model)
    check_weights(folder, layers, exp.model.name)
    return layers


def run(exp: Experiment, *, workspace: str | Path | None = None, only: list[str] | None = None,
        force: bool = False, console=None, executor: str | None = None, address: str | None = None,
        log_every: float | None = None):
    """Train and evaluate the runs; returns an ExperimentResult (records: base first, then the runs).
    `executor` ("local" or "ray") and `address` (a Ray cluster) override the file's `executor:`.
    `log_every`: seconds between progress lines when `console` is not a terminal."""
    from loralab.execute.loop import run_experiment

    check_tracking(exp)
    return run_experiment(exp, workspace=workspace, only=only, force=force, reporter=_reporter(console, log_every),
                          executor=executor_factory(exp, executor, address))


def sweep(exp: Experiment, *, workspace: str | Path | None = None, dry_run: bool = False, console=None,
          executor: str | None = None, address: str | None = None, log_every: float | None = None):
    """Search the file's `sweep:` space with Optuna within its budget; returns a sweep.SweepResult.

    Running it again continues the same study (finished trials kept, an interrupted one re-run).
    `dry_run`: print the trials and the estimated time, train and write nothing. `executor` and
    `address`: as for `run`; with Ray, one trial per actor runs at once."""
    from loralab.sweep.study import run_sweep

    if not dry_run:
        check_tracking(exp)
    factory = None if dry_run else executor_factory(exp, executor, address)
    return run_sweep(exp, workspace=workspace, reporter=_reporter(console, log_every), dry_run=dry_run, executor=factory)


def _reporter(console, log_every: float | None):
    from loralab.progress import LOG_EVERY_S, Reporter

    return Reporter(console, LOG_EVERY_S if log_every is None else log_every)


def executor_factory(exp: Experiment, kind: str | None = None, address: str | None = None):
    """The execute.ExecutorFactory for the file's `executor:` section with --executor/--address laid
    over it; None for the in-process default. Checked before anything loads (Ray missing: exit 2)."""
    from loralab.config.schema import ExecutorSpec

    fields = exp.executor.model_dump(exclude_unset=True)
    if kind is not None:  # the file's settings stay when they are the same executor's
        fields = {**(fields if kind == exp.executor.kind else {}), "kind": kind}
    if address is not None:
        fields.update({"kind": kind or "ray", "address": address})
    try:
        spec = ExecutorSpec(**fields)
    except ValueError as err:
        bad = [e for e in getattr(err, "errors", lambda: [])() if e.get("loc") == ("address",)]
        if bad and address is not None:  # the address itself, not the pair
            raise SpecError(f"--address {address[:80]!r} is not a Ray address",
                            [Problem("--address", bad[0]["msg"].removeprefix("Value error, "), address,
                                     "write HOST:PORT as `ray start --head` prints it (e.g. 10.0.0.5:6379)")]) from None
        raise SpecError("--executor and --address do not fit together",
                        [Problem("--executor", str(err).splitlines()[-1], kind, "use --executor ray with --address")]) from None
    if spec.kind == "local":
        return None
    from loralab.execute.ray_executor import factory

    return factory(spec, where="--address" if address is not None else "executor.address")


def doctor(workspace: str | Path | None = None, repair: bool = False):
    """Check a workspace for what crashes leave behind (and repair it); returns a doctor.Checkup."""
    from loralab.workspace.doctor import check_workspace

    return check_workspace(workspace_path(workspace), repair=repair)  # (a file's workspace too: see find_workspace)


def ablate(file: str | Path | Experiment, a: str, b: str, *, design: str = "ofat", out: str | Path | None = None,
           workspace: str | Path | None = None, repeats: int | None = None, train: bool = False, console=None,
           hold: str = "alpha/r"):
    """Write the ablation of run `a` vs run `b` of an experiment file as an experiment file of its own:
    one knob at a time from a toward b (`ofat`), or a two-level fractional factorial (`factorial`).

    `train`: also run it (runs already stored, a and b among them, are reused). `hold`: what stays fixed
    when r moves, alpha/r (alpha follows r; the default) or alpha. Returns an analysis.ablate.AblationPlan:
    `path` is the file written (default WORKSPACE/ablations/NAME.yaml), `result` the run's result."""
    from loralab.analysis.ablate import plan, write_plan
    from loralab.execute.prepare import open_workspace, resolve_workspace
    from loralab.workspace.store import is_url

    exp = with_repeats(file if isinstance(file, Experiment) else load_experiment(file), repeats)
    ws = resolve_workspace(exp, workspace)
    stored = {}  # endpoints that are not runs of the file (sweep trials) come from the workspace
    try:
        store = open_workspace(exp, ws, create=False)
    except RunNotFound:  # nothing stored yet
        store = None
    if store is not None:
        with store:
            stored = {r.name: r for r in store.list(exp.name) if r.kind == "lora"}
    p = plan(exp, a, b, design, workspace=ws, records=stored, hold=hold)
    folder = Path("ablations").resolve() if is_url(ws) else Path(ws) / "ablations"  # a database has no folder
    with _writable("--out", out or folder):
        write_plan(p, Path(out) if out else folder / f"{p.experiment.name}.yaml")
    if train:
        p.result = run(load_experiment(p.path), workspace=ws, console=console)
    return p


def report(targets: str | Path | list, *, out: str | Path, workspace: str | Path | None = None,
           metric: str | None = None, samples: int = 4, goal: str | None = None):
    """Write report.md (plots in plots/) and report.html (one self-contained file) into `out`.

    `targets`: one experiment file (its runs, sweep trials and ablations as stored), or run names or ids.
    Returns a report.Written (paths, and the report's content as `report`)."""
    from loralab.report import build as rep

    targets = [targets] if isinstance(targets, (str, Path)) else list(targets)
    if not targets:
        raise SpecError("nothing to report", [Problem("FILE | RUN", "missing", None, "give an experiment file or run names", False)])
    first = Path(str(targets[0]))
    if first.suffix in (".yaml", ".yml") or first.is_file():
        if len(targets) > 1:
            raise SpecError("report takes one experiment file, or run names, not both",
                            [Problem("FILE | RUN", "more than a file", [str(t) for t in targets],
                                     "give one experiment file, or only run names or ids")])
        src = rep.from_file(load_experiment(first), workspace)
    else:
        src = rep.from_runs([str(t) for t in targets], find_workspace(workspace))
    built = rep.build(src, metric=metric, samples=samples, goal=goal)
    with _writable("--out", out):
        return rep.write(built, out)


class _writable:
    """An OSError while writing where the user pointed (`--out`) is their input's problem: one message, exit 2."""

    def __init__(self, option: str, where: str | Path):
        self.option, self.where = option, str(where)

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        import errno

        refused = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT)
        if not isinstance(err, OSError) or err.errno not in refused:
            return False  # disk full and friends: not the option's fault
        why = err.strerror or type(err).__name__
        raise SpecError(f"{self.option} {self.where}: cannot write there ({why})",
                        [Problem(self.option, f"cannot write there ({why})", self.where,
                                 "give a folder you can write to (or leave the option out for the default)")]) from None


def workspace_path(workspace: str | Path | None = None) -> Path | str:
    """The workspace a command reads (see find_workspace): a folder, absolute, or a database URL as given."""
    from loralab.workspace.store import workspace_path as resolve

    return resolve(find_workspace(workspace))


def find_workspace(workspace: str | Path | None = None) -> str | Path | None:
    """The workspace a reading command (ls, show, compare, report, doctor, export) means.

    `-w` names a workspace, or an experiment file whose `workspace:` it takes (as `run FILE` does).
    Without it: ./loralab-workspace when it exists, else the one workspace that the experiment
    files in this folder name (right after `loralab run exp.yaml` with `workspace: runs`, `loralab ls`
    finds runs/); several → a message listing them; none → ./loralab-workspace (whose absence the
    store reports)."""
    from loralab.workspace.store import DB_NAME, DEFAULT_WORKSPACE, is_url

    if workspace is not None:
        path = Path(str(workspace)).expanduser()
        return _file_workspace(path) or DEFAULT_WORKSPACE if _is_experiment_file(path) else workspace
    if (Path(DEFAULT_WORKSPACE) / DB_NAME).is_file():
        return None
    found: dict[str, list[str]] = {}
    for f in sorted(Path(".").glob("*.y*ml"))[:50]:  # bounded: a folder of thousands of files is not searched
        named = _file_workspace(f) if _is_experiment_file(f) else None
        if named and (is_url(named) or (Path(named).expanduser() / DB_NAME).is_file()):  # a URL: its server says
            found.setdefault(named, []).append(f.name)
    if len(found) > 1:
        listed = "; ".join(f"{ws} (from {', '.join(files)})" for ws, files in found.items())
        raise SpecError(f"no ./{DEFAULT_WORKSPACE} here, and the experiment files here name several workspaces",
                        [Problem("--workspace", "which workspace?", listed,
                                 "pass -w with one of them, or with the experiment file")])
    return next(iter(found), None)


def _is_experiment_file(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") and path.is_file()


def _file_workspace(path: Path) -> str | None:
    """The `workspace:` an experiment file names, read without validating the rest (it may be a file
    of a newer version, or half-edited); None when it names none or cannot be read."""
    import yaml

    try:
        if path.stat().st_size > 1_000_000:
            return None
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    ws = doc.get("workspace") if isinstance(doc, dict) else None
    return ws if isinstance(ws, str) and ws.strip() else None


def shown_workspace(workspace: str | Path | None = None) -> str:
    """A workspace as printed (a URL without its password)."""
    from loralab.workspace.store import shown

    return shown(workspace_path(workspace))


def open_store(workspace: str | Path | None = None) -> Store:
    from loralab.workspace.store import Store

    return Store(workspace_path(workspace), create=False)


def list_runs(workspace: str | Path | None = None, experiment: str | None = None) -> list[RunRecord]:
    with open_store(workspace) as store:
        return store.list(experiment)


def gone(records: list[RunRecord], workspace: str | Path | None = None) -> set[str]:
    """Ids of the `running` runs whose process is gone (killed: no live process holds the run's lock);
    `ls` and the dashboard show them "interrupted (process gone)"; a rerun or `doctor --repair` fixes the row."""
    running = [r.id for r in records if r.status == Status.RUNNING]
    if not running:
        return set()
    with open_store(workspace) as store:
        return {rid for rid in running if not store.in_progress(rid)}


def get_run(ref: str, workspace: str | Path | None = None) -> RunRecord:
    with open_store(workspace) as store:
        return store.find(ref)


def get_group(ref: str, workspace: str | Path | None = None, experiment: str | None = None) -> list[RunRecord]:
    """A run with all its seeds (a list of one when the run has a single seed); `experiment` picks it
    when several experiments have a run of that name (else the newest, see `picked`)."""
    with open_store(workspace) as store:
        return store.readable_group(f"{experiment}/{ref}" if experiment and "/" not in ref else ref)


def picked(ref: str, group: list[RunRecord], workspace: str | Path | None = None) -> str | None:
    """A sentence when a bare run name matched runs of several experiments (which one `group` is, and how
    to pick another); None when the name is unambiguous."""
    if "/" in ref or not group or group[0].name != ref:
        return None
    with open_store(workspace) as store:
        others = sorted({r.experiment for r in store.list(light=True) if r.name == ref} - {group[0].experiment})
    if not others:
        return None
    return (f"{len(others) + 1} experiments have a run {ref!r}: using {group[0].experiment}'s (the newest); "
            f"pick another with --experiment {others[0]} (or {others[0]}/{ref})")


def compare(refs: list[str], workspace: str | Path | None = None, all_knobs: bool = False):
    """The comparison of runs by name or id, seeds pooled (see loralab.compare.Comparison)."""
    from loralab.analysis.comparison import compare as build

    groups = [get_group(r, workspace) for r in refs]
    ev = groups[-1][0].config.get("evaluation") or {}
    return build(groups, all_knobs=all_knobs, level=ev.get("confidence", 0.95))


def difference(a: str, b: str, metric: str, workspace: str | Path | None = None):
    """Is run `b` different from run `a` on `metric` (e.g. "rouge_l@50", "eval_loss", "drift_kl")?

    Returns a stats.Verdict: mean(b - a), its confidence interval (seeds and eval examples) and
    "higher", "lower", "within noise", "negligible" (inside evaluation.min_effect) or "untested" (one
    seed each of a per-run metric: no interval; `note` says why).
    """
    from loralab.analysis.comparison import verdict_of

    c = compare([a, b], workspace)
    keys = sorted(r.key for _, rows in c.sections for r in rows)
    if metric not in keys:
        raise SpecError(f"no metric {metric!r} in runs {a} and {b}",
                        [Problem("metric", "unknown metric", metric, f"use one of: {', '.join(keys)}")])
    ev = c.groups[-1][0].config.get("evaluation") or {}
    return verdict_of(metric, c.groups[0], c.groups[1], ev.get("confidence", 0.95), floors=c.floors)


def export(ref: str, out: str | Path, *, merge: bool = False, workspace: str | Path | None = None,
           base: str | None = None, seed: int | None = None, experiment: str | None = None):
    """A finished run's adapter in PEFT format (or, with `merge`, the base model with the adapter merged
    in, safetensors), with its tokenizer and chat template and a README.md model card, in folder `out`.

    `base`: how the adapter's config and card name the base model (a Hub id or a path on the machine that
    loads it; default: the built-in model's Hub id, a Hub id as the file gave it, else this machine's folder).
    `seed`: which seed of a run trained with several (default: the first, said in the notes).
    Returns a workspace.export.Exported (`folder`, `notes`)."""
    from loralab.workspace.export import export as write

    group = get_group(ref, workspace, experiment)
    notes = [n for n in [picked(ref, group, workspace) if experiment is None else None] if n]
    seeds = [r.seed for r in group]
    if seed is not None:
        chosen = [r for r in group if r.seed == seed]
        if not chosen:
            raise SpecError(f"run {ref} has no seed {seed}",
                            [Problem("--seed", "no such seed", seed, "use one of: " + ", ".join(str(s) for s in seeds))])
        rec = chosen[0]
    else:
        rec = next((r for r in group if r.status == Status.FINISHED), group[0])
        if len(group) > 1:
            notes.append(f"run {rec.name} has seeds {', '.join(str(s) for s in seeds)}: exported seed {rec.seed} "
                         "(pick another with --seed N)")
    done = write(rec, out, merge=merge, base=base)
    done.notes[:0] = notes
    return done


def table(c, title: str = "Main differences"):
    """A comparison as a rich Table (what `loralab compare` prints), its legend as the caption."""
    from loralab.analysis.comparison import render

    return render(c, title)


def markdown(c) -> str:
    """A comparison as a GitHub Markdown table with its legend (`loralab compare --markdown`)."""
    from loralab.analysis.comparison import to_markdown

    return to_markdown(c)


def compare_groups(groups: list, *, evaluation=None, all_knobs: bool = False):
    """The comparison of runs already in hand (each a list of its seeds' records), read with an
    experiment's evaluation settings (confidence, min_effect) when given."""
    from loralab.analysis.comparison import compare as build

    if evaluation is None:
        return build(groups, all_knobs=all_knobs)
    return build(groups, all_knobs=all_knobs, level=evaluation.confidence, floors=evaluation.min_effect,
                 sequential=evaluation.sequential)


def text_of(value) -> str:
    """A stored value as the tables show it (lists joined, floats short, None as —)."""
    from loralab.analysis.comparison import fmt_value

    return fmt_value(value)


def effects_of(plan) -> list[tuple[str, str, str, str, str]]:
    """An ablation's measured effects on the headline metrics, one row per knob and metric:
    (knob, change, metric, effect with its interval, verdict); only effects with an interval."""
    from loralab.analysis.ablate import knob_effects
    from loralab.analysis.comparison import caps_of, fmt_value
    from loralab.analysis.findings import fmt_of, headline_metrics, interval, label_of, testable

    groups = [g for name, g in plan.result.groups().items() if name != "base"]
    caps = caps_of([r for g in groups for r in g])
    metrics = [m for m in headline_metrics(caps) if any(m in r.metrics for g in groups for r in g)]
    ev = plan.experiment.evaluation
    return [(e.knob, f"{fmt_value(e.low)} → {fmt_value(e.high)}" + (f" ({e.note})" if e.note else ""),
             label_of(e.metric), interval(e.verdict, fmt_of(e.metric)), e.verdict.label)
            for e in knob_effects(groups, metrics, level=ev.confidence, floors=ev.min_effect) if testable(e.verdict)]


def dashboard(workspace: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8765,
              refresh_s: float = 2.0, console=None) -> None:
    """Serve the live dashboard of a workspace on http://HOST:PORT until Ctrl-C (read-only)."""
    import importlib.util
    import socket

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SpecError(f"the dashboard needs {' and '.join(missing)}, not installed here",
                        [Problem("dashboard", "missing package", ", ".join(missing), "pip install 'loralab[dashboard]'")])
    from loralab.workspace.store import shown

    with open_store(workspace) as store:  # a missing workspace is reported before the server starts
        root = store.url or store.root  # a database workspace is opened by its URL (its root is the artifacts folder)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            import errno

            if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:  # the host, not the port
                raise SpecError(f"cannot listen on {host}:{port} ({err.strerror or err})",
                                [Problem("--host", "not an address of this machine", host,
                                         "pass --host 127.0.0.1 (this machine only), 0.0.0.0 (every interface) "
                                         "or one of this machine's own addresses")]) from None
            raise SpecError(f"cannot listen on {host}:{port} ({err.strerror or err})",
                            [Problem("--port", "in use or not allowed here", port,
                                     "pass another --port (or --host an address of this machine)")]) from None
    import uvicorn

    from loralab.dashboard.app import make_app

    if console is not None:
        where = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
        console.print(f"loralab dashboard of {shown(root)} on http://{where}:{port}/ (read-only; Ctrl-C to stop)",
                      highlight=False, soft_wrap=True)  # a URL cut in two can be neither clicked nor copied
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]note:[/yellow] listening on {host}: anyone who can reach it can read this "
                          "workspace's runs (there is no login)", highlight=False)
    uvicorn.run(make_app(root, refresh_s), host=host, port=port, log_level="warning")


def storage_problem(err: BaseException, workspace: str | Path | None):
    """A damaged or full workspace database as a WorkspaceError with its fix, or None for other errors."""
    from loralab.workspace.store import storage_error, workspace_path as resolve

    try:
        where = workspace_path(workspace)
    except LoralabError:  # several workspaces to choose from: the error is about the one given, or the default
        where = resolve(workspace)
    return storage_error(err, where)


__all__ = ["ablate", "export", "report", "difference", "doctor", "load", "validate", "run", "sweep", "list_runs", "get_run", "get_group", "compare", "example_path", "LoralabError", "Problem"]
