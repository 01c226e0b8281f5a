"""Issue 22's cost of mid-run checkpoints: one checkpoint as a share of a training step, and what a
kill at 90% of a run costs with and without them. Run by hand (not in CI), single thread:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint.py [STEPS]

For the tiny test model (tests/tiny.py, built in code) and the built-in SmolLM2-135M (LoRA r 8 on
q_proj/v_proj, batch 2, fp32): STEPS timed training steps (default 8, after 2 warm-up steps), then
five checkpoints (Checkpoints.save: state_dict, torch.save, fsync, rename) and five loads of one into
a fresh trainer (torch.load and load_state_dict), on the run's real code path (prepare, with_lora).

A checkpoint every N steps costs save / (N x step) of training. A kill at 90% of a run of S steps
loses 0.9 S steps without checkpoints; with one every N steps it loses at most N - 1 steps plus the
resume (reading the checkpoint and making the adapter again).
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

YAML = """
name: ckpt
model: {model}
data: {{builtin: stdlib-docstrings, train_size: 64, eval_size: 2}}
evaluation: {{drift: false}}
runs:
  A:
    lora: {{r: 8, alpha: 16, target_modules: [q_proj, v_proj]}}
    train: {{learning_rate: 2.0e-4, batch_size: 2, max_steps: 1000}}
    generate: {{max_new_tokens: 4}}
