"""Mid-run checkpoints: a run's whole training state saved now and then, so that the same command
after a kill -9, SIGTERM, Ctrl-C or a lost Ray actor continues from the last one.

A checkpoint is a step hook (Checkpointer) that saves the Trainer's state_dict() into
`runs/ID/checkpoints/step-NNNNNNNN/` (state.pt and meta.json) of the run's folder, which on a shared
workspace is in the artifacts folder every host sees. Written atomically: into a hidden temporary
folder, fsynced, then renamed to a fresh name, so a crash at any moment leaves the previous
checkpoint or the new one whole, never a half of either; older ones are removed after the rename, and a
Ctrl-C or SIGTERM arriving meanwhile waits for both (interrupts.held).
meta.json is written last and names the adapter the state belongs to: a checkpoint of other
settings (same run id, other planned steps) is never loaded. Removed when the run is stored.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loralab.faults import fault_point
from loralab.interrupts import held

FOLDER = "checkpoints"  # in the run's folder
STATE, META = "state.pt", "meta.json"


@dataclass
class Found:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    total: int
    meta: dict


class Checkpoints:
    """The checkpoints of one run, in `run_dir/checkpoints`: save, find the newest, load, remove."""

    def __init__(self, run_dir: Path, adapter_id: str | None):
        self.folder, self.adapter_id = Path(run_dir) / FOLDER, adapter_id

    def all(self) -> list[Found]:
        """Complete checkpoints (meta.json written) of this adapter, oldest first."""
        return [f for f in found_in(self.folder) if self.adapter_id is not None and f.meta.get("adapter_id") == self.adapter_id]

    def latest(self) -> Found | None:
        every = self.all()
        return every[-1] if every else None

    def load(self, log: Callable[[str], None] = lambda _: None) -> dict | None:
        """The newest checkpoint's Trainer state (tensors on the CPU), or None. One that cannot be read
        (a damaged file) is said and skipped for the one before it."""
        import torch

        for f in reversed(self.all()):
            try:
                return torch.load(f.path / STATE, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001  a torn or foreign file: the run starts over rather than fails
                log(f"checkpoint {f.path} cannot be read ({type(err).__name__}); skipped")
        return None

    def save(self, state: dict, **meta) -> Path:
        """Write `state` (a Trainer.state_dict()) as a new checkpoint, atomically; older ones go once it is whole."""
        import torch

        step = int(state["step"])
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".tmp-{step:08d}-{os.getpid()}"
        with held():  # a Ctrl-C or SIGTERM meanwhile waits: never two checkpoints, never a torn one left
            for stale in self.folder.glob(".tmp-*"):  # a save cut short by a kill (one process holds the run's lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state, tmp / STATE)
            (tmp / META).write_text(json.dumps({"step": step, "total": int(state["total"]),
                                                "adapter_id": self.adapter_id, "saved_at": time.time(), **meta}))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this step from an earlier attempt
            os.replace(tmp, final)
            fsync_dir(self.folder)
            fault_point("checkpoint.saved")
            for old in found_in(self.folder):
                if old.path != final:
                    shutil.rmtree(old.path, ignore_errors=True)
        return final

    def remove(self) -> None:
        """The run is stored (finished, diverged, pruned) or retrained from scratch: nothing to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def hook(self, spec, before_save: Callable[[], None] = lambda: None) -> "Checkpointer | None":
        """The step hook that saves this run's checkpoints as `spec` (a TrainSpec) asks; None: never."""
        if spec.checkpoint_steps is None and spec.checkpoint_seconds is None:
            return None
        return Checkpointer(self, spec.checkpoint_steps, spec.checkpoint_seconds, before_save)


def found_in(folder: Path) -> list[Found]:
    """Complete checkpoints in a checkpoints folder (any adapter), oldest first; hidden temporary folders
    and folders without a readable meta.json (a crash before it was written) are not checkpoints."""
    out = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("step-") or not (p / STATE).is_file():
            continue
        try:
            meta = json.loads((p / META).read_text())
            out.append(Found(p, int(meta["step"]), int(meta["total"]), meta))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda f: f.step)


class Checkpointer:
    """A training step hook (train.StepHook): every `steps` optimizer steps, or once `seconds` of training
    have passed since the last save, save the trainer's state. `before_save` runs first (the curve writer's
    flush: the workspace then holds every step up to the checkpoint). Not at the last step: the run is
    stored right after it. Put it after every hook that may stop the run, so a diverged or pruned step is
    never saved."""

    def __init__(self, checkpoints: Checkpoints, steps: int | None, seconds: float | None,
                 before_save: Callable[[], None]):
        self.checkpoints, self.steps, self.seconds, self.before_save = checkpoints, steps, seconds, before_save
        self.last = time.monotonic()
        self.saved: list[int] = []  # steps saved, in order
        self.save_s = 0.0  # time spent saving

    def after_step(self, step) -> None:
        if step.step >= step.total or step.trainer is None:
            return None
        due = (step.step % self.steps == 0) if self.steps else (time.monotonic() - self.last >= self.seconds)
        if not due:
            return None
        t0 = time.perf_counter()
        self.before_save()
        self.checkpoints.save(step.trainer.state_dict())
        self.saved.append(step.step)
        self.save_s += time.perf_counter() - t0
        self.last = time.monotonic()
        return None


def fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself to disk (a rename alone may reach the disk first)."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
