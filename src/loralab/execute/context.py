"""What one run needs, in one object: the prepared base and data, the run's settings, where it is stored
and reported, what to evaluate, and the per-run helpers made when it starts. The run's steps
(execute.runner: train, evaluate a stored adapter, store by outcome, fail) each take this instead of a
chain of a dozen parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralab.config.schema import RunSpec
from loralab.progress import Reporter
from loralab.workspace.store import Store


@dataclass
class RunContext:
    prepared: Any  # execute.prepare.Prepared: the shared base model, data, encoded eval set
    run: RunSpec  # its seed is run.train.seed
    store: Store
    rep: Reporter
    label: str  # how the log names it ("B (seed 1)")
    rid: str  # its run id (execute.identity.run_id)
    experiment: str
    model_info: dict = field(default_factory=dict)
    data_info: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    pruning: Any = None  # a step hook that may stop training (sweep.pruning), or None
    full_eval: bool = True  # generation and drift too, not only the losses
    probe: bool = True  # the training-probe loss (generalization gap)
    reached: dict = field(default_factory=lambda: {"step": 0, "trained": False})  # where an out-of-memory error struck
    checkpoints: Any = None  # execute.checkpoint.Checkpoints of this run, once it starts
    tracking: Any = None  # its `track:` trackers as one step hook, or None
    rungs: dict = field(default_factory=dict)  # a continued sweep trial: the rung losses measured before it paused

    @property
    def seed(self) -> int:
        return self.run.train.seed

    @property
    def gen_batch(self) -> int:
        return self.run.generate.batch_size

    @property
    def adapter_name(self) -> str:
        """The name of the run's adapter on the shared base: from its run id, the same in every attempt
        (a checkpoint's tensor names carry it)."""
        from loralab.engine.session import adapter_name

        return adapter_name(self.rid)