"""


def measure(model: str, tmp: Path, steps: int) -> dict:
    from loralab.api import load
    from loralab.engine.train import Trainer
    from loralab.execute.checkpoint import Checkpoints
    from loralab.execute.prepare import prepare
    from loralab.execute.runner import restore_base, train_encoded, with_lora

    f = tmp / "ckpt.yaml"
    f.write_text(YAML.format(model=model))
    prepared = prepare(load(f))
    run = prepared.runs[0]
    enc, pad = train_encoded(prepared, run), prepared.base.tokenizer.pad_token_id
    peft_model = with_lora(prepared, run)
    try:
        trainer = Trainer(peft_model, enc, run.train, pad_id=pad)
        for _ in range(2):
            trainer.step()
        step_s = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step()
            step_s.append(time.perf_counter() - t0)
        ck = Checkpoints(tmp / "run", "adapter-x")
        save_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            path = ck.save(trainer.state_dict())
            save_s.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in path.iterdir())
        load_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            Trainer(peft_model, enc, run.train, pad_id=pad).load_state_dict(ck.load())
            load_s.append(time.perf_counter() - t0)
    finally:
        restore_base(prepared, peft_model)
    t0 = time.perf_counter()
    restore_base(prepared, with_lora(prepared, run))  # what a resume pays to make the adapter again
    adapter_s = time.perf_counter() - t0
    return {"step": statistics.median(step_s), "save": statistics.median(save_s), "load": statistics.median(load_s),
            "adapter": adapter_s, "mb": size / 2**20, "trainable": trainer.trainable}


def kill_at_90(model: str, tmp: Path, steps: int, every: int) -> dict:
    """A run of `steps` steps with a checkpoint every `every`, killed after 90% of them (the trainer
    dropped), then resumed as the runner resumes it (a fresh adapter, the newest checkpoint loaded): the
    rerun's time against training from the start, and whether the adapter is the same as a run never
    stopped."""
    import torch

    from loralab.api import load
    from loralab.engine.train import Trainer
    from loralab.execute.checkpoint import Checkpoints
    from loralab.execute.prepare import prepare
    from loralab.execute.runner import restore_base, train_encoded, with_lora

    f = tmp / "kill.yaml"
    f.write_text(YAML.format(model=model).replace("max_steps: 1000", f"max_steps: {steps}, checkpoint_every: {every}"))
    prepared = prepare(load(f))
    run = prepared.runs[0]
    enc, pad = train_encoded(prepared, run), prepared.base.tokenizer.pad_token_id

    def attempt(until: int, state: dict | None, ck: Checkpoints | None) -> tuple[float, dict]:
        t0 = time.perf_counter()
        peft_model = with_lora(prepared, run)
        try:
            trainer = Trainer(peft_model, enc, run.train, pad_id=pad)
            if state is not None:
                trainer.load_state_dict(state)
            while trainer.step_no < until:
                trainer.step()
                if ck is not None and trainer.step_no % every == 0 and not trainer.done:
                    ck.save(trainer.state_dict())
            weights = {n: p.detach().clone() for n, p in trainer.named}
        finally:
            restore_base(prepared, peft_model)
        return time.perf_counter() - t0, weights

    full_s, expected = attempt(steps, None, None)
    ck = Checkpoints(tmp / "run", "adapter-x")
    killed_s, _ = attempt(int(0.9 * steps), None, ck)
    t0 = time.perf_counter()
    state = ck.load()
    _, weights = attempt(steps, state, None)
    resumed_s = time.perf_counter() - t0  # reading the checkpoint, a fresh adapter, the remaining steps
    same = all(torch.equal(weights[k], expected[k]) for k in expected)
    return {"steps": steps, "every": every, "killed_at": int(0.9 * steps), "from": state["step"], "full": full_s,
            "killed": killed_s, "resumed": resumed_s, "same": same}


def main() -> None:
    import torch
    from tiny import make_tiny_model

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.set_num_threads(1)
    rows, kills = {}, {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        tiny = make_tiny_model(tmp / "tiny", arch="llama", seed=0)
        for name, model, long, every in (("tiny Llama (tests/tiny.py)", str(tiny), 100, 10),
                                          ("SmolLM2-135M (built-in)", "builtin:smollm2-135m", 20, 4)):
            sub = tmp / name.split()[0]
            (sub / "kill").mkdir(parents=True)
            rows[name] = measure(model, sub, steps)
            kills[name] = kill_at_90(model, sub / "kill", long, every)
    print(f"## Mid-run checkpoints — issue 22 ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, 1 thread)\n")
    print(f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint.py {steps}`\n")
    print("| | " + " | ".join(rows) + " |\n| --- | " + " | ".join("---:" for _ in rows) + " |")
    line = lambda label, fmt: print(f"| {label} | " + " | ".join(fmt(r) for r in rows.values()) + " |")  # noqa: E731
    line("trainable (LoRA) parameters", lambda r: f"{r['trainable']:,}")
    line(f"one training step, median of {steps}", lambda r: f"{r['step'] * 1000:.1f} ms")
    line("one checkpoint saved (fsync, rename), median of 5", lambda r: f"{r['save'] * 1000:.1f} ms")
    line("checkpoint size", lambda r: f"{r['mb']:.2f} MB")
    line("one checkpoint as a share of one step", lambda r: f"{r['save'] / r['step']:.1%}")
    line("every 100 steps: share of training", lambda r: f"{r['save'] / (100 * r['step']):.3%}")
    line("every 5 minutes (the default): share of training", lambda r: f"{r['save'] / 300:.4%}")
    line("resume: checkpoint loaded into a fresh trainer", lambda r: f"{r['load'] * 1000:.1f} ms")
    line("resume: adapter made again (with_lora)", lambda r: f"{r['adapter'] * 1000:.1f} ms")
    line("kill at 90% of a 1000-step run: lost without checkpoints", lambda r: f"{900 * r['step'] / 60:.1f} min")
    line("... with the default (5 min): lost at most", lambda r: f"{(300 + r['load'] + r['adapter']) / 60:.1f} min"
         if 900 * r["step"] > 300 else f"{900 * r['step'] / 60:.1f} min (run shorter than 5 min: no checkpoint)")
    print("\nKilled at 90% of a run and run again (measured end to end at the trainer, the runner's resume path):\n")
    print("| | " + " | ".join(kills) + " |\n| --- | " + " | ".join("---:" for _ in kills) + " |")
    line = lambda label, fmt: print(f"| {label} | " + " | ".join(fmt(r) for r in kills.values()) + " |")  # noqa: E731
    line("steps, checkpoint every, killed after step", lambda r: f"{r['steps']}, {r['every']}, {r['killed_at']}")
    line("rerun from the start (no checkpoint): time", lambda r: f"{r['full']:.1f} s")
    line("rerun resumed from step", lambda r: f"{r['from']}")
    line("rerun resumed: time (load, adapter, remaining steps)", lambda r: f"{r['resumed']:.1f} s")
    line("time saved by the checkpoint", lambda r: f"{r['full'] - r['resumed']:.1f} s ({1 - r['resumed'] / r['full']:.0%})")
    line("adapter equal to a run never stopped (bit for bit)", lambda r: "yes" if r["same"] else "NO")


if __name__ == "__main__":
    main()
