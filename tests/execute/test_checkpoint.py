"""Mid-run checkpoints: a run killed (kill -9), terminated (SIGTERM) or interrupted (Ctrl-C) while it
trains continues from its last checkpoint when the same command runs again, and ends with the same
curve, adapter and eval loss as a run that was never stopped (on CPU, in the same build: exactly).
Kills are real: a forked `loralab` process stops itself at a LORALAB_FAULT point (loralab/faults.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loralab.cli import app
from loralab.config.loading import load_experiment
from loralab.execute.checkpoint import Checkpoints, found_in
from loralab.execute.loop import run_experiment
from loralab.execute.identity import adapter_id, run_id
from loralab.execute.prepare import prepare
from loralab.execute.runner import train_run
from loralab.workspace.doctor import check_workspace
from loralab.workspace.store import Store
from test_reliability_faults import Proc, kinds, statuses, untimed, write  # the fault-matrix helpers

# B trains 7 steps with dropout (torch RNG), warmup and linear decay (scheduler) and wraps around its
# 8 examples (data position); checkpoints every 2 steps. Fault hits count A's 4 steps first.
BODY = """evaluation: {drift: false}
defaults: {train: {checkpoint_every: 2}, generate: {max_new_tokens: 4}}
runs:
  A: {lora: {r: 2}, train: {max_steps: 4}}
  B: {lora: {r: 4, dropout: 0.1}, train: {max_steps: 7, warmup_steps: 2, batch_size: 3}}
"""
B_STEP_5 = 4 + 5  # the train.step visit after B's 5th step: its last checkpoint is step 4


@pytest.fixture(scope="module")
def uninterrupted(tiny_neox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run_experiment(load_experiment(write(tmp, tiny_neox, BODY, "ck")), workspace=tmp / "ws")
    return {r.name: r for r in result.records}


@pytest.fixture
def sigint_handled():
    """Python's own SIGINT handler, as in a terminal (a suite started in the background inherits it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


STOPS = [  # fault, signal sent from outside once held, exit code, B's status afterwards
    (f"train.step@{B_STEP_5}", None, -signal.SIGKILL, "running"),  # kill -9: no cleanup at all
    (f"train.step:wait@{B_STEP_5}", signal.SIGTERM, 143, "interrupted"),  # a scheduler's SIGTERM
    (f"train.step:sigint@{B_STEP_5}", None, 130, "interrupted"),  # Ctrl-C
]


@pytest.mark.parametrize("fault, sig, code, status", STOPS, ids=["kill-9", "sigterm", "ctrl-c"])
def test_a_run_stopped_midway_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        fault, sig, code, status, tiny_neox, tmp_path, uninterrupted, sigint_handled):
    f, ws = write(tmp_path, tiny_neox, BODY, "ck"), tmp_path / "ws"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault=fault, gate=tmp_path / "never")
    if sig is not None:
        proc.until(lambda: any(ws.glob("runs/*/checkpoints/step-00000004/meta.json")), "B's checkpoint at step 4")
        proc.p.send_signal(sig)
    assert proc.wait() == code, proc.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": status}
    store = Store(ws)
    b_id = store.find("B").id
    assert [c.step for c in found_in(store.run_dir(b_id) / "checkpoints")] == [4]  # the older one (step 2) removed
    assert store.live_curve(b_id)["step"][:4] == [1, 2, 3, 4]  # flushed before the checkpoint was written
    # doctor knows it, and --repair keeps what the resume needs
    assert kinds(ws) == (["interrupted"] if status == "running" else ["checkpoint"])
    check_workspace(ws, repair=True)
    assert kinds(ws) == ["checkpoint"] and found_in(store.run_dir(b_id) / "checkpoints")

    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 0, out.output
    assert "A: finished earlier" in out.output and "B: resumed at step 4 of 7 from its checkpoint" in out.output
    b, ref = store.find("B"), uninterrupted["B"]
    assert b.id == ref.id  # checkpoint_every is in no id: the same run
    for k in ("step", "loss", "grad_norm", "lr", "tokens"):
        assert b.curves[k] == ref.curves[k], k  # steps 1-4 kept from the killed attempt, 5-7 trained now
    assert untimed(b.metrics) == untimed(ref.metrics)  # eval loss, ROUGE, ... exactly
    mine, theirs = adapter_tensors(b.adapter_path), adapter_tensors(ref.adapter_path)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert b.timings["resumed_at"] == [4] and "resumed_at" not in ref.timings
    assert sorted(p.name for p in store.run_dir(b.id).iterdir()) == ["adapter"]  # checkpoints cleaned
    assert check_workspace(ws).findings == []
    shown = CliRunner().invoke(app, ["show", "B", "-w", str(ws)])
    assert "resumed at step 4 from a checkpoint" in shown.output


