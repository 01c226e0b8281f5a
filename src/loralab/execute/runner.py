"""One run's lifecycle, under its lock: reused if stored, else its adapter made on the shared base (or a
stored adapter of the same settings evaluated again), trained, evaluated and stored by how it ended
(finished, diverged, pruned or failed), its adapter taken off the base again.

Preparing is execute.prepare, run ids execute.identity, measuring execute.evaluate, the step hooks
execute.hooks, paused trials in memory execute.parking; the experiment's loop is execute.loop.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.execute.checkpoint import Checkpoints, fsync_tree as _fsync_tree
from loralab.execute.context import RunContext
from loralab.execute.evaluate import _add_cost, _one_line, evaluate
from loralab.execute.hooks import CurveWriter, _Progress
from loralab.execute.identity import _describe, _run_config, adapter_id, run_id
from loralab.execute.jobs import Job, Outcome
from loralab.execute.parking import park
from loralab.execute.prepare import Prepared, _plain
from loralab.faults import StepFault, fault_point
from loralab.progress import Reporter
from loralab.track.hook import open_tracking
from loralab.config.schema import RunSpec
from loralab.workspace.status import REUSED, Status
from loralab.workspace.store import RunRecord, Store, storage_error


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
        session = open_session(prepared, run, ctx.adapter_name)
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
                if not park(prepared, rid, ctx.pruning.state, checkpoints):  # in memory while they fit
                    checkpoints.save(ctx.pruning.state)
                return status
        else:
            status = done.finished()
        checkpoints.remove()  # stored: nothing left to resume
        return status
    except KeyboardInterrupt:
        if store.mark(rid, Status.INTERRUPTED) in REUSED:  # its results were stored just before (the stop waited)
            checkpoints.remove()
        raise
    except Exception as err:  # one broken run must not stop the others
        return _failed(ctx, err)
    finally:
        if session is not None:
            session.close()  # the shared base without this run's adapter, as it was loaded
        if ctx.tracking is not None:  # a copy of what the workspace stored, once it is stored
            ctx.tracking.close_stored(store, rid)


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
    """The run's training examples (the first `limit`), encoded at its max_seq_len, once per length."""
    from loralab.engine.data import encode_example

    n = run.train.max_seq_len
    if n not in prepared.train_encoded:
        tok = prepared.base.tokenizer
        prepared.train_encoded[n] = [encode_example(tok, ex, prepared.dataset.system_prompt, n)
                                     for ex in prepared.dataset.train]
    return prepared.train_encoded[n][:limit]


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
