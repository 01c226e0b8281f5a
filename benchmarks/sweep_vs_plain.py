"""Issue 4's benchmark: a 12-point grid (r in {4, 8, 16} x lr in {5e-5, 2e-4, 5e-4, 1e-3}) on the
built-in model and data, run (a) the plain way — one `transformers.Trainer` + PEFT process per grid
point, full training — and (b) as a loralab sweep with pruning. Run by hand, not in CI:

    .venv/bin/python benchmarks/sweep_vs_plain.py plain   # (a), prints one JSON line per point
    .venv/bin/python benchmarks/sweep_vs_plain.py sweep   # (b)

Issue 24's: `GRID=36` adds alpha/r in {1, 2, 4} (36 points); `interleaved` runs the sweep, the plain way,
then the sweep again in one process (the ratio against the mean of the two sweeps), and `widen` runs the
sweep, then the same sweep with one more learning rate (2e-3) in the same workspace, to see what the second
one trains. PRUNER, CONFIRM, BUDGET: the sweep's sections (environment variables).

Both score a configuration by loralab's held-out loss (token-weighted mean over the eval answers),
so their best values compare directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

R = [4, 8, 16]
LR = [5e-5, 2e-4, 5e-4, 1e-3]
RATIOS = [2] if os.environ.get("GRID", "12") == "12" else [1, 2, 4]  # alpha / r
DATA = {"train_size": 128, "eval_size": 32}


def plain_point(r: int, lr: float, ratio: int = 2) -> dict:
    """One grid point the way most people write it: Trainer, PEFT, one epoch, then the eval loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from loralab.engine.data import encode_example, load_data
    from loralab.engine.models import builtin_model_dir
    from loralab.config.schema import DataSpec
    from loralab.engine.train import eval_loss

    t0 = time.perf_counter()
    folder = builtin_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ds = load_data(DataSpec(**DATA), Path.cwd())
    enc = lambda exs: [encode_example(tok, e, ds.system_prompt, 512) for e in exs]  # noqa: E731
    train = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc(ds.train)]
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=ratio * r, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, num_train_epochs=1, learning_rate=lr,
                                 save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=train,
                data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)).train()
    loss = eval_loss(model, enc(ds.eval), pad_id=tok.pad_token_id)
    return {"r": r, "ratio": ratio, "lr": lr, "eval_loss": loss, "seconds": round(time.perf_counter() - t0, 1)}


SWEEP_YAML = """
name: sweep-vs-plain
model: builtin:smollm2-135m
data: {{builtin: stdlib-docstrings, train_size: {train_size}, eval_size: {eval_size}}}
evaluation: {{drift: false}}
defaults:
  lora: {{r: 8, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj]}}
  train: {{learning_rate: 2.0e-4, batch_size: 2, epochs: 1}}
  generate: {{max_new_tokens: 32}}
sweep:
  strategy: {strategy}
  seed: 0
  space:
    lora.r: {r}
    lora.alpha: {{ratio_of: lora.r, values: {ratios}}}
    train.learning_rate: {lr}
  objective: {{metric: eval_loss, direction: minimize}}
  pruner: {pruner}
  budget: {budget}
  confirm: {confirm}
"""


