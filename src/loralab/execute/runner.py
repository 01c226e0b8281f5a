"""Run an experiment: check everything first, then train and evaluate each run, storing as it goes.

Order of work, so that bad input writes nothing and a crash loses no finished run:
1. validate the selection, the data files, the data, the model and every run's LoRA targets;
2. only then open the workspace;
3. evaluate the untrained model once as run `base`;
4. per run: add a fresh adapter to the one loaded base model, train, evaluate, save the adapter,
   store the run as finished, and remove the adapter again. When the same adapter is stored (only
   caps, evaluation or generation settings differ), load it and evaluate it instead of training.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loralab.errors import Problem, SpecError
from loralab.execute.checkpoint import Checkpoints, fsync_tree as _fsync_tree
from loralab.execute.context import RunContext
from loralab.execute.jobs import Job, Outcome
from loralab.faults import StepFault, fault_point
from loralab.progress import Reporter
from loralab.track.hook import open_tracking, track_stored
from loralab.config.loading import surprises
from loralab.config.schema import ANALYSIS_ONLY, Experiment, RunSpec, config_hash, cost_of
from loralab.workspace.status import Status
from loralab.workspace.store import DEFAULT_WORKSPACE, RunRecord, Store, storage_error, workspace_path

SAMPLE_TEXT_LIMIT = 2000  # characters of each generated answer kept in the store


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

    def targets_for(self, run: RunSpec) -> Any:
        """The target modules given to PEFT for a run: the file's runs as resolved when prepared, any
        other run (a sweep trial) resolved against the base model (with no adapter on it)."""
        if run.name in self.targets and run.lora.target_modules == self._spec_targets(run.name):
            return self.targets[run.name]
        from loralab.engine.models import resolve_target_modules

        return resolve_target_modules(self.layers or self.base.model, run.lora.target_modules)[0]

    def _spec_targets(self, name: str) -> list[str] | None:
        return next((r.lora.target_modules for r in self.runs if r.name == name), None)


@dataclass
class ExperimentResult:
    workspace: Path
    records: list[RunRecord]  # base first, then the runs in file order
    skipped: list[str] = field(default_factory=list)  # already finished, reused
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)

    def groups(self) -> dict[str, list[RunRecord]]:
        """Records by run name, all seeds of a run together, in file order."""
        out: dict[str, list[RunRecord]] = {}
        for r in self.records:
            out.setdefault(r.name, []).append(r)
        return out


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


def adapter_id(prepared: Prepared, run: RunSpec) -> str:
    """What the run's adapter is: the same function of its settings that its stored row gets
    (store.adapter_identity), so a stored adapter is found by the settings that would train it."""
    from loralab.workspace.store import adapter_identity

    return adapter_identity(_run_config(prepared, run), *_describe(prepared))


def run_id(prepared: Prepared, run: RunSpec | None, full_eval: bool = True, probe: bool = True) -> str:
    """One stored run: an adapter (adapter_id) evaluated one way (caps, evaluation and generation
    settings). Adding a cap or changing generate.batch_size makes new run ids of the same adapters,
    which are evaluated again, not retrained (train_run).

    A loss-only evaluation (a sweep trial that needs no generation) is a different run, so a later
    `loralab run` of the same settings does not reuse it without its generation metrics."""
    evaluation = prepared.exp.evaluation.model_dump(exclude=ANALYSIS_ONLY)
    if not full_eval:
        evaluation["loss_only"] = True
    if not probe:  # no training-probe loss (nor generalization gap) either
        evaluation["train_probe"] = False
    how = {"eval_caps": prepared.exp.eval_caps, "eval_max_len": prepared.eval_max_len, "evaluation": evaluation}
    groups = [ex.group for ex in prepared.dataset.eval]
    if any(g is not None for g in groups):  # data.group_field: samples stored without the groups are evaluated anew
        how["eval_groups"] = config_hash(groups)
    if run is None:  # the untrained model: what it is and how it is evaluated
        what = {"model": prepared.base.fingerprint, "data": prepared.dataset.fingerprint, "system_prompt": prepared.dataset.system_prompt,
                "device": str(prepared.base.device).split(":")[0], "dtype": prepared.base.info["dtype"]}
        return "base-" + config_hash({"kind": "base", **what, **how})
    return config_hash({"adapter": adapter_id(prepared, run), **how, "generate": run.generate.model_dump()})


def evaluate(model, prepared: Prepared, label: str, rep: Reporter, batch_size: int,
             full: bool = True, probe: bool = True) -> tuple[dict, list, dict]:
    """Held-out and training-probe loss, one greedy generation at the largest cap (smaller caps are
    its prefixes), per-example quality and verbosity, and drift from the base model.
    `full=False` stops after the losses (what a loss objective needs); `probe=False` (only with
    full=False) skips the training-probe loss too, when not even the generalization gap is asked for."""
    from loralab.engine.generate import at_cap, generate_greedy
    from loralab.metrics.scores import example_metrics, perplexity, summarize_examples
    from loralab.engine.train import eval_losses

    tok = prepared.base.tokenizer
    caps = prepared.exp.eval_caps
    t0 = time.perf_counter()
    loss, per_example_loss, loss_tokens = eval_losses(model, prepared.eval_encoded, pad_id=tok.pad_token_id)
    probed = prepared.train_probe if probe or full else []
    train_loss = eval_losses(model, probed, pad_id=tok.pad_token_id)[0] if probed else float("nan")
    t1 = time.perf_counter()
    fault_point("evaluate")
    samples = [{"id": ex.id, "prompt": ex.instruction, "reference": ex.output, "loss": l_, "loss_tokens": n,
                "outputs": {}, **({"group": ex.group} if ex.group is not None else {})}
               for ex, l_, n in zip(prepared.dataset.eval, per_example_loss, loss_tokens)]
    metrics: dict[str, Any] = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
    if probed or full:
        metrics.update({"train_eval_loss": train_loss, "train_ppl": perplexity(train_loss),
                        "generalization_gap": loss - train_loss})
    if not full:
        metrics.update({"eval_s": round(t1 - t0, 2), "eval_tokens": sum(len(e.input_ids) for e in prepared.eval_encoded + probed)})
        return metrics, samples, {"eval_loss_s": round(t1 - t0, 2)}
    with rep.task(f"generate {label}", total=len(prepared.eval_prompts), unit="prompts") as update:
        gens = generate_greedy(model, prepared.eval_prompts, max(caps), eos_token_ids=[prepared.end_id],
                               pad_token_id=tok.pad_token_id, batch_size=batch_size,
                               progress=lambda n: update(advance=n))
    t2 = time.perf_counter()
    for cap in caps:
        rows = []
        for s, g, ex, ref_n in zip(samples, gens, prepared.dataset.eval, prepared.reference_tokens):
            c = at_cap(g, cap)
            text = tok.decode(c.tokens, skip_special_tokens=True).strip()
            m = example_metrics(text, ex.output, c.tokens, ref_n, c.stopped, cap)
            rows.append(m)
            s["outputs"][str(cap)] = {"text": text[:SAMPLE_TEXT_LIMIT], "tokens": len(c.tokens), "stopped": c.stopped,
                                      "metrics": m}
        metrics.update({f"{k}@{cap}": v for k, v in summarize_examples(rows).items() if k != "n"})
    drift_s = 0.0
    if prepared.drift_prompts and hasattr(model, "disable_adapter"):
        from loralab.engine.drift import base_answers, measure_drift

        t3 = time.perf_counter()
        dmax = prepared.exp.evaluation.drift_max_new_tokens
        kw = dict(max_new_tokens=dmax, eos_token_ids=[prepared.end_id], pad_token_id=tok.pad_token_id, batch_size=batch_size)
        passes = 2 + (prepared.drift_base is None)  # the base's answers (once per experiment), the adapter's, the KL
        with rep.task(f"drift {label}", total=passes * len(prepared.drift_prompts), unit="prompt passes") as update:
            if prepared.drift_base is None:
                prepared.drift_base = base_answers(model, prepared.drift_prompts, progress=lambda n: update(advance=n), **kw)
            d = measure_drift(model, prepared.drift_prompts, base=prepared.drift_base,
                              progress=lambda n: update(advance=n), **kw)
        metrics.update({"drift_kl": d.kl_mean, "drift_agreement": d.agreement})
        drift_s = time.perf_counter() - t3
    elif prepared.drift_prompts:
        metrics.update({"drift_kl": 0.0, "drift_agreement": 1.0})  # the base model, by definition
    generated = sum(len(g.tokens) for g in gens)
    eval_tokens = sum(len(e.input_ids) for e in prepared.eval_encoded + probed) + generated
    timings = {"eval_loss_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2), "drift_s": round(drift_s, 2),
               "generated_tokens": generated,
               "generate_tokens_per_s": round(generated / (t2 - t1), 1) if t2 > t1 else None}
    metrics["eval_s"] = round(time.perf_counter() - t0, 2)
    metrics["eval_tokens"] = eval_tokens
    return metrics, samples, timings


def _describe(prepared: Prepared) -> tuple[dict, dict]:
    b, d = prepared.base, prepared.dataset
    model = {"name": b.name, "path": b.path, "fingerprint": b.fingerprint, "arch": b.arch, **b.info}
    data = {"name": d.name, "fingerprint": d.fingerprint, "n_train": len(d.train), "n_eval": len(d.eval),
            "system_prompt": d.system_prompt}
    return model, data


def _run_config(prepared: Prepared, run: RunSpec | None) -> dict:
    cfg: dict[str, Any] = {"eval_caps": prepared.exp.eval_caps, "device": str(prepared.base.device), "dtype": prepared.base.info["dtype"],
                           "evaluation": prepared.exp.evaluation.model_dump(),
                           "cost": prepared.exp.cost.model_dump() if prepared.exp.cost else None}
    if run is not None:
        cfg.update({"lora": run.lora.model_dump(), "train": run.train.model_dump(),
                    "generate": run.generate.model_dump(), "resolved_target_modules": prepared.targets_for(run)})
    return cfg


def _add_cost(metrics: dict, prepared: Prepared) -> None:
    """Wall time in, money out: (train + eval seconds) x the price per hour, when one is set."""
    total = metrics.get("train_s", 0.0) + metrics.get("init_s", 0.0) + metrics.get("eval_s", 0.0)
    metrics["total_s"] = round(total, 2)
    if prepared.exp.cost is not None:
        metrics["cost"] = round(cost_of(total, prepared.exp.cost.per_hour), 6)


def store_base(prepared: Prepared, store: Store, rep: Reporter, ws: Path | str, force: bool = False) -> tuple[RunRecord, bool]:
    """The untrained model, evaluated once and stored as run `base`, the reference point of every table;
    reused when stored finished already (unless `force`). Returns (its record named "base", reused)."""
    from loralab import environment

    exp = prepared.exp
    gen_batch = max(r.generate.batch_size for r in prepared.runs) if prepared.runs else 16
    bid = run_id(prepared, None)
    reused = False
    with store.run_lock(bid, on_wait=lambda: rep.log("base: another process is evaluating it; waiting")):
        done = store.get(bid)
        if done and done.status == Status.FINISHED and not force:
            store.alias(exp.name, "base", bid)
            reused = True
            rep.log(f"base: finished earlier ({bid}), reused")
        else:
            model_info, data_info = _describe(prepared)
            store.start(bid, name="base", experiment=exp.name, kind="base", config=_run_config(prepared, None),
                        model=model_info, data=data_info, env=environment.record(str(prepared.base.device)))
            try:
                metrics, samples, timings = evaluate(prepared.base.model, prepared, "base", rep, gen_batch)
            except KeyboardInterrupt:
                store.mark(bid, Status.INTERRUPTED)
                raise
            _add_cost(metrics, prepared)
            store.finish(bid, metrics=metrics, curves={}, samples=samples, timings=timings, adapter_path=None)
            rep.log(_one_line("base", metrics, prepared.exp.eval_caps))
            track_stored(exp, "base", bid, exp.name, ws, {**_run_config(prepared, None), "model": model_info,
                                                           "data": data_info}, store, rep.log)
    fault_point("run.stored")
    return replace(store.get(bid), name="base"), reused


def store_failed(prepared: Prepared, job: Job, store: Store, error: str) -> Outcome:
    """Store a job that could not run where it was sent (its worker died each time) as a failed run,
    so the sweep or experiment goes on as with any failed run."""
    rid = run_id(prepared, job.run, job.full_eval, job.probe)
    if store.get(rid) is None:  # the worker died before it began the run
        model_info, data_info = _describe(prepared)
        store.start(rid, name=job.run.name, experiment=job.experiment.name, kind="lora",
                    config=_run_config(prepared, job.run), model=model_info, data=data_info, env={},
                    seed=job.run.train.seed)
    store.mark(rid, Status.FAILED, error)
    return Outcome(rid, Status.FAILED, False)


def reusable(done: RunRecord) -> bool:
    """A stored run that a rerun takes as is: finished with its adapter on disk, or diverged
    (an outcome, not an accident). Pruned runs are not: a pruner stopped them relative to others."""
    return done.status == Status.DIVERGED or (done.status == Status.FINISHED and _adapter_ok(done))


def train_run(prepared: Prepared, run: RunSpec, store: Store, *, experiment: str, label: str | None = None,
              reporter: Reporter | None = None, pruning=None, force: bool = False,
              env: dict | None = None, full_eval: bool = True, probe: bool = True) -> tuple[str, bool]:
    """Train, evaluate and store one run (its seed is run.train.seed) unless an equal run is stored.

    When only the evaluation differs from a stored run (a new cap, another generate.batch_size), the
    stored adapter is evaluated and nothing is trained; that is new work, so `reused` is False.
    Returns (status, reused). A plain function of the prepared model, the run and the store, so a
    sweep trial, or a worker in another process with its own `prepare`, runs exactly this code.
    `pruning` (a pruning.PruningHook) is one of the training's step hooks; when it stops training the run
    is stored `pruned`, with the loss the pruner judged.
    """
    from loralab import environment

    rep = reporter or Reporter()
    rid = run_id(prepared, run, full_eval, probe)
    # Another process training the same run (a second `loralab run`, a parallel sweep): wait, then reuse it.
    with store.run_lock(rid, on_wait=lambda: rep.log(f"{label or run.name}: another process is training it; waiting")):
        done = store.get(rid)
        if done is not None and not force and done.status == Status.FINISHED and not _adapter_ok(done):
            here = store.run_dir(rid) / "adapter"  # a moved or copied workspace keeps the old absolute path
            if (here / "adapter_config.json").is_file() and Path(done.adapter_path or "").resolve() != here.resolve():
                store.set_adapter_path(rid, str(here))
                rep.log(f"{label or run.name}: the workspace moved; its adapter is found at {here}")
                done = store.get(rid)
        if done is not None and not force and reusable(done):
            store.alias(experiment, run.name, rid, run.train.seed)
            rep.log(f"{label or run.name}: {done.status} earlier ({rid}), reused")
            return done.status, True
        model_info, data_info = _describe(prepared)
        env = env or environment.record(str(prepared.base.device))
        source = None if force else stored_adapter(store, adapter_id(prepared, run))
        if force:  # trained anew, not continued
            Checkpoints(store.run_dir(rid), None).remove()
        ctx = RunContext(prepared, run, store, rep, label or run.name, rid, experiment, model_info, data_info, env,
                         pruning=pruning, full_eval=full_eval, probe=probe)
        status = _train_one(ctx, source)
    fault_point("run.stored")
    return status, False


def _adapter_ok(rec: RunRecord) -> bool:
    return bool(rec.adapter_path) and (Path(rec.adapter_path) / "adapter_config.json").is_file()


def stored_adapter(store: Store, aid: str | None) -> RunRecord | None:
    """A stored run of the adapter `aid` whose training a new evaluation can take: finished with its
    adapter on disk, else diverged (it would diverge again; there is nothing to evaluate)."""
    if aid is None:
        return None
    runs = store.adapter_runs(aid)
    return next((r for r in runs if r.status == Status.FINISHED and _adapter_ok(r)),
                next((r for r in runs if r.status == Status.DIVERGED), None))


def _evaluate_stored(ctx: RunContext, source: RunRecord) -> str:
    """Store run `rid` from the adapter `source` trained: its training metrics, curves and training
    time are carried over, the evaluation is measured anew. Called by _train_one after store.start,
    inside its error handling (interrupt, full disk, failure).

    Time and money: the row's metrics describe the configuration, so train_s is the adapter's and
    total_s/cost = its training + this evaluation, comparable with any other run; its timings describe
    this row's own work: train_s 0 and train_reused_from naming the run that paid for the training."""
    from loralab.metrics.table import metric

    prepared, store, rid, label, rep = ctx.prepared, ctx.store, ctx.rid, ctx.label, ctx.rep
    reused = {"train_s": 0.0, "train_reused_from": source.id}
    if source.status == Status.DIVERGED:
        metrics = {k: v for k, v in source.metrics.items() if k not in ("total_s", "cost")}
        _add_cost(metrics, prepared)
        store.finish(rid, metrics=metrics, curves=source.curves, samples=[], timings=reused, adapter_path=None,
                     status=Status.DIVERGED, error=source.error)
        rep.log(f"[yellow]{label}: diverged in training earlier ({source.id}); not trained again[/yellow]")
        return Status.DIVERGED
    run_dir = store.run_dir(rid)
    tmp, final = run_dir / "adapter.tmp", run_dir / "adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    # The run's own copy first (hard links: no space), so a later forced retrain or repair of `source`,
    # which replaces or removes its folder, leaves this run whole; doctor finds each adapter in its run's folder.
    with store.run_lock(source.id):
        _link_tree(Path(source.adapter_path), tmp)
    with open_session(ctx.prepared, ctx.run, ctx.adapter_name).load(tmp) as session:
        metrics, samples, timings = evaluate(session.model, prepared, label, rep, ctx.gen_batch, full=ctx.full_eval,
                                             probe=ctx.probe)
    metrics.update({k: v for k, v in source.metrics.items()
                    if k == "adapter_bytes" or (metric(k) is not None and metric(k).stage == "training")})
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _add_cost(metrics, prepared)
    store.finish(rid, metrics=metrics, curves=source.curves, samples=samples, timings={**timings, **reused},
                 adapter_path=str(final))
    rep.log(_one_line(label, metrics, prepared.exp.eval_caps) + f", adapter of {source.id} evaluated, not trained again")
    return Status.FINISHED


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a folder's files into a new folder, copying where a link cannot be made (another disk)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def restore_base(prepared: Prepared, peft_model=None) -> None:
    """Every adapter off the shared base (their sessions closed, engine.session), and the base weights an
    initialisation rewrote put back: the prepared base model is shared by every run."""
    from loralab.engine.session import close_all

    close_all(prepared.base, peft_model)


