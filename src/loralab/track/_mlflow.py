"""MLflow: one MLflow run per loralab run, in the MLflow experiment named after the loralab experiment;
params, the step curve, the final metrics and the adapter as an artifact (`adapter/`)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from loralab.track.base import RunInfo, register
from loralab.workspace.status import Status

PARAMS_PER_CALL = 100  # MLflow's limits for one log_batch request
METRICS_PER_CALL = 1000
PARAM_CHARS = 6000
# MLflow's key characters (on every OS): letters, digits, _ - . space /. Others (a rank_pattern's regex key)
# become '_'.
NOT_A_KEY_CHARACTER = re.compile(r"[^\w\-. /]")
# MLflow's own HTTP defaults retry a dead server for ~4 minutes and wait 120 s on one that never answers,
# per request: a copy of the run must not cost that. Bounded here (~25 s at worst) unless the user set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
DOWN_S = 300.0  # a server that failed a run's start is not asked again by this process for this long
_down: dict[str, tuple[float, str]] = {}  # tracking URI -> (when it failed, why)
STATUS = {Status.FINISHED: "FINISHED", Status.DIVERGED: "FINISHED", Status.PRUNED: "FINISHED", Status.FAILED: "FAILED", Status.INTERRUPTED: "KILLED"}


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _key(name: str) -> str:
    return NOT_A_KEY_CHARACTER.sub("_", name)


@register("mlflow", module="mlflow")
class MlflowTracker:
    """Through MlflowClient (no global active run): the tracking URI is `track.mlflow.tracking_uri`,
    else MLflow's own default (MLFLOW_TRACKING_URI, else ./mlflow.db)."""

    def __init__(self, options):
        self.options = options

    def start(self, info: RunInfo, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)  # read by MLflow at each request
        uri = self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")  # the server MLflow will ask
        failed = _down.get(uri)
        if failed is not None and time.monotonic() - failed[0] < DOWN_S:
            raise ConnectionError(f"{uri} failed {time.monotonic() - failed[0]:.0f} s ago ({failed[1]}); not asked "
                                  f"again for {DOWN_S:.0f} s")
        self.client = MlflowClient(tracking_uri=self.options.tracking_uri)
        name = self.options.experiment or info.experiment
        try:
            found = self.client.get_experiment_by_name(name)
        except Exception as err:
            if uri.startswith(("http://", "https://")):
                _down[uri] = (time.monotonic(), f"{type(err).__name__}: {str(err)[:120]}")
            raise
        _down.pop(uri, None)
        if found is None:
            try:
                exp_id = self.client.create_experiment(name)
            except Exception:  # another process created it first
                exp_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            exp_id = found.experiment_id
        self.run_id = self.client.create_run(exp_id, run_name=info.name, tags=info.tags()).info.run_id
        items = [Param(k, v) for k, v in {_key(k): str(v)[:PARAM_CHARS] for k, v in params.items()}.items()]
        for part in _chunks(items, PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=part, synchronous=True)

    def _metrics(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), now, int(step)) for k, v, step in points]
        for part in _chunks(items, METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=part, synchronous=True)

    def log_steps(self, rows: Sequence[dict[str, float]]) -> None:
        self._metrics([(f"train/{k}", v, r["step"]) for r in rows for k, v in r.items() if k != "step"])

    def finish(self, metrics: dict[str, float], status: str, adapter_dir: Path | None) -> None:
        step = int(metrics.get("steps", 0))
        self._metrics([(k, v, step) for k, v in metrics.items()])
        self.client.set_tag(self.run_id, "loralab.status", status)
        if adapter_dir is not None:
            self.client.log_artifacts(self.run_id, str(adapter_dir), "adapter")
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))
