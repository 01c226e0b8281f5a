"""Weights & Biases: one W&B run per loralab run, in `track.wandb.project` (default loralab), grouped
by the loralab experiment; config, the step curve (history) and the final metrics (summary).
Its local files go to WORKSPACE/wandb."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from loralab.track.base import RunInfo, register
from loralab.workspace.status import DONE


@register("wandb", module="wandb")
class WandbTracker:
    """`mode` offline writes only local files (`wandb sync` uploads them later); default: W&B's own
    setting (WANDB_MODE, else online after `wandb login`)."""

    def __init__(self, options):
        self.options = options

    def start(self, info: RunInfo, params: dict[str, Any]) -> None:
        import wandb

        folder = info.workspace / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        tags = [f"{k.split('.', 1)[1]}:{v}" for k, v in info.tags().items()]
        # console off: W&B would otherwise wrap stdout, which loralab's progress display owns.
        self.run = wandb.init(project=self.options.project, entity=self.options.entity, group=info.experiment,
                              name=info.name, job_type="sweep" if info.trial is not None else "run", config=params,
                              tags=tags, dir=str(folder), mode=self.options.mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("train/*", step_metric="train/step")

    def log_steps(self, rows: Sequence[dict[str, float]]) -> None:
        for r in rows:
            self.run.log({f"train/{k}": v for k, v in r.items()})

    def finish(self, metrics: dict[str, float], status: str, adapter_dir: Path | None) -> None:
        self.run.summary.update({**metrics, "status": status})
        self.run.finish(exit_code=0 if status in DONE else 1)
