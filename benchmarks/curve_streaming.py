"""Issue 17's cost of watching: what streaming the training curve to the workspace adds to a run.

Two measurements, run by hand (not in CI):

    .venv/bin/python benchmarks/curve_streaming.py [REPEATS]

1. One batch written (Store.append_steps, 5 steps, one SQLite transaction with a full fsync), timed
   200 times on this disk; the writer sends a batch at the first step, then at most every 5 s, so its
   share of training is at most that time / 5 s.
2. A 64-step run of the built-in model (batch 2, fp32, 1 thread) with streaming and with the writer
   replaced by a no-op, interleaved, REPEATS each (default 3): train time and its ratio.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

YAML = """
name: streaming
model: builtin:smollm2-135m
data: {builtin: stdlib-docstrings, train_size: 128, eval_size: 2}
evaluation: {drift: false}
runs:
  A:
    lora: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
    train: {learning_rate: 2.0e-4, batch_size: 2, max_steps: 64}
    generate: {max_new_tokens: 4}
"""


def flush_cost(tmp: Path, n: int = 200) -> list[float]:
    from loralab.workspace.store import Store

    store = Store(tmp / "flush-ws")
    store.start("r", name="A", experiment="x", kind="lora", config={}, model={}, data={}, env={}, seed=0)
    times = []
    for i in range(n):
        batch = [{"step": 5 * i + j, "loss": 1.0, "grad_norm": 1.0, "lr": 1e-4, "tokens": 100, "seconds": 1.0, "total": 10_000}
                 for j in range(1, 6)]
        t0 = time.perf_counter()
        store.append_steps("r", batch)
        times.append(time.perf_counter() - t0)
    store.close()
    return times


class NoCurve:
    def __init__(self, *args, **kwargs):
        pass

    def after_step(self, step) -> None:
        return None

    def flush(self) -> None:
        pass


def one_run(tmp: Path, streaming: bool, i: int) -> float:
    from loralab.api import load, run
    from loralab.execute import runner

    real = runner.CurveWriter
    runner.CurveWriter = real if streaming else NoCurve
    try:
        f = tmp / "streaming.yaml"
        f.write_text(YAML)
        result = run(load(f), workspace=tmp / f"ws-{'on' if streaming else 'off'}-{i}")
    finally:
        runner.CurveWriter = real
    return next(r for r in result.records if r.name == "A").metrics["train_s"]


def main() -> None:
    import torch

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        flushes = flush_cost(tmp)
        on, off = [], []
        for i in range(repeats):  # interleaved: off, on, off, on, ...
            off.append(one_run(tmp, False, i))
            on.append(one_run(tmp, True, i))
    med = statistics.median(flushes)
    print(f"## Curve streaming — issue 17 ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, 1 thread)\n")
    print(f"Command: `.venv/bin/python benchmarks/curve_streaming.py {repeats}`\n")
    print("| what | value |\n| --- | ---: |")
    print(f"| one batch written (5 steps, fsync), median of {len(flushes)} | {med * 1000:.2f} ms |")
    print(f"| slowest batch | {max(flushes) * 1000:.2f} ms |")
    print(f"| at most one batch per 5 s: share of training | {med / 5:.4%} |")
    print(f"| 64-step run, writer off: train s (each) | {', '.join(f'{x:.1f}' for x in off)} |")
    print(f"| 64-step run, streaming: train s (each) | {', '.join(f'{x:.1f}' for x in on)} |")
    print(f"| ratio streaming / off (median) | {statistics.median(on) / statistics.median(off):.3f} |")


if __name__ == "__main__":
    main()