def plain() -> dict:
    """(a): every grid point in its own process, one after the other."""
    t0 = time.perf_counter()
    results = []
    for r in R:
        for ratio in RATIOS:
            for lr in LR:
                out = subprocess.run([sys.executable, __file__, "point", str(r), str(lr), str(ratio)], capture_output=True,
                                     text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    best = min(results, key=lambda x: x["eval_loss"])
    out = {"mode": "plain", "points": len(results), "wall_s": round(time.perf_counter() - t0, 1), "best": best}
    print(json.dumps(out), flush=True)
    return out


def sweep(ws: Path, lrs: list[float] = LR, pruner: str | None = None) -> dict:
    """(b): one `loralab sweep` of the grid into workspace `ws` (a second call with more learning rates: a
    widened space, started from what the first measured)."""
    strategy = os.environ.get("STRATEGY", "grid")
    pruner = pruner or os.environ.get("PRUNER", "{name: successive_halving, every: 4, eval_examples: 16}")
    budget = os.environ.get("BUDGET", f"{{trials: {len(R) * len(RATIOS) * len(lrs)}}}")
    confirm = os.environ.get("CONFIRM", "{top: 1, seeds: 2}")  # {top: 0}: the search alone
    f = ws.parent / f"sweep-{len(lrs)}.yaml"
    f.write_text(SWEEP_YAML.format(strategy=strategy, r=R, ratios=RATIOS, lr=lrs, pruner=pruner, budget=budget,
                                   confirm=confirm, **DATA))
    t0 = time.perf_counter()
    log = subprocess.run([sys.executable, "-m", "loralab.cli", "sweep", str(f), "-w", str(ws)], check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    import optuna

    study = optuna.load_study(study_name="sweep-vs-plain", storage=f"sqlite:///{ws / 'optuna.db'}")
    best = study.best_trial
    trained = [t for t in study.trials if not t.user_attrs.get("from_workspace")]
    took = [line for line in log.splitlines() if line.startswith("Confirmation took ")]
    confirm_s = float(took[-1].split()[2]) if took else 0.0
    out = {"mode": "sweep", "points": len(study.trials), "strategy": strategy, "pruner": pruner, "confirm": confirm,
           "wall_s": round(wall, 1), "confirm_s": confirm_s, "best": {"params": best.params, "eval_loss": best.value},
           "trained": len(trained), "from_workspace": len(study.trials) - len(trained),
           "states": [t.state.name for t in trained],
           "spent": [[t.number, t.state.name, t.user_attrs.get("steps"), t.user_attrs.get("spent_s")] for t in trained],
           "log": [line for line in log.splitlines() if line.startswith(("Started from", "rung at", "Sweep stopped", "Spent", "Confirmation took", "Best",
                                                                          "Successive halving"))]}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    if mode == "point":
        ratio = int(sys.argv[4]) if len(sys.argv) > 4 else 2
        print(json.dumps(plain_point(int(sys.argv[2]), float(sys.argv[3]), ratio)), flush=True)
        return
    if mode == "plain":
        plain()
        return
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "sweep":
            sweep(Path(tmp) / "ws")
        elif mode == "interleaved":  # PRUNERS: several pruner sections separated by ';', each swept before and after
            pruners = os.environ.get("PRUNERS", os.environ.get("PRUNER", "{name: successive_halving, every: 4, eval_examples: 16}"))
            before = [sweep(Path(tmp) / f"a{i}", pruner=p) for i, p in enumerate(pruners.split(";"))]
            base = plain()
            after = [sweep(Path(tmp) / f"b{i}", pruner=p) for i, p in enumerate(pruners.split(";"))]
            for a, b in zip(before, after):
                search = [x["wall_s"] - x["confirm_s"] for x in (a, b)]
                print(json.dumps({"mode": "interleaved", "pruner": a["pruner"], "points": base["points"],
                                  "plain_s": base["wall_s"], "sweep_s": [a["wall_s"], b["wall_s"]], "search_s": search,
                                  "share_with_confirmation": round((a["wall_s"] + b["wall_s"]) / 2 / base["wall_s"], 4),
                                  "share_search": round(sum(search) / 2 / base["wall_s"], 4),
                                  "plain_best": base["best"], "sweep_best": [a["best"], b["best"]]}), flush=True)
        elif mode == "widen":
            sweep(Path(tmp) / "ws")
            sweep(Path(tmp) / "ws", LR + [2e-3])
        else:
            raise SystemExit(f"unknown mode {mode!r}: plain, sweep, interleaved or widen")


if __name__ == "__main__":
    main()
