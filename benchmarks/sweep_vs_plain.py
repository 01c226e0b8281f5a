"""Issue 4's benchmark: a 12-point grid (r in {4, 8, 16} x lr in {5e-5, 2e-4, 5e-4, 1e-3}) on the
built-in model and data, run (a) the plain way — one `transformers.Trainer` + PEFT process per grid
point, full training — and (b) as a loralab sweep with pruning. Run by hand, not in CI:

    .venv/bin/python benchmarks/sweep_vs_plain.py plain   # (a), prints one JSON line per point
    .venv/bin/python benchmarks/sweep_vs_plain.py sweep   # (b)

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
DATA = {"train_size": 128, "eval_size": 32}


def plain_point(r: int, lr: float) -> dict:
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
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, num_train_epochs=1, learning_rate=lr,
                                 save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=train,
                data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)).train()
    loss = eval_loss(model, enc(ds.eval), pad_id=tok.pad_token_id)
    return {"r": r, "lr": lr, "eval_loss": loss, "seconds": round(time.perf_counter() - t0, 1)}


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
    lora.alpha: {{ratio_of: lora.r, values: [2]}}
    train.learning_rate: {lr}
  objective: {{metric: eval_loss, direction: minimize}}
  pruner: {pruner}
  budget: {budget}
  confirm: {confirm}
"""


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    if mode == "point":
        print(json.dumps(plain_point(int(sys.argv[2]), float(sys.argv[3]))), flush=True)
        return
    if mode == "plain":
        t0 = time.perf_counter()
        results = []
        for r in R:
            for lr in LR:
                out = subprocess.run([sys.executable, __file__, "point", str(r), str(lr)], capture_output=True, text=True,
                                     check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
        best = min(results, key=lambda x: x["eval_loss"])
        print(json.dumps({"mode": "plain", "wall_s": round(time.perf_counter() - t0, 1), "best": best}), flush=True)
        return
    strategy = os.environ.get("STRATEGY", "grid")
    pruner = os.environ.get("PRUNER", "{name: successive_halving, every: 4, eval_examples: 16}")
    budget = os.environ.get("BUDGET", "{trials: 12}")
    confirm = os.environ.get("CONFIRM", "{top: 1, seeds: 2}")  # {top: 0}: the search alone
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "sweep.yaml"
        f.write_text(SWEEP_YAML.format(strategy=strategy, r=R, lr=LR, pruner=pruner, budget=budget, confirm=confirm, **DATA))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "loralab.cli", "sweep", str(f), "-w", str(Path(tmp) / "ws")], check=True)
        wall = time.perf_counter() - t0
        import optuna

        study = optuna.load_study(study_name="sweep-vs-plain", storage=f"sqlite:///{Path(tmp) / 'ws' / 'optuna.db'}")
        best = study.best_trial
        print(json.dumps({"mode": "sweep", "strategy": strategy, "pruner": pruner, "confirm": confirm, "wall_s": round(wall, 1),
                          "best": {"params": best.params, "eval_loss": best.value},
                          "states": [t.state.name for t in study.trials]}), flush=True)


if __name__ == "__main__":
    main()
