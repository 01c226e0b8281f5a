"""Issue 24: what one rung of a synchronous successive-halving sweep costs, piece by piece, and what the
cheaper choices would decide. Run by hand, not in CI:

    .venv/bin/python benchmarks/rung_cost.py 12    # the 12-point grid of "Sweep vs the plain way"
    .venv/bin/python benchmarks/rung_cost.py 36    # r x alpha/r x learning rate
    .venv/bin/python benchmarks/rung_cost.py 12 my-experiment.yaml   # the same grid on your model and data

For every grid point on the built-in model and data it times: adding the adapter (with_lora), each of the
first 4 training steps, the held-out loss on the first 4, 8 and 16 eval examples (at step 4), saving
the trainer's state as a checkpoint, and removing the adapter (restore_base). It records every example's
held-out loss (first 16 eval examples) after steps 1 to 4, then prints, for each decision step and number of eval examples, which
points a rung there would keep (1 in 4) and whether the leader at step 4 on 16 examples is among them.
One JSON line per point, then one per (step, examples) choice and a summary line."""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

R = [4, 8, 16]
RATIO = [1, 2, 4]
LR = [5e-5, 2e-4, 5e-4, 1e-3]
STEPS = 4
EXAMPLES = [4, 8, 16]  # the rung's eval examples tried; a point's losses are kept on the largest
YAML = """
name: rung-cost
model: builtin:smollm2-135m
data: {builtin: stdlib-docstrings, train_size: 128, eval_size: 32}
evaluation: {drift: false}
defaults:
  lora: {r: 8, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj]}
  train: {learning_rate: 2.0e-4, batch_size: 2, epochs: 1}
  generate: {max_new_tokens: 32}
"""


def points(n: int) -> list[dict]:
    ratios = [2] if n == 12 else RATIO
    return [{"lora.r": r, "lora.alpha": r * k, "train.learning_rate": lr} for r in R for k in ratios for lr in LR]


def main() -> None:
    from loralab.config.loading import load_experiment
    from loralab.config.space import experiment_start, make_run
    from loralab.engine.train import Trainer, eval_losses
    from loralab.execute.checkpoint import Checkpoints
    from loralab.execute.prepare import prepare
    from loralab.execute.runner import restore_base, train_encoded, with_lora

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tmp) / "e.yaml"  # your file: its model and data
        if len(sys.argv) <= 2:
            f.write_text(YAML)
        exp = load_experiment(f)
        t0 = time.perf_counter()
        prepared = prepare(exp)
        prep_s = time.perf_counter() - t0
        pad = prepared.base.tokenizer.pad_token_id
        ev = prepared.eval_encoded
        start = experiment_start(exp)
        rows = []
        for i, knobs in enumerate(points(n)):
            run = make_run(start, knobs, f"p{i}")
            t = time.perf_counter()
            model = with_lora(prepared, run)
            add_s = time.perf_counter() - t
            trainer = Trainer(model, train_encoded(prepared, run), run.train, pad_id=pad)
            step_s, losses = [], []
            for _ in range(STEPS):
                t = time.perf_counter()
                trainer.step()
                step_s.append(time.perf_counter() - t)
                losses.append(eval_losses(model, ev[:EXAMPLES[-1]], pad_id=pad)[1:])  # (per example, tokens)
            eval_s = {}
            for k in EXAMPLES:
                t = time.perf_counter()
                eval_losses(model, ev[:k], pad_id=pad)
                eval_s[k] = time.perf_counter() - t
            t = time.perf_counter()
            Checkpoints(Path(tmp) / f"ck{i}", None).save(trainer.state_dict())
            ckpt_s = time.perf_counter() - t
            t = time.perf_counter()
            restore_base(prepared, model)
            remove_s = time.perf_counter() - t
            row = {"point": knobs, "add_s": round(add_s, 3), "step_s": [round(s, 3) for s in step_s],
                   "eval_s": {k: round(v, 3) for k, v in eval_s.items()}, "checkpoint_s": round(ckpt_s, 3),
                   "remove_s": round(remove_s, 3)}
            print(json.dumps(row), flush=True)
            rows.append((knobs, losses, row))
    judge(rows, prep_s)


def weighted(per_example: list[float], tokens: list[int], k: int) -> float:
    return sum(l * t for l, t in zip(per_example[:k], tokens[:k])) / sum(tokens[:k])


def judge(rows, prep_s: float) -> None:
    """Which points a rung at each (step, examples) keeps, against the leader at step 4 on the most examples."""
    keep = max(1, math.ceil(len(rows) / 4))
    ref = min(range(len(rows)), key=lambda i: weighted(*rows[i][1][STEPS - 1], EXAMPLES[-1]))
    for step in range(1, STEPS + 1):
        for k in EXAMPLES:
            order = sorted(range(len(rows)), key=lambda i: weighted(*rows[i][1][step - 1], k))
            print(json.dumps({"step": step, "examples": k, "kept": [rows[i][0] for i in order[:keep]],
                              "leader_kept": ref in order[:keep], "leader_rank": order.index(ref) + 1}), flush=True)
    import torch

    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    t = [r[2] for r in rows]
    print(json.dumps({"summary": True, "points": len(rows), "prepare_s": round(prep_s, 1), "leader": rows[ref][0],
                      "torch_threads": torch.get_num_threads(), "median_add_s": med([x["add_s"] for x in t]),
                      "median_step_s": med([s for x in t for s in x["step_s"]]),
                      "median_eval_s": {k: med([x["eval_s"][k] for x in t]) for k in EXAMPLES},
                      "median_checkpoint_s": med([x["checkpoint_s"] for x in t]),
                      "median_remove_s": med([x["remove_s"] for x in t])}), flush=True)


if __name__ == "__main__":
    main()