def _one_line(name: str, m: dict, caps: list[int]) -> str:
    cap = max(caps)
    text = f"{name}: eval loss {m['eval_loss']:.4f}"
    if f"rouge_l@{cap}" in m:  # absent when only the losses were measured
        text += f", ROUGE-L@{cap} {m[f'rouge_l@{cap}']:.3f}, mean tokens@{cap} {m[f'mean_tokens@{cap}']:.1f}"
    return text


def _train_one(ctx: RunContext, source: RunRecord | None = None) -> str:
    """Train, evaluate and store one run; returns its final status (finished, diverged, pruned or failed).
    With `source` (a stored run of the same adapter) nothing is trained: see _evaluate_stored."""
    prepared, run, store, rid, rep = ctx.prepared, ctx.run, ctx.store, ctx.rid, ctx.rep
    config = _run_config(prepared, run)
    ctx.checkpoints = checkpoints = Checkpoints(store.run_dir(rid), adapter_id(prepared, run))
    parked = prepared.parked.pop(rid, None) if source is None else None  # paused in memory (sweep.halving)
    state = parked.state if parked else checkpoints.load(rep.log) if source is None else None  # or a killed attempt's
    store.start(rid, name=run.name, experiment=ctx.experiment, kind="lora", config=config, model=ctx.model_info,
                data=ctx.data_info, env=ctx.env, seed=ctx.seed, resume_from=state["step"] if state else None)
    ctx.tracking = open_tracking(prepared.exp, run.name, ctx.seed, rid, ctx.experiment, store.root,
                                 {**config, "model": ctx.model_info, "data": ctx.data_info}, rep.log)  # None: no `track:`
    session = None
    try:
        if source is not None:
            ctx.reached["trained"] = True  # an out-of-memory error here is the evaluation's
            return _evaluate_stored(ctx, source)
        if parked is not None:
            session = parked.session
            session.activate()
        else:
            session = open_session(prepared, run, ctx.adapter_name)
            if session.init.converts:  # it needs the base to itself: paused ones go to their checkpoints
                unpark(prepared)
            if session.init.announce:  # a slow start (EVA's data pass), before the progress bar starts
                rep.log(f"{ctx.label}: {session.init.announce}")
            session.create()
            session.keep_start(store.run_dir(rid) / "adapter_init")  # PiSSA/OLoRA: converted against it when saved
        res, monitor = _train(ctx, session.model, session.adopt(state))
        ctx.reached["trained"] = True
        done = _Done(ctx, session, res)
        if res.stopped_by is monitor:
            status = done.diverged(monitor)
        elif res.stopped_by is not None and res.stopped_by is ctx.pruning:
            status = done.pruned(ctx.pruning)  # a pruned trial keeps no checkpoint: it is not continued
            if getattr(ctx.pruning, "state", None) is not None:  # paused (sweep.halving): continued from here, or dropped
                if park(prepared, rid, session, ctx.pruning.state, checkpoints):
                    session = None  # stays on the base, in memory, until continued or dropped
                else:
                    checkpoints.save(ctx.pruning.state)
                return status
        else:
            status = done.finished()
        checkpoints.remove()  # stored: nothing left to resume
        return status
    except KeyboardInterrupt:
        store.mark(rid, Status.INTERRUPTED)
        raise
    except Exception as err:  # one broken run must not stop the others
        return _failed(ctx, err)
    finally:
        if session is not None:
            session.close()  # the shared base without this run's adapter, as it was loaded
        if ctx.tracking is not None:  # a copy of what the workspace stored, once it is stored
            ctx.tracking.close_stored(store, rid)


