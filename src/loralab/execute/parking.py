"""Paused sweep trials kept in memory (sweep.halving) instead of written to checkpoints, while they fit:
a pause then costs no disk write and a continue no reload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loralab.execute.checkpoint import Checkpoints
from loralab.execute.prepare import Prepared


@dataclass
class Parked:
    """A paused sweep trial kept in memory: its adapter on the base (inactive), its trainer's state, and
    where its checkpoint goes should it have to leave memory."""

    session: Any  # engine.session.AdapterSession
    state: dict  # engine.train.Trainer.state_dict() at the pause
    checkpoints: Checkpoints
    nbytes: int


def park(prepared: Prepared, rid: str, session, state: dict, checkpoints: Checkpoints) -> bool:
    """Keep a paused trial in memory instead of a checkpoint on disk, when allowed (prepared.park_bytes),
    when it fits beside the ones kept already, and when its adapter can share the base with others (a
    PiSSA/OLoRA init rewrites the base; `lora.bias` trains the base's own biases). Continued, it goes on
    from the same state as from its checkpoint; a crash loses it, and the sweep trains it to the rung again."""
    import torch

    if not prepared.park_bytes or session.init.converts or session.lora.bias != "none":
        return False
    tensors = [state["trainable"], state["optimizer"].get("state", {})]
    nbytes = sum(t.numel() * t.element_size() for d in tensors for t in _tensors(d) if isinstance(t, torch.Tensor))
    nbytes *= 2  # the adapter's own weights on the base too, and slack
    if nbytes + sum(p.nbytes for p in prepared.parked.values()) > prepared.park_bytes:
        return False
    prepared.parked[rid] = Parked(session, state, checkpoints, nbytes)
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
        p.session.close()