@pytest.mark.parametrize("action, code", [("sigint", 130), ("wait", 143)], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_a_checkpoint_is_written_waits_until_the_older_one_is_removed(
        action, code, tiny_neox, tmp_path, sigint_handled):
    """Held at the moment the new checkpoint is in place and the older one not yet removed (the 2nd save),
    a Ctrl-C (or a SIGTERM sent while held) is raised only after the removal: one checkpoint is left."""
    body = "evaluation: {drift: false}\nruns:\n  B: {lora: {r: 2}, train: {max_steps: 7, checkpoint_every: 2}}\n"
    f, ws, gate = write(tmp_path, tiny_neox, body, "one"), tmp_path / "ws", tmp_path / "gate"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault=f"checkpoint.saved:{action}@2", gate=gate)
    if action == "wait":
        proc.until(lambda: any(ws.glob("runs/*/checkpoints/step-00000004/meta.json")), "B's checkpoint at step 4")
        time.sleep(0.3)  # the process waits at the point, both checkpoints on disk
        assert sorted(p.name for p in ws.glob("runs/*/checkpoints/step-*")) == ["step-00000002", "step-00000004"]
        proc.p.send_signal(signal.SIGTERM)
        gate.write_text("")
    assert proc.wait() == code, proc.output
    assert statuses(ws) == {"base": "finished", "B": "interrupted"}
    store = Store(ws)
    assert [c.step for c in found_in(store.run_dir(store.find("B").id) / "checkpoints")] == [4]
    assert store.live_curve(store.find("B").id)["step"] == [1, 2, 3, 4]


def test_checkpoint_every_changes_no_run_or_adapter_id(tiny_neox, tmp_path):
    ids = set()
    for i, every in enumerate(("2", "10m", "null")):
        exp = load_experiment(write(tmp_path, tiny_neox, BODY.replace("checkpoint_every: 2", f"checkpoint_every: {every}"),
                                    f"ck{i}"))
        assert exp.resolved_runs[1].train.checkpoint_every == (None if every == "null" else
                                                              int(every) if every.isdigit() else every)
        ids.add(tuple(str(r.train.model_dump()) for r in exp.resolved_runs))
    assert len(ids) == 1


@pytest.mark.parametrize("value", ["0", "'10'", "'fast'", "-3", "true"])
def test_a_bad_checkpoint_every_is_one_clear_error_naming_the_field(value, tiny_neox, tmp_path):
    f = write(tmp_path, tiny_neox, BODY.replace("checkpoint_every: 2", f"checkpoint_every: {value}"), "bad")
    out = CliRunner().invoke(app, ["validate", str(f)])
    assert out.exit_code == 2, out.output
    assert "checkpoint_every" in out.output and '"10m"' in out.output and "Traceback" not in out.output


