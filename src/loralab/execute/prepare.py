"""Before anything is written: the selected runs, the data, the model and every run's LoRA targets loaded
and checked once (Prepared), shared by every run of the experiment, and where its workspace is."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import Problem, SpecError
from loralab.progress import Reporter
from loralab.config.loading import surprises
from loralab.config.schema import Experiment, RunSpec
from loralab.workspace.store import DEFAULT_WORKSPACE, Store, workspace_path


@dataclass
class Prepared:
    """Everything loaded and checked before the workspace is touched."""

    exp: Experiment
    runs: list[RunSpec]
    dataset: Any
    base: Any  # engine.models.LoadedModel
    targets: dict[str, Any]  # run name -> target modules given to PEFT
    eval_encoded: list
    eval_prompts: list[list[int]]
    end_id: int
    eval_max_len: int
    train_probe: list  # encoded training examples whose loss is measured like eval's (overfitting gap)
    reference_tokens: list[int]  # token length of each eval reference (verbosity ratio)
    drift_prompts: list[list[int]]
    drift_base: list | None = None  # the base model's greedy answers on drift prompts, computed once
    layers: Any = None  # engine.models.ModelLayers of the base as loaded (no adapter on it): targets resolve on it
    # Paused sweep trials kept in memory (sweep.halving): run id -> Parked. park_bytes: how much they may
    # hold (0: never; each pause then saves a checkpoint, as a killed run's would be).
    parked: dict = field(default_factory=dict)
    park_bytes: int = 0
    # The training examples encoded at each max_seq_len (execute.runner.train_encoded): a sweep's trials
    # share them instead of rendering the chat template again for every trial.
    train_encoded: dict = field(default_factory=dict)

    def targets_for(self, run: RunSpec) -> Any:
        """The target modules given to PEFT for a run: the file's runs as resolved when prepared, any
        other run (a sweep trial) resolved against the base model (with no adapter on it)."""
        if run.name in self.targets and run.lora.target_modules == self._spec_targets(run.name):
            return self.targets[run.name]
        from loralab.engine.models import resolve_target_modules

        return resolve_target_modules(self.layers or self.base.model, run.lora.target_modules)[0]

    def _spec_targets(self, name: str) -> list[str] | None:
        return next((r.lora.target_modules for r in self.runs if r.name == name), None)


def resolve_workspace(exp: Experiment, workspace: str | Path | None) -> Path | str:
    """--workspace wins; else the file's `workspace:` (relative to the current directory); else ./loralab-workspace.
    A database URL is returned as it is."""
    return workspace_path(workspace or exp.workspace or DEFAULT_WORKSPACE)


def open_workspace(exp: Experiment, workspace: str | Path | None, create: bool = True) -> Store:
    """The experiment's workspace store; a database workspace keeps adapters under the file's `artifacts:`."""
    return Store(resolve_workspace(exp, workspace), create=create, artifacts=exp.artifacts)


def select_runs(exp: Experiment, only: list[str] | None) -> list[RunSpec]:
    if not only:
        return list(exp.resolved_runs)
    names = [r.name for r in exp.resolved_runs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SpecError("--only names runs the file does not declare",
                        [Problem("--only", "unknown run", u, f"use some of: {', '.join(names)}") for u in unknown])
    return [r for r in exp.resolved_runs if r.name in only]


def prepare(exp: Experiment, only: list[str] | None = None, reporter: Reporter | None = None) -> Prepared:
    """Load and check data, model and LoRA targets. Raises a LoralabError before anything is written."""
    from loralab.engine import data as data_mod
    from loralab.engine.models import layers_of, load_base_model, resolve_target_modules
    from loralab.execute.preflight import check_before_reading, check_plan, remember_lengths, shortest_max_seq_len

    rep = reporter or Reporter()
    runs = select_runs(exp, only)
    check_before_reading(exp, runs)
    dataset = data_mod.load_data(exp.data, exp.base_dir)
    rep.log(f"Data: {_plain(dataset.name)}: {len(dataset.train)} train / {len(dataset.eval)} eval examples "
            f"(fingerprint {dataset.fingerprint})")
    for note in surprises(exp) + data_mod.data_surprises(dataset):
        rep.log(f"Note: {_plain(note)}.")
    t0 = time.perf_counter()
    base = load_base_model(exp.model, exp.base_dir, exp.device, log=rep.log)
    rep.log(f"Model: {_plain(base.name)} ({base.arch}, {base.info['params'] / 1e6:.1f} M parameters) on {base.device} "
            f"in {base.info['dtype']}, loaded in {time.perf_counter() - t0:.1f} s")
    base.info["load_s"] = round(time.perf_counter() - t0, 2)
    targets, notes = {}, []
    for r in runs:
        targets[r.name], note = resolve_target_modules(base.model, r.lora.target_modules,
                                                       where=f"runs.{r.name}.lora.target_modules")
        if note and note not in notes:
            notes.append(note)
    for note in notes:
        rep.log(f"Note: {note}.")
    tok = base.tokenizer
    layers = layers_of(base.model)
    check_plan(exp, runs, len(dataset.train), layers)
    if not exp.data.truncate:
        lengths = data_mod.example_lengths(tok, dataset)
        if Path(base.path).is_dir():
            remember_lengths(Path(base.path), dataset, lengths)  # so `validate` needs no tokenizer next time
        data_mod.check_lengths(lengths, dataset, *shortest_max_seq_len(exp, runs))
    end_id = data_mod.end_token_id(tok)
    eval_max_len = max(r.train.max_seq_len for r in exp.resolved_runs)
    eval_encoded = [data_mod.encode_example(tok, ex, dataset.system_prompt, eval_max_len) for ex in dataset.eval]
    eval_prompts = [data_mod.example_prompt_ids(tok, ex, dataset.system_prompt) for ex in dataset.eval]
    ev = exp.evaluation
    n_probe = len(dataset.eval) if ev.train_loss_examples is None else ev.train_loss_examples
    train_probe = [data_mod.encode_example(tok, ex, dataset.system_prompt, eval_max_len) for ex in dataset.train[:n_probe]]
    reference_tokens = [len(tok(ex.output, add_special_tokens=False)["input_ids"]) for ex in dataset.eval]
    drift_prompts = []
    if ev.drift:
        from loralab.engine.drift import load_general_prompts

        general = load_general_prompts()[: ev.drift_prompts]
        drift_prompts = [data_mod.prompt_ids(tok, g["prompt"], None) for g in general]
    return Prepared(exp, runs, dataset, base, targets, eval_encoded, eval_prompts, end_id, eval_max_len,
                    train_probe, reference_tokens, drift_prompts, layers=layers)


def _plain(text: object) -> str:
    """User or model text inside a log line: shown as written, never read as rich markup."""
    from rich.markup import escape

    return escape(str(text))
