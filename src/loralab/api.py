"""The Python API. Everything the CLI does goes through these functions."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import LoralabError, Problem, SpecError
from .spec import BUILTIN_MODEL, Experiment, check_data_paths, load_experiment
from .store import DEFAULT_WORKSPACE, RunRecord, Store


def load(path: str | Path) -> Experiment:
    """Read and validate an experiment file (raises SpecError listing every problem)."""
    return load_experiment(path)


def with_repeats(exp: Experiment, repeats: int | None) -> Experiment:
    """The experiment with `repeats` seeds per run (None: as the file says)."""
    if repeats is None:
        return exp
    if exp.seeds is not None:
        raise SpecError("--repeats conflicts with the file's `seeds:`",
                        [Problem("--repeats", "the file lists its seeds", repeats, "drop --repeats or the file's seeds")])
    out = exp.model_copy(update={"repeats": repeats})
    out.resolved_runs, out.source = exp.resolved_runs, exp.source
    return out


def example_path(name: str) -> Path:
    """A YAML file shipped with the package (examples/ in the repository links to the same files)."""
    return Path(str(resources.files("loralab") / "examples" / name))


def validate(path: str | Path) -> tuple[Experiment, list[str]]:
    """Check a file without training: schema, data files, and LoRA targets when the model is local.

    Returns the experiment and notes on what was checked.
    """
    exp = load_experiment(path)
    problems = check_data_paths(exp)
    if problems:
        raise SpecError(f"{path}: data file missing", problems)
    notes = []
    config = _local_config(exp)
    if config is None:
        notes.append("LoRA target modules not checked: the model is not available locally yet "
                     "(they are checked before training starts)")
    else:
        from .models import resolve_target_modules

        model = _meta_model(config, exp)
        for run in exp.resolved_runs:
            _, note = resolve_target_modules(model, run.lora.target_modules, where=f"runs.{run.name}.lora.target_modules")
            if note and f"note: {note}" not in notes:
                notes.append(f"note: {note}")
        notes.append(f"LoRA target modules checked against {getattr(config, 'model_type', 'the model')}'s layers")
    return exp, notes


def _local_config(exp: Experiment):
    """The model's config when it is on disk (cached built-in or local folder); None otherwise."""
    from .models import BUILTIN_CACHE_NAME, cache_dir

    if exp.model.name == BUILTIN_MODEL:
        folder = cache_dir() / "models" / BUILTIN_CACHE_NAME
    else:
        folder = exp.resolve_path(exp.model.name)
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=exp.model.trust_remote_code)


def _meta_model(config, exp: Experiment):
    """The model's module tree without allocating weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=exp.model.trust_remote_code)


def run(exp: Experiment, *, workspace: str | Path | None = None, only: list[str] | None = None,
        force: bool = False, console=None):
    """Train and evaluate the runs; returns an ExperimentResult (records: base first, then the runs)."""
    from .progress import Reporter
    from .runner import run_experiment

    return run_experiment(exp, workspace=workspace, only=only, force=force, reporter=Reporter(console))


def sweep(exp: Experiment, *, workspace: str | Path | None = None, dry_run: bool = False, console=None):
    """Search the file's `sweep:` space with Optuna within its budget; returns a sweep.SweepResult.

    Running it again continues the same study (finished trials kept, an interrupted one re-run).
    `dry_run`: print the trials and the estimated time, train and write nothing."""
    from .progress import Reporter
    from .sweep import run_sweep

    return run_sweep(exp, workspace=workspace, reporter=Reporter(console), dry_run=dry_run)


def workspace_path(workspace: str | Path | None = None) -> Path:
    return Path(workspace or DEFAULT_WORKSPACE).expanduser().resolve()


def open_store(workspace: str | Path | None = None) -> Store:
    return Store(workspace_path(workspace), create=False)


def list_runs(workspace: str | Path | None = None, experiment: str | None = None) -> list[RunRecord]:
    store = open_store(workspace)
    try:
        return store.list(experiment)
    finally:
        store.close()


def get_run(ref: str, workspace: str | Path | None = None) -> RunRecord:
    store = open_store(workspace)
    try:
        return store.find(ref)
    finally:
        store.close()


def get_group(ref: str, workspace: str | Path | None = None) -> list[RunRecord]:
    """A run with all its seeds (a list of one when the run has a single seed)."""
    store = open_store(workspace)
    try:
        return store.group(ref)
    finally:
        store.close()


def compare(refs: list[str], workspace: str | Path | None = None, all_knobs: bool = False):
    """The comparison of runs by name or id, seeds pooled (see loralab.compare.Comparison)."""
    from .comparison import compare as build

    groups = [get_group(r, workspace) for r in refs]
    ev = groups[-1][0].config.get("evaluation") or {}
    return build(groups, all_knobs=all_knobs, level=ev.get("confidence", 0.95),
                 resamples=ev.get("bootstrap_resamples", 5000))


def difference(a: str, b: str, metric: str, workspace: str | Path | None = None):
    """Is run `b` different from run `a` on `metric` (e.g. "rouge_l@50", "eval_loss", "drift_kl")?

    Returns a stats.Verdict: mean(b - a), its confidence interval and "higher", "lower" or
    "within noise"; None when there is nothing to test (one seed each of a per-run metric).
    """
    c = compare([a, b], workspace)
    try:
        row = c.row(metric)
    except KeyError:
        keys = sorted(r.key for _, rows in c.sections for r in rows)
        raise SpecError(f"no metric {metric!r} in runs {a} and {b}",
                        [Problem("metric", "unknown metric", metric, f"use one of: {', '.join(keys)}")]) from None
    return row.verdicts[0]


__all__ = ["difference", "load", "validate", "run", "sweep", "list_runs", "get_run", "get_group", "compare", "example_path", "LoralabError", "Problem"]
