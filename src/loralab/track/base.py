"""What a tracker is: one small interface, a registry by name, and the check that its library is installed.

A tracker copies a loralab run into an experiment tracker (MLflow, TensorBoard, W&B): the resolved
config when the run starts, the step curve while it trains, the final metrics and status (and, where
the tracker stores files, the adapter) when it is stored. The workspace stays the source of truth;
a tracker is a copy, so one that fails never costs the run (hook.Tracking)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from loralab.errors import Problem, SpecError


@dataclass(frozen=True)
class RunInfo:
    """Who a tracker run is: one loralab run (one seed), grouped by its experiment."""

    run: str  # the run's name in the file (trial-0003 in a sweep; base: the untrained model)
    seed: int | None  # None for base, which is not trained
    run_id: str  # the workspace's id (`loralab show RUN_ID`)
    experiment: str
    workspace: Path
    trial: int | None = None  # the Optuna trial number, in a sweep

    @property
    def name(self) -> str:
        """The tracker run's name: a run's seeds are separate tracker runs."""
        return self.run if self.seed is None else f"{self.run}-seed{self.seed}"

    def tags(self) -> dict[str, str]:
        out = {"loralab.experiment": self.experiment, "loralab.run": self.run, "loralab.run_id": self.run_id}
        if self.seed is not None:
            out["loralab.seed"] = str(self.seed)
        if self.trial is not None:
            out["loralab.trial"] = str(self.trial)
        return out


class Tracker(Protocol):
    """Copies one loralab run into an experiment tracker; one object per run. Import the library
    inside the methods (it is an optional extra). Implement:

    - `start(info, params)`: open the tracker run; `params` is the run's resolved config, flat
      (`lora.r`, `train.learning_rate`, ...; values str, int, float or bool);
    - `log_steps(rows)`: a batch of training steps, each {step, loss, grad_norm, lr, tokens, seconds};
    - `finish(metrics, status, adapter_dir)`: the stored metrics (numbers; keys as `metric_key` spells
      them), the run's status (finished, diverged, pruned, failed, interrupted) and the adapter's
      folder (None unless finished); close the tracker run.

    Any of them may raise: the run goes on and the tracker is left out of the rest of it."""

    def start(self, info: RunInfo, params: dict[str, Any]) -> None: ...

    def log_steps(self, rows: Sequence[dict[str, float]]) -> None: ...

    def finish(self, metrics: dict[str, float], status: str, adapter_dir: Path | None) -> None: ...


@dataclass(frozen=True)
class Registered:
    make: Callable[[Any], Tracker]  # options (the file's track.NAME section) -> a tracker for one run
    module: str  # what must be importable
    extra: str  # pip install 'loralab[EXTRA]'


REGISTRY: dict[str, Registered] = {}


def register(name: str, module: str, extra: str | None = None):
    """Class decorator: a tracker under `name` (refuses a name taken twice)."""

    def add(cls):
        if name in REGISTRY:
            raise ValueError(f"tracker {name!r} is registered already")
        REGISTRY[name] = Registered(cls, module, extra or name)
        return cls

    return add


def install_hint(name: str) -> str:
    return f"pip install 'loralab[{REGISTRY[name].extra}]'"


def installed(module: str) -> bool:
    """Whether `import module` can work, without importing it (MLflow and W&B take seconds to import)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(names: Sequence[str], where: str = "track") -> None:
    """Raise one SpecError (exit 2) naming each tracker whose library is missing and the pip command."""
    missing = [n for n in names if not installed(REGISTRY[n].module)]
    if missing:
        raise SpecError(f"tracker{'s' if len(missing) > 1 else ''} not installed: {', '.join(missing)}",
                        [Problem(where, f"{n} is not installed", n, install_hint(n)) for n in missing])


def folder_problems(track, where: str = "track") -> list[Problem]:
    """Tracker folders the file names that cannot be written (a read-only disk, another user's folder):
    found by validate, not when the first run's tracker starts and is dropped for the rest of the run.
    The defaults live in the workspace, which is checked when it is opened."""
    from loralab.config.loading import artifacts_problem

    folders = {}
    if track.tensorboard is not None and track.tensorboard.log_dir:
        folders["tensorboard.log_dir"] = (track.tensorboard.log_dir, Path(track.tensorboard.log_dir).expanduser())
    uri = track.mlflow.tracking_uri if track.mlflow is not None else None
    if uri and (uri.startswith("sqlite:///") or uri.startswith("file:") or "://" not in uri):
        path = uri.split(":///", 1)[1] if uri.startswith("sqlite:///") else uri.removeprefix("file://").removeprefix("file:")
        path = Path(path.split("?", 1)[0]).expanduser()
        folders["mlflow.tracking_uri"] = (uri, path.parent if uri.startswith("sqlite") else path)
    out = []
    for key, (given, folder) in folders.items():
        why = artifacts_problem(folder.resolve())
        if why is not None:
            out.append(Problem(f"{where}.{key}", why, given, "give a folder this user can write, or leave it out "
                                                             "(the tracker then writes in the workspace)"))
    return out


def metric_key(key: str) -> str:
    """A stored metric's name as trackers take it: MLflow refuses '@' (`rouge_l@64` -> `rouge_l/64`,
    which also groups a metric's caps together in W&B and TensorBoard)."""
    return key.replace("@", "/")


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot: finite numbers, keyed by metric_key."""
    return {metric_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config as flat `a.b` keys; lists and None as JSON text (what every tracker can show)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (str, int, float, bool)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out
