"""Paused sweep trials kept in memory (sweep.halving) instead of written to checkpoints, while they fit:
a pause then costs no disk write and a continue no reload. What is kept is the trainer's whole state (the
adapter's weights, optimizer, scheduler, data position, random generators), not the adapter on the base:
an inactive adapter left on the base makes every later adapter's creation a PEFT add_adapter over all of
their modules (measured: +0.4 s a trial after 25 of them), and a fresh adapter loaded with the state goes
on exactly the same."""

from __future__ import annotations

from dataclasses import dataclass

from loralab.execute.checkpoint import Checkpoints
from loralab.execute.prepare import Prepared


@dataclass
class Parked:
    """A paused sweep trial kept in memory: its trainer's state, and where its checkpoint goes should it
    have to leave memory."""

    state: dict  # engine.train.Trainer.state_dict() at the pause
    checkpoints: Checkpoints
    nbytes: int


def park(prepared: Prepared, rid: str, state: dict, checkpoints: Checkpoints) -> bool:
    """Keep a paused trial's state in memory instead of a checkpoint on disk, when allowed
    (prepared.park_bytes) and when it fits beside the ones kept already. Continued, it goes on from the same
    state as from its checkpoint; a crash loses it, and the sweep trains it to the rung again."""
    import torch

    if not prepared.park_bytes:
        return False
    tensors = [state["trainable"], state["optimizer"].get("state", {})]
    nbytes = sum(t.numel() * t.element_size() for d in tensors for t in _tensors(d) if isinstance(t, torch.Tensor))
    if nbytes + sum(p.nbytes for p in prepared.parked.values()) > prepared.park_bytes:
        return False
    prepared.parked[rid] = Parked(state, checkpoints, nbytes)
    return True


def _tensors(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _tensors(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            yield from _tensors(v)
    else:
        yield d


def unpark(prepared: Prepared, rid: str | None = None, *, keep: bool = True) -> None:
    """Paused trials out of memory (`rid`: that one, else all): each to its checkpoint (`keep`), so it is
    continued from disk as before, or dropped (keep=False: a trial that did not make its rung)."""
    for key in [rid] if rid is not None else list(prepared.parked):
        p = prepared.parked.pop(key, None)
        if p is None:
            continue
        if keep:
            p.checkpoints.save(p.state)