@dataclass
class Parked:
    """A paused sweep trial kept in memory: its adapter on the base (inactive), its trainer's state, and
    where its checkpoint goes should it have to leave memory."""

    session: Any  # engine.session.AdapterSession
    state: dict  # engine.train.Trainer.state_dict() at the pause
    checkpoints: Checkpoints
    nbytes: int


def park(prepared: Prepared, rid: str, session, state: dict, checkpoints: Checkpoints) -> bool:
    """Keep a paused trial in memory instead of a checkpoint on disk, when allowed (prepared.park_bytes),
    when it fits beside the ones kept already, and when its adapter can share the base with others (a
    PiSSA/OLoRA init rewrites the base; `lora.bias` trains the base's own biases). Continued, it goes on
    from the same state as from its checkpoint; a crash loses it, and the sweep trains it to the rung again."""
    import torch

    if not prepared.park_bytes or session.init.converts or session.lora.bias != "none":
        return False
    tensors = [state["trainable"], state["optimizer"].get("state", {})]
    nbytes = sum(t.numel() * t.element_size() for d in tensors for t in _tensors(d) if isinstance(t, torch.Tensor))
    nbytes *= 2  # the adapter's own weights on the base too, and slack
    if nbytes + sum(p.nbytes for p in prepared.parked.values()) > prepared.park_bytes:
        return False
    prepared.parked[rid] = Parked(session, state, checkpoints, nbytes)
    return True


