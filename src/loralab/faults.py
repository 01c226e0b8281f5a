"""Named points where the reliability tests make loralab crash or fail, to prove a crash loses nothing.

`LORALAB_FAULT=POINT[:ACTION][@N]` triggers ACTION the Nth time (default 1st; `@*`: every time) this
process reaches POINT; several specs are separated by commas. Unset, as everywhere outside tests, a
point costs one environment lookup; the points sit between whole steps of work (never inside a
tensor loop).

Actions: kill (SIGKILL, the default), sigint (a real Ctrl-C), enospc (disk full), oom
(torch.OutOfMemoryError), memory (MemoryError), and wait (until the file named by LORALAB_FAULT_GATE
exists: lets a test hold a process at a point while it starts another).

Points: train.step (after an optimizer step), evaluate (between the losses and generation),
adapter.save (adapter written to its temporary folder, not yet moved), store.finish (inside the
transaction that writes a run's results), run.stored (a run stored, before the next run or the
sweep's tell), checkpoint.saved (a checkpoint renamed into place, the older one not yet removed).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

ENV = "LORALAB_FAULT"
GATE_ENV = "LORALAB_FAULT_GATE"
POINTS = ("train.step", "evaluate", "adapter.save", "store.finish", "run.stored", "checkpoint.saved")
ACTIONS = ("kill", "sigint", "enospc", "oom", "memory", "wait")
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Do what LORALAB_FAULT asks for at this point, if anything."""
    spec = os.environ.get(ENV)
    if spec:
        for one in spec.split(","):
            _trigger(name, one.strip())


class StepFault:
    """The `train.step` point as a training step hook (train.StepHook): after every optimizer step."""

    def after_step(self, step) -> None:
        fault_point("train.step")


def reset() -> None:
    """Forget the visits counted so far (tests that inject faults in-process start from zero)."""
    _hits.clear()


def _trigger(name: str, spec: str) -> None:
    point, _, when = spec.partition("@")
    point, _, action = point.partition(":")
    action = action or "kill"
    if point not in POINTS or action not in ACTIONS:  # a typo must not silently test nothing
        raise ValueError(f"{ENV}={spec!r}: use POINT[:ACTION][@N] with a point of {', '.join(POINTS)} "
                         f"and an action of {', '.join(ACTIONS)}")
    if point != name:
        return
    _hits[spec] += 1  # per spec: two specs on one point each count its visits
    if when != "*" and _hits[spec] != int(when or 1):
        return
    if action == "kill":  # what a power cut, the OOM killer or `kill -9` does: no cleanup at all
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint":  # a real Ctrl-C, delivered to this process
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by LORALAB_FAULT)")
    elif action == "memory":
        raise MemoryError("injected by LORALAB_FAULT")
    elif action == "wait":
        gate = os.environ[GATE_ENV]
        while not os.path.exists(gate):
            time.sleep(0.05)
