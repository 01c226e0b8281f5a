"""Measuring a model, the same way for every run and for the untrained base: losses, greedy generation at
each cap, drift; and the run `base`, the reference point of every table."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from loralab.execute.identity import _describe, _run_config, run_id
from loralab.execute.prepare import Prepared
from loralab.faults import fault_point
from loralab.progress import Reporter
from loralab.track.hook import track_stored
from loralab.config.schema import cost_of
from loralab.workspace.status import Status
from loralab.workspace.store import RunRecord, Store

SAMPLE_TEXT_LIMIT = 2000  # characters of each generated answer kept in the store


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


def _add_cost(metrics: dict, prepared: Prepared) -> None:
    """Wall time in, money out: (train + eval seconds) x the price per hour, when one is set."""
    total = metrics.get("train_s", 0.0) + metrics.get("init_s", 0.0) + metrics.get("eval_s", 0.0)
    metrics["total_s"] = round(total, 2)
    if prepared.exp.cost is not None:
        metrics["cost"] = round(cost_of(total, prepared.exp.cost.per_hour), 6)


def _one_line(name: str, m: dict, caps: list[int]) -> str:
    cap = max(caps)
    text = f"{name}: eval loss {m['eval_loss']:.4f}"
    if f"rouge_l@{cap}" in m:  # absent when only the losses were measured
        text += f", ROUGE-L@{cap} {m[f'rouge_l@{cap}']:.3f}, mean tokens@{cap} {m[f'mean_tokens@{cap}']:.1f}"
    return text


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
