"""What each tracker costs: a 64-step run of the built-in model with no tracker, MLflow (local SQLite
store), TensorBoard and W&B (offline), interleaved (none, mlflow, tensorboard, wandb, none, ...) so that
machine load hits every arm alike.

Run by hand, not in CI (a few minutes per repeat on a CPU; needs `pip install 'loralab[track]'`):
    .venv/bin/python benchmarks/tracker_overhead.py [--repeats 3] [--steps 64]
Prints a Markdown section for BENCHMARKS.md: per arm the median training seconds (the step hooks run
inside them), the ratio to no tracking, and the seconds spent in tracker calls (start, step batches,
finish with the adapter upload), in and out of the training loop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ARMS = ["none", "mlflow", "tensorboard", "wandb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")  # never the network

    import torch

    from loralab.config.loading import parse_experiment
    from loralab.execute.identity import run_id
    from loralab.execute.prepare import prepare
    from loralab.execute.runner import train_run
    from loralab.progress import Reporter
    from loralab.track.hook import Tracking
    from loralab.workspace.store import Store

    spent: dict[str, float] = {}  # seconds inside tracker calls, by method, for the current run

    real_call = Tracking._call

    def timed_call(self, method, *a):
        t0 = time.perf_counter()
        try:
            return real_call(self, method, *a)
        finally:
            spent[method] = spent.get(method, 0.0) + time.perf_counter() - t0

    Tracking._call = timed_call
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chdir(tmp)  # MLflow keeps a SQLite store's artifacts in ./mlruns
        raw = {"name": "tracker-overhead", "model": "builtin:smollm2-135m",
               "data": {"builtin": "stdlib-docstrings", "train_size": 2 * args.steps, "eval_size": 8},
               "evaluation": {"drift": False},
               "runs": {"A": {"train": {"batch_size": 2, "max_steps": args.steps}, "generate": {"max_new_tokens": 8}}}}
        exp = parse_experiment(raw, str(tmp / "exp.yaml"))
        rep = Reporter()
        prepared = prepare(exp, reporter=rep)
        store = Store(tmp / "ws")
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        tracks = {"none": {}, "mlflow": {"mlflow": {"tracking_uri": uri}}, "tensorboard": {"tensorboard": {}},
                  "wandb": {"wandb": {"mode": "offline"}}}
        train_s: dict[str, list[float]] = {a: [] for a in ARMS}
        calls: dict[str, list[dict[str, float]]] = {a: [] for a in ARMS}
        for rep_i in range(args.repeats):
            for arm in ARMS:
                e = parse_experiment({**raw, "track": tracks[arm]}, str(tmp / "exp.yaml"))
                prepared.exp = e
                spent.clear()
                run = e.resolved_runs[0]
                status, _ = train_run(prepared, run, store, experiment=e.name, reporter=rep, force=True,
                                      full_eval=False, probe=False)
                assert status == "finished", status
                rec = store.get(run_id(prepared, run, full_eval=False, probe=False))  # the same row each time: force
                train_s[arm].append(rec.metrics["train_s"])
                calls[arm].append(dict(spent))
                print(f"repeat {rep_i + 1} {arm}: train {rec.metrics['train_s']:.1f} s, tracker calls "
                      + ", ".join(f"{k} {v:.3f} s" for k, v in spent.items()), flush=True)
        store.close()
    base = statistics.median(train_s["none"])
    med = lambda arm, key: statistics.median(c.get(key, 0.0) for c in calls[arm])  # noqa: E731
    print(f"\n## Tracker overhead — issue 17 ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print(f"{args.steps} training steps of the built-in model (batch 2), {args.repeats} repeat(s), arms interleaved; "
          "medians. In the loop: the steps sent to the tracker (batches), as a share of the training time; "
          "start (the first run also imports the library) and finish (final metrics, MLflow's adapter upload) "
          "happen once per run, outside the training loop.\n")
    print("| tracker | train s | ratio to none | in the loop s | share of training | start s | finish s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm in ARMS:
        t = statistics.median(train_s[arm])
        loop = med(arm, "log_steps")
        print(f"| {arm} | {t:.1f} | {t / base:.3f} | {loop:.3f} | {100 * loop / t:.2f}% | {med(arm, 'start'):.2f} | "
              f"{med(arm, 'finish'):.2f} |")

if __name__ == "__main__":
    main()