class StopAt:
    """A pruner stand-in (runner._Done.pruned asks it for the loss it judged; None: measure it)."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self, step):
        return "pruned" if step.step == self.at else None

    def loss_at(self, step):
        return None


def test_a_pruned_run_keeps_no_checkpoint_and_a_forced_run_starts_over(tiny_neox, tmp_path, monkeypatch):
    exp = load_experiment(write(tmp_path, tiny_neox, BODY.replace("checkpoint_every: 2", "checkpoint_every: 1"), "pr"))
    prepared = prepare(exp, ["B"])
    run, store = prepared.runs[0], Store(tmp_path / "ws")
    saved = []
    real = Checkpoints.save
    monkeypatch.setattr(Checkpoints, "save", lambda self, state, **m: saved.append(state["step"]) or real(self, state, **m))
    status, _ = train_run(prepared, run, store, experiment="pr", pruning=StopAt(3))
    rid = run_id(prepared, run)
    assert status == "pruned" and saved == [1, 2]  # saved while it trained, never the pruned step
    assert not (store.run_dir(rid) / "checkpoints").exists()
    # A stored run's checkpoint (left by a crash between storing and cleaning) is a leftover to doctor.
    Checkpoints(store.run_dir(rid), adapter_id(prepared, run)).save({"step": 2, "total": 7})
    assert kinds(tmp_path / "ws") == ["leftovers"]
    check_workspace(tmp_path / "ws", repair=True)
    assert not (store.run_dir(rid) / "checkpoints").exists() and kinds(tmp_path / "ws") == []
    # A forced run is trained anew: a checkpoint left by an earlier attempt is not continued.
    Checkpoints(store.run_dir(rid), adapter_id(prepared, run)).save({"step": 5, "total": 7})
    saved.clear()
    status, _ = train_run(prepared, run, store, experiment="pr", force=True)
    assert status == "finished" and saved == [1, 2, 3, 4, 5, 6] and "resumed_at" not in store.get(rid).timings


SWEEP = """evaluation: {drift: false}
defaults:
  lora: {r: 2, target_modules: [query_key_value], dropout: 0.1}
  train: {learning_rate: 1.0e-3, batch_size: 2, max_steps: 5, checkpoint_every: 2}
  generate: {max_new_tokens: 4}
sweep:
  strategy: grid
  space: {lora.r: [2, 4]}
  pruner: {name: none}
"""


def test_a_sweep_trial_killed_midway_is_retried_from_its_checkpoint(tiny_neox, tmp_path):
    """The retry of a lost trial (a killed sweep, or a dead Ray actor: the same train_run) continues the
    lost trial's run from its checkpoint, with the numbers of a trial that was never stopped."""
    from loralab.sweep.study import run_sweep

    (tmp_path / "ref").mkdir()
    ref = run_sweep(load_experiment(write(tmp_path / "ref", tiny_neox, SWEEP, "sw")), workspace=tmp_path / "ref" / "ws")
    expected = {t.knobs["lora.r"]: t.values for t in ref.trials}
    f, ws = write(tmp_path, tiny_neox, SWEEP, "sw"), tmp_path / "ws"
    proc = Proc(tmp_path, "sweep", f, "-w", ws, fault="train.step@3")  # trial 0 after its 3rd step
    assert proc.wait() == -signal.SIGKILL, proc.output
    assert [c.step for c in found_in(next(ws.glob("runs/*/checkpoints")))] == [2]
    out = CliRunner().invoke(app, ["sweep", str(f), "-w", str(ws)])
    assert out.exit_code == 0, out.output
    assert "resumed at step 2 of 5 from its checkpoint" in out.output
    again = run_sweep(load_experiment(f), workspace=ws)  # everything stored: read back
    complete = {t.knobs["lora.r"]: t.values for t in again.trials if t.state == "COMPLETE"}
    assert complete == expected
    assert not list(ws.glob("runs/*/checkpoints")) and check_workspace(ws).findings == []


