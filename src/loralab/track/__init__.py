"""Experiment trackers (`track:` in the file, `--track` on the command line): each run copied into
MLflow, TensorBoard or W&B. One small interface (base.Tracker), a registry by name, one module per
library, each importing its library only when a run starts (they are optional extras)."""

from loralab.track import _mlflow, _tensorboard, _wandb  # noqa: F401  (register the trackers)
from loralab.track.base import REGISTRY, RunInfo, Tracker, check_installed, install_hint, register
from loralab.track.hook import Tracking, open_tracking

__all__ = ["REGISTRY", "RunInfo", "Tracker", "Tracking", "check_installed", "install_hint", "open_tracking", "register"]
