"""Issue 15's benchmark: the same 8-trial grid sweep on a tiny model (tests/tiny.py) with the local
executor, one Ray actor and two Ray actors, one torch thread each. Run by hand, not in CI:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_executor.py [STEPS]   # training steps per trial, default 60

Prints one JSON line per executor: wall seconds of run_sweep (Ray's start and the actors' model loads
included), the seconds the trials themselves took, and the best value (the same for all three).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GRID = """name: bench
model: {model}
data: {{builtin: stdlib-docstrings, train_size: 32, eval_size: 8}}
evaluation: {{drift: false}}
defaults:
  lora: {{r: 4, target_modules: [query_key_value]}}
  train: {{learning_rate: 1.0e-3, batch_size: 4, max_steps: {steps}}}
  generate: {{max_new_tokens: 4}}
{executor}
sweep:
  strategy: grid
  space:
    lora.r: [2, 4]
    train.learning_rate: [1.0e-3, 2.0e-3, 3.0e-3, 5.0e-3]
  pruner: {{name: none}}
"""


def one(tmp: Path, model: Path, label: str, executor: str, steps: int) -> dict:
    import torch

    from loralab import api

    torch.set_num_threads(1)
    f = tmp / f"{label}.yaml"
    f.write_text(GRID.format(model=model, executor=executor, steps=steps))
    t0 = time.perf_counter()
    result = api.sweep(api.load(f), workspace=tmp / label)
    wall = time.perf_counter() - t0
    return {"executor": label, "trials": len(result.trials), "wall_s": round(wall, 1),
            "trial_s_sum": round(sum(t.spent_s for t in result.trials), 1),
            "best": round(result.best[0].values[0], 6)}


def main() -> None:
    from tiny import make_tiny_model

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = make_tiny_model(tmp / "model", arch="gpt_neox", seed=0)
        one_thread = 'executor: {kind: ray, actors: %d, cpus_per_trial: 1}'
        for label, ex in (("local", ""), ("ray-1", one_thread % 1), ("ray-2", one_thread % 2)):
            print(json.dumps(one(tmp, model, label, ex, steps)), flush=True)


if __name__ == "__main__":
    main()