def test_a_save_cut_short_leaves_the_previous_checkpoint_whole_and_only_this_adapters_are_read(tmp_path, monkeypatch):
    import loralab.execute.checkpoint as ck

    mine, other = Checkpoints(tmp_path, "adapter-a"), Checkpoints(tmp_path, "adapter-b")
    state = lambda step: {"step": step, "total": 9, "w": torch.full((3,), float(step))}  # noqa: E731
    mine.save(state(2))
    mine.save(state(4))
    assert [f.step for f in mine.all()] == [4]  # the older one goes once the newer is whole

    def killed(folder):
        raise KeyboardInterrupt  # stands for the kill: files written, not yet flushed or renamed

    monkeypatch.setattr(ck, "fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        mine.save(state(6))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]  # the torn save
    assert mine.latest().step == 4 and mine.load()["step"] == 4 and torch.equal(mine.load()["w"], state(4)["w"])
    assert other.latest() is None and other.load() is None  # another adapter's checkpoint (settings changed)
    mine.save(state(6))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]  # torn save cleaned

    (tmp_path / "checkpoints" / "step-00000006" / "state.pt").write_bytes(b"not a checkpoint")
    said = []
    assert mine.load(said.append) is None and "cannot be read" in said[0]  # started over, not failed


# Every knob whose state lives somewhere other than a plain LoRA's: a base rewritten by the init (PiSSA,
# OLoRA: restored, and the adapter stored converted), an init from a data pass (EVA), DoRA's magnitudes,
# LoRA+'s two optimizer groups with rsLoRA's scale, per-module ranks on chosen layers, a Gaussian start.
VARIANTS = {
    "pissa": "{r: 4, init: pissa, dropout: 0.0}",
    "olora": "{r: 4, init: olora, dropout: 0.0}",
    "eva": "{r: 4, init: eva, dropout: 0.0}",
    "dora": "{r: 4, use_dora: true, dropout: 0.1}",
    "loraplus-rslora": "{r: 4, loraplus_lr_ratio: 16, use_rslora: true, dropout: 0.1}",
    "patterns": "{r: 4, init: gaussian, target_modules: [query_key_value, dense_4h_to_h], layers: [1], "
                "rank_pattern: {dense_4h_to_h: 2}, dropout: 0.1}",
}


@pytest.mark.parametrize("lora", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_lora_variant_killed_midway_resumes_to_the_uninterrupted_adapter(lora, tiny_neox, tmp_path):
    body = ("evaluation: {drift: false}\ndefaults: {generate: {max_new_tokens: 4}}\nruns:\n"
            f"  V: {{lora: {lora}, train: {{max_steps: 5, batch_size: 3, gradient_accumulation: 2, "
            "warmup_steps: 1, scheduler: cosine, learning_rate: 2.0e-3, checkpoint_every: 2}}\n")

    def file(folder: Path) -> Path:  # 12 training examples: EVA's data pass needs more than one batch of 8
        f = write(folder, tiny_neox, body, "var")
        f.write_text(f.read_text().replace("train_size: 8", "train_size: 12"))
        return f

    (tmp_path / "ref").mkdir()
    ref = {r.name: r for r in run_experiment(load_experiment(file(tmp_path / "ref")),
                                             workspace=tmp_path / "ref" / "ws").records}["V"]
    f, ws = file(tmp_path), tmp_path / "ws"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault="train.step@3")  # after step 3; its checkpoint: step 2
    assert proc.wait() == -signal.SIGKILL, proc.output
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 0, out.output
    assert "V: resumed at step 2 of 5 from its checkpoint" in out.output
    v = Store(ws).find("V")
    assert v.id == ref.id and v.timings["resumed_at"] == [2]
    for k in ("step", "loss", "grad_norm", "lr", "tokens"):
        assert v.curves[k] == ref.curves[k], k
    assert untimed(v.metrics) == untimed(ref.metrics)
    mine, theirs = adapter_tensors(v.adapter_path), adapter_tensors(ref.adapter_path)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert check_workspace(ws).findings == []