def _tensors(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _tensors(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            yield from _tensors(v)
    else:
        yield d


def unpark(prepared: Prepared, rid: str | None = None, *, keep: bool = True) -> None:
    """Paused trials out of memory (`rid`: that one, else all): each to its checkpoint (`keep`), so it is
    continued from disk as before, or dropped (keep=False: a trial that did not make its rung)."""
    for key in [rid] if rid is not None else list(prepared.parked):
        p = prepared.parked.pop(key, None)
        if p is None:
            continue
        if keep:
            p.checkpoints.save(p.state)
        p.session.close()


def open_session(prepared: Prepared, run: RunSpec, name: str):
    """The run's adapter session on the prepared base (engine.session; not yet created): its settings,
    targets and seed, and what its initialisation may read (the run's training examples, the weights)."""
    from loralab.engine.inits import InitSource
    from loralab.engine.session import AdapterSession

    base = prepared.base
    source = InitSource(lambda n: train_encoded(prepared, run, n), base.tokenizer.pad_token_id, base.device,
                        base.path, prepared.exp.model.revision)
    return AdapterSession(base, name, run.lora, prepared.targets_for(run), seed=run.train.seed, source=source)


def with_lora(prepared: Prepared, run: RunSpec, name: str = "default"):
    """The base model with a fresh LoRA adapter of the run's settings, initialised from its seed: the
    PeftModel of an adapter session (engine.session) that restore_base takes off again. For scripts and
    tests that index the model by the adapter's name ("default" unless given); a run names its own."""
    return open_session(prepared, run, name).create().model


def train_encoded(prepared: Prepared, run: RunSpec, limit: int | None = None) -> list:
    """The run's training examples (the first `limit`), encoded at its max_seq_len."""
    from loralab.engine.data import encode_example

    tok = prepared.base.tokenizer
    return [encode_example(tok, ex, prepared.dataset.system_prompt, run.train.max_seq_len)
            for ex in prepared.dataset.train[:limit]]


def _train(ctx: RunContext, peft_model, state: dict | None = None):
    """The training loop with its step hooks: divergence, progress, the streamed curve, the fault point,
    the pruner, the trackers and, last (never saving a step another hook stopped at), the checkpoints.
    `state`: a checkpoint to continue from."""
    from loralab.metrics.stability import DivergenceMonitor
    from loralab.engine.train import plan_steps, train_lora

    prepared, run, label, rep, reached, pruning = ctx.prepared, ctx.run, ctx.label, ctx.rep, ctx.reached, ctx.pruning
    curve, tracking, checkpoints = CurveWriter(ctx.store, ctx.rid), ctx.tracking, ctx.checkpoints
    tok = prepared.base.tokenizer
    train_enc = train_encoded(prepared, run)
    with rep.task(f"train {label}", total=plan_steps(len(train_enc), run.train), unit="steps") as update:
        monitor = DivergenceMonitor()
        if state is not None:
            rep.log(f"{label}: resumed at step {state['step']} of {state['total']} from its checkpoint")
            update(advance=state["step"])
            reached["step"] = state["step"]
            for s, loss in zip(state["curve"]["step"], state["curve"]["loss"]):  # as if it had watched them
                monitor.update(s, loss)
            ctx.rungs = state.get("rungs") or {}  # the rungs it passed before it paused (sweep.halving)
            if hasattr(pruning, "measured"):
                pruning.measured.update({int(k): float(v) for k, v in ctx.rungs.get("rung_losses", {}).items()})
        hooks = [monitor, _Progress(reached, update), curve, StepFault()] + ([pruning] if pruning is not None else [])
        hooks += [tracking] if tracking is not None else []
        saver = checkpoints.hook(run.train, before_save=curve.flush) if checkpoints is not None else None
        hooks += [saver] if saver is not None else []
        try:
            return train_lora(peft_model, train_enc, run.train, pad_id=tok.pad_token_id, hooks=hooks,
                              loraplus_lr_ratio=run.lora.loraplus_lr_ratio, state=state), monitor
        finally:
            curve.flush()  # what was trained, also when training stopped on an error or Ctrl-C


@dataclass
class _Done:
    """A trained run, stored by how its training ended: diverged, pruned, or finished (evaluated, with
    its adapter fsynced on disk before the row says so)."""

    ctx: RunContext
    session: Any  # engine.session.AdapterSession: the run's adapter on the base
    res: Any  # train.TrainResult

    def __post_init__(self) -> None:
        ctx = self.ctx
        self.prepared, self.run, self.label, self.rid, self.store, self.rep = (ctx.prepared, ctx.run, ctx.label,
                                                                               ctx.rid, ctx.store, ctx.rep)
        self.timed = self.session.init.timed  # kept: PiSSA/OLoRA load the converted adapter before storing

    @property
    def planned(self) -> int:
        from loralab.engine.train import plan_steps

        return plan_steps(len(self.prepared.dataset.train), self.run.train)

    def train_metrics(self) -> dict:
        from loralab.metrics.stability import stability_summary

        res = self.res
        out = {"train_loss_final": res.curve["loss"][-1], "train_s": round(res.wall_s, 2), "train_tokens": res.tokens,
               "tokens_per_s": round(res.tokens_per_s, 1), "peak_mem_mb": round(res.peak_mem_mb, 1),
               "trainable_params": res.trainable_params, "total_params": res.total_params, "steps": res.steps,
               "planned_steps": self.planned, "padding_share": round(res.padding_share, 4)}
        out.update({k: v for k, v in stability_summary(res.curve).items() if k != "spike_steps"})
        if self.timed:  # an SVD, QR, EVA's data pass or LoftQ's fit is part of the run's cost
            out["init_s"] = round(self.session.init_s, 3)
        # a sweep trial: the held-out losses its pruner measured, before a pause too
        out.update((self.ctx.pruning.rungs() if hasattr(self.ctx.pruning, "rungs") else {}) or self.ctx.rungs)
        return out

    def train_timings(self) -> dict:
        """train_s counts every attempt's training up to the checkpoint it went on from (what the adapter
        cost); `resumed_at`: the steps it went on at."""
        out = {"train_s": round(self.res.wall_s, 2)}
        return {**out, "resumed_at": self.res.resumed_at} if self.res.resumed_at else out

    def diverged(self, monitor) -> str:
        from loralab.metrics.stability import diagnose

        run, res = self.run, self.res
        blame = diagnose(run.train.learning_rate, run.lora.r, run.lora.alpha)
        metrics = {**self.train_metrics(), "diverged_step": res.steps, "last_good_loss": monitor.last_good_loss,
                   "eval_s": 0.0, "saved_steps": self.planned - res.steps}
        _add_cost(metrics, self.prepared)
        text = (f"diverged: {res.stop_reason}; last good loss {monitor.last_good_loss} at step "
                f"{monitor.last_good_step}. Most likely: {' '.join(blame)}")
        self.store.finish(self.rid, metrics=metrics, curves={**res.curve, "diagnosis": blame}, samples=[],
                          timings=self.train_timings(), adapter_path=None, status=Status.DIVERGED, error=text)
        self.rep.log(f"[yellow]{self.label}: {text}[/yellow]")
        return Status.DIVERGED

    def pruned(self, pruning) -> str:
        """Keep the loss its pruner judged, skip generation, count what was saved."""
        from loralab.metrics.scores import perplexity
        from loralab.engine.train import eval_loss

        prepared, res = self.prepared, self.res
        t0 = time.perf_counter()
        seen = pruning.loss_at(res.steps)  # (loss, examples, whole set?)
        if seen is not None and not seen[2]:  # judged on a subset: no whole-set loss is paid for a dropped trial
            losses = {"pruned_loss": seen[0], "pruned_loss_examples": seen[1]}
            said = f"loss {seen[0]:.4f} on {seen[1]} eval examples"
        else:
            loss = seen[0] if seen is not None else eval_loss(self.session.model, prepared.eval_encoded,
                                                              pad_id=prepared.base.tokenizer.pad_token_id)
            losses = {"eval_loss": loss, "eval_ppl": perplexity(loss), "pruned_loss": loss,
                      "pruned_loss_examples": len(prepared.eval_encoded)}
            said = f"eval loss {loss:.4f}"
        saved = self.planned - res.steps
        metrics = {**self.train_metrics(), **losses, "eval_s": round(time.perf_counter() - t0, 2),
                   "pruned_step": res.steps, "saved_steps": saved,
                   "saved_s": round(saved * res.wall_s / res.steps, 2)}  # at its own seconds per step
        _add_cost(metrics, prepared)
        text = f"pruned at step {res.steps} of {self.planned} ({said}); {saved} steps not trained"
        self.store.finish(self.rid, metrics=metrics, curves=res.curve, samples=[],
                          timings=self.train_timings(), adapter_path=None, status=Status.PRUNED, error=text)
        if getattr(pruning, "state", None) is not None:  # sweep.halving's pause: stored as pruned there until continued
            self.rep.log(f"{self.label}: paused at step {res.steps} of {self.planned} ({said}): it goes on from there "
                         "or stays pruned once every trial of its rung is measured")
        else:
            self.rep.log(f"{self.label}: {text}")
        return Status.PRUNED

    def finished(self) -> str:
        ctx, prepared, res, session = self.ctx, self.prepared, self.res, self.session
        run_dir = self.store.run_dir(self.rid)
        tmp, final = run_dir / "adapter.tmp", run_dir / "adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        converted = session.init.converts
        if converted:  # PiSSA/OLoRA: evaluated as stored, the converted adapter on the original base weights
            # converted to plain LoRA on the original base weights (rank 2r, DoRA magnitudes kept): it loads
            # on the unchanged base like any adapter
            session.save(tmp)
            session.load(tmp)
        metrics, samples, timings = evaluate(session.model, prepared, self.label, self.rep, ctx.gen_batch,
                                             full=ctx.full_eval, probe=ctx.probe)
        metrics.update(self.train_metrics())
        if not converted:
            session.save(tmp)  # PEFT format: adapter_config.json + adapter_model.safetensors
        fault_point("adapter.save")
        _fsync_tree(tmp)  # on disk before the database says finished, even across a power cut
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(run_dir / "adapter_init", ignore_errors=True)  # only needed for the conversion
        metrics["adapter_bytes"] = sum(f.stat().st_size for f in final.iterdir())
        _add_cost(metrics, prepared)
        self.store.finish(self.rid, metrics=metrics, curves=res.curve, samples=samples,
                          timings={**timings, **self.train_timings()}, adapter_path=str(final))
        self.rep.log(_one_line(self.label, metrics, prepared.exp.eval_caps) + f", trained {res.steps} steps in "
                     f"{res.wall_s:.0f} s ({res.tokens_per_s:.0f} tokens/s)")
        return Status.FINISHED


def _failed(ctx: RunContext, err: Exception) -> str:
    """A run that raised: marked failed with its traceback (out of memory: with the knobs to turn); a full
    disk stops the experiment, since every later run would fail the same way."""
    import torch

    run, label, rid, store, rep, reached = ctx.run, ctx.label, ctx.rid, ctx.store, ctx.rep, ctx.reached
    shutil.rmtree(store.run_dir(rid) / "adapter.tmp", ignore_errors=True)
    full = storage_error(err, store.root)
    if full is not None:
        try:
            store.mark(rid, Status.FAILED, str(full))
        except Exception:
            pass  # the database is on the same full disk; the row stays `running`, which doctor reports
        raise full from None
    trace = "".join(traceback.format_exception(err))[-4000:]
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        where = "evaluation" if reached["trained"] else f"training step {reached['step'] + 1}"
        reason = (f"out of memory in {where} ({type(err).__name__}). Fix: lower train.batch_size "
                  f"({run.train.batch_size}) or train.max_seq_len ({run.train.max_seq_len}) and raise "
                  f"train.gradient_accumulation to keep the effective batch; in evaluation, lower "
                  f"generate.batch_size ({run.generate.batch_size})")
        store.mark(rid, Status.FAILED, f"{trace}\n{reason}")  # the reason last: what `show` and the sweep print
        rep.log(f"[red]{label}: {_plain(reason)}[/red]")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Status.FAILED
    store.mark(rid, Status.FAILED, trace)
    rep.log(f"[red]{label}: failed: {type(err).__name__}: {_plain(err)}[/red]")
    return Status.FAILED


class _Progress:
    """A training step hook: the progress bar, and the step an error would strike after."""

    def __init__(self, reached: dict, update):
        self.reached, self.update = reached, update

    def after_step(self, step) -> None:
        self.reached["step"] = step.step
        self.update(loss=step.loss)


class CurveWriter:
    """A training step hook that streams the curve to the workspace (Store.append_steps) while the run
    trains: the first step at once, then a batch every `every_s` seconds, so a watcher sees it grow, a
    crash loses at most the last batch, and the writes (one transaction each) cost far below 1% of
    training (BENCHMARKS.md). A write that fails (disk full) is dropped, not fatal: the run's result is
    stored, or refused, on its own terms."""

    def __init__(self, store: Store, run_id: str, every_s: float = 5.0):
        self.store, self.run_id, self.every_s = store, run_id, every_s
        self.pending: list[dict] = []
        self.last = None  # when the last batch was written
        self.broken = False

    def after_step(self, step) -> None:
        self.pending.append({**step.row(), "total": step.total})
        if self.last is None or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.last = time.monotonic()
        if batch and not self.broken:
            try:
                self.store.append_steps(self.run_id, batch)
            except Exception:  # the curve is a by-product: never the reason a run is lost
                self.broken = True
