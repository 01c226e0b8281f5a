"""TensorBoard: one log folder per loralab run, TRACK_DIR/EXPERIMENT/RUN-seedN (TRACK_DIR defaults to
WORKSPACE/tensorboard), with the step curve as scalars, the config as text, and config and final
metrics in the HParams tab (`tensorboard --logdir WORKSPACE/tensorboard`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from loralab.track.base import RunInfo, register


@register("tensorboard", module="tensorboard")
class TensorboardTracker:
    """torch's SummaryWriter; a run trained again (`--force`, or evaluated anew) replaces its folder."""

    def __init__(self, options):
        self.options = options

    def start(self, info: RunInfo, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = Path(self.options.log_dir).expanduser() if self.options.log_dir else info.workspace / "tensorboard"
        self.dir = root / info.experiment / info.name
        shutil.rmtree(self.dir, ignore_errors=True)  # the run's earlier copy: its curves would overlap this one's
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.params = params
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=1) + "\n```")

    def log_steps(self, rows: Sequence[dict[str, float]]) -> None:
        for r in rows:
            for k, v in r.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, int(r["step"]))

    def finish(self, metrics: dict[str, float], status: str, adapter_dir: Path | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = int(metrics.get("steps", 0))
        final = {f"final/{k}": v for k, v in metrics.items()}
        for k, v in final.items():
            self.writer.add_scalar(k, v, step)
        # The HParams tab: this run's settings against its final metrics (the scalars just written).
        for summary in hparams({**self.params, "status": status}, final):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()
