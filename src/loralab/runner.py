"""Run an experiment: check everything first, then train and evaluate each run, storing as it goes.

Order of work, so that bad input writes nothing and a crash loses no finished run:
1. validate the selection, the data files, the data, the model and every run's LoRA targets;
2. only then open the workspace;
3. evaluate the untrained model once as run `base`;
4. per run: add a fresh adapter to the one loaded base model, train, evaluate, save the adapter,
   store the run as finished, and remove the adapter again.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, SpecError
from .progress import Reporter
from .spec import Experiment, RunSpec, check_data_paths, config_hash
from .store import DEFAULT_WORKSPACE, RunRecord, Store

SAMPLE_TEXT_LIMIT = 2000  # characters of each generated answer kept in the store


@dataclass
class Prepared:
    """Everything loaded and checked before the workspace is touched."""

    exp: Experiment
    runs: list[RunSpec]
    dataset: Any
    base: Any  # models.BaseModel
    targets: dict[str, Any]  # run name -> target modules given to PEFT
    eval_encoded: list
    eval_prompts: list[list[int]]
    end_id: int
    eval_max_len: int


@dataclass
class ExperimentResult:
    workspace: Path
    records: list[RunRecord]  # base first, then the runs in file order
    skipped: list[str] = field(default_factory=list)  # already finished, reused
    failed: list[str] = field(default_factory=list)


def resolve_workspace(exp: Experiment, workspace: str | Path | None) -> Path:
    """--workspace wins; else the file's `workspace:` (relative to the current directory); else ./loralab-workspace."""
    return Path(workspace or exp.workspace or DEFAULT_WORKSPACE).expanduser().resolve()


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
    from . import data as data_mod
    from .models import load_base_model, resolve_target_modules

    rep = reporter or Reporter()
    runs = select_runs(exp, only)
    problems = check_data_paths(exp)
    if problems:
        raise SpecError(f"{exp.source or 'experiment'}: data file missing", problems)
    dataset = data_mod.load_data(exp.data, exp.base_dir)
    rep.log(f"Data: {dataset.name}: {len(dataset.train)} train / {len(dataset.eval)} eval examples "
            f"(fingerprint {dataset.fingerprint})")
    t0 = time.perf_counter()
    base = load_base_model(exp.model, exp.base_dir, exp.device, log=rep.log)
    rep.log(f"Model: {base.name} ({base.arch}, {base.info['params'] / 1e6:.1f} M parameters) on {base.device} "
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
    end_id = data_mod.end_token_id(tok)
    eval_max_len = max(r.train.max_seq_len for r in exp.resolved_runs)
    eval_encoded = [data_mod.encode_example(tok, ex, dataset.system_prompt, eval_max_len) for ex in dataset.eval]
    eval_prompts = [data_mod.prompt_ids(tok, ex.instruction, dataset.system_prompt) for ex in dataset.eval]
    return Prepared(exp, runs, dataset, base, targets, eval_encoded, eval_prompts, end_id, eval_max_len)


def run_id(p: Prepared, run: RunSpec | None) -> str:
    """A hash of what determines the results: resolved config, model, data and eval caps."""
    common = {"model": p.base.fingerprint, "data": p.dataset.fingerprint, "eval_caps": p.exp.eval_caps,
              "eval_max_len": p.eval_max_len, "system_prompt": p.dataset.system_prompt}
    if run is None:
        return "base-" + config_hash({"kind": "base", **common})
    return config_hash({"kind": "lora", **common, "lora": run.lora.model_dump(), "train": run.train.model_dump(),
                        "generate": run.generate.model_dump(), "targets": p.targets[run.name]})


def evaluate(model, p: Prepared, label: str, rep: Reporter, batch_size: int) -> tuple[dict, list, dict]:
    """Held-out loss, then one greedy generation at the largest cap; smaller caps are its prefixes."""
    from .generate import at_cap, generate_greedy
    from .metrics import summarize_cap
    from .train import eval_loss

    tok = p.base.tokenizer
    caps = p.exp.eval_caps
    t0 = time.perf_counter()
    loss = eval_loss(model, p.eval_encoded, pad_id=tok.pad_token_id)
    t1 = time.perf_counter()
    with rep.task(f"generate {label}", total=len(p.eval_prompts), unit="prompts") as update:
        gens = generate_greedy(model, p.eval_prompts, max(caps), eos_token_ids=[p.end_id],
                               pad_token_id=tok.pad_token_id, batch_size=batch_size,
                               progress=lambda n: update(advance=n))
    t2 = time.perf_counter()
    metrics: dict[str, float] = {"eval_loss": loss}
    refs = [ex.output for ex in p.dataset.eval]
    samples = [{"id": ex.id, "prompt": ex.instruction, "reference": ex.output, "outputs": {}} for ex in p.dataset.eval]
    for cap in caps:
        cut = [at_cap(g, cap) for g in gens]
        preds = [tok.decode(g.tokens, skip_special_tokens=True).strip() for g in cut]
        summary = summarize_cap(preds, refs, [len(g.tokens) for g in cut], [g.stopped for g in cut], cap)
        metrics.update({f"{k}@{cap}": v for k, v in summary.items() if k != "n"})
        for s, pred, g in zip(samples, preds, cut):
            s["outputs"][str(cap)] = {"text": pred[:SAMPLE_TEXT_LIMIT], "tokens": len(g.tokens), "stopped": g.stopped}
    generated = sum(len(g.tokens) for g in gens)
    timings = {"eval_loss_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2),
               "generated_tokens": generated, "generate_tokens_per_s": round(generated / (t2 - t1), 1) if t2 > t1 else None}
    metrics["eval_s"] = round(t2 - t0, 2)
    return metrics, samples, timings


def _describe(p: Prepared) -> tuple[dict, dict]:
    b, d = p.base, p.dataset
    model = {"name": b.name, "path": b.path, "fingerprint": b.fingerprint, "arch": b.arch, **b.info}
    data = {"name": d.name, "fingerprint": d.fingerprint, "n_train": len(d.train), "n_eval": len(d.eval),
            "system_prompt": d.system_prompt}
    return model, data


def _run_config(p: Prepared, run: RunSpec | None) -> dict:
    cfg: dict[str, Any] = {"eval_caps": p.exp.eval_caps, "device": str(p.base.device), "dtype": p.base.info["dtype"]}
    if run is not None:
        cfg.update({"lora": run.lora.model_dump(), "train": run.train.model_dump(),
                    "generate": run.generate.model_dump(), "resolved_target_modules": p.targets[run.name]})
    return cfg


def run_experiment(exp: Experiment, *, workspace: str | Path | None = None, only: list[str] | None = None,
                   force: bool = False, reporter: Reporter | None = None) -> ExperimentResult:
    """Train and evaluate the experiment's runs (finished ones are reused unless `force`)."""
    from . import environment

    rep = reporter or Reporter()
    p = prepare(exp, only, rep)
    ws = resolve_workspace(exp, workspace)
    store = Store(ws)
    env = environment.record(str(p.base.device))
    model_info, data_info = _describe(p)
    result = ExperimentResult(workspace=ws, records=[])
    gen_batch = max(r.generate.batch_size for r in p.runs) if p.runs else 16
    try:
        # -- the untrained model, once, as the reference point of every table -------------------
        bid = run_id(p, None)
        done = store.get(bid)
        if done and done.status == "finished" and not force:
            store.alias(exp.name, "base", bid)
            result.skipped.append("base")
            rep.log(f"base: finished earlier ({bid}), reused")
        else:
            store.start(bid, name="base", experiment=exp.name, kind="base", config=_run_config(p, None),
                        model=model_info, data=data_info, env=env)
            try:
                metrics, samples, timings = evaluate(p.base.model, p, "base", rep, gen_batch)
            except KeyboardInterrupt:
                store.mark(bid, "interrupted")
                raise
            store.finish(bid, metrics=metrics, curves={}, samples=samples, timings=timings, adapter_path=None)
            rep.log(_one_line("base", metrics, p.exp.eval_caps))
        result.records.append(store.find("base", exp.name))

        for run in p.runs:
            rid = run_id(p, run)
            done = store.get(rid)
            if done and done.status == "finished" and not force and _adapter_ok(done):
                store.alias(exp.name, run.name, rid)
                result.skipped.append(run.name)
                rep.log(f"{run.name}: finished earlier ({rid}), reused")
            else:
                ok = _train_one(p, run, rid, store, rep, exp.name, model_info, data_info, env, gen_batch)
                if not ok:
                    result.failed.append(run.name)
            result.records.append(store.find(run.name, exp.name))
    finally:
        store.close()
    return result


def _adapter_ok(rec: RunRecord) -> bool:
    return bool(rec.adapter_path) and (Path(rec.adapter_path) / "adapter_config.json").is_file()


def _one_line(name: str, m: dict, caps: list[int]) -> str:
    cap = max(caps)
    return (f"{name}: eval loss {m['eval_loss']:.4f}, ROUGE-L@{cap} {m.get(f'rouge_l@{cap}', float('nan')):.3f}, "
            f"mean tokens@{cap} {m.get(f'mean_tokens@{cap}', float('nan')):.1f}")


def _train_one(p: Prepared, run: RunSpec, rid: str, store: Store, rep: Reporter, experiment: str,
               model_info: dict, data_info: dict, env: dict, gen_batch: int) -> bool:
    """Train, evaluate and store one run. Returns False when it failed (the error is stored)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .data import encode_example
    from .train import plan_steps, train_lora

    store.start(rid, name=run.name, experiment=experiment, kind="lora", config=_run_config(p, run),
                model=model_info, data=data_info, env=env)
    tok = p.base.tokenizer
    peft_model = None
    run_dir = store.run_dir(rid)
    try:
        train_enc = [encode_example(tok, ex, p.dataset.system_prompt, run.train.max_seq_len) for ex in p.dataset.train]
        set_seed(run.train.seed)  # LoRA init, dropout and data order all follow the run's seed
        lcfg = LoraConfig(r=run.lora.r, lora_alpha=run.lora.alpha, lora_dropout=run.lora.dropout,
                          target_modules=p.targets[run.name], bias=run.lora.bias, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated for v6; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(p.base.model, lcfg)
        steps = plan_steps(len(train_enc), run.train)
        with rep.task(f"train {run.name}", total=steps, unit="steps") as update:
            res = train_lora(peft_model, train_enc, run.train, pad_id=tok.pad_token_id,
                             on_step=lambda step, total, loss: update(loss=loss))
        metrics, samples, timings = evaluate(peft_model, p, run.name, rep, gen_batch)
        metrics.update({"train_loss_final": res.curve["loss"][-1], "train_s": round(res.wall_s, 2),
                        "train_tokens": res.tokens, "tokens_per_s": round(res.tokens_per_s, 1),
                        "peak_mem_mb": round(res.peak_mem_mb, 1), "trainable_params": res.trainable_params,
                        "total_params": res.total_params, "steps": res.steps,
                        "padding_share": round(res.padding_share, 4)})
        tmp = run_dir / "adapter.tmp"
        final = run_dir / "adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp)  # PEFT format: adapter_config.json + adapter_model.safetensors
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        metrics["adapter_bytes"] = sum(f.stat().st_size for f in final.iterdir())
        store.finish(rid, metrics=metrics, curves=res.curve, samples=samples,
                     timings={**timings, "train_s": round(res.wall_s, 2)}, adapter_path=str(final))
        rep.log(_one_line(run.name, metrics, p.exp.eval_caps) + f", trained {res.steps} steps in {res.wall_s:.0f} s "
                f"({res.tokens_per_s:.0f} tokens/s)")
        return True
    except KeyboardInterrupt:
        store.mark(rid, "interrupted")
        raise
    except Exception as err:  # one broken run must not stop the others
        store.mark(rid, "failed", "".join(traceback.format_exception(err))[-4000:])
        rep.log(f"[red]{run.name}: failed: {type(err).__name__}: {err}[/red]")
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return False
    finally:
        if peft_model is not None:
            p.base.model = peft_model.unload()  # removes the LoRA layers; base weights were never touched
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if hasattr(p.base.model, attr):
                    try:
                        delattr(p.base.model, attr)
                    except AttributeError:
                        pass

