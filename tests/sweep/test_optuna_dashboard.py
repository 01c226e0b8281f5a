"""A sweep's study opens in optuna-dashboard: its own WSGI app, given the study's storage URL as
`optuna-dashboard sqlite:///WORKSPACE/optuna.db` would be, serves the trials with the intermediate
values the pruner reported. Called in-process through WSGI: no server, no port."""

from __future__ import annotations

import io
import json
from wsgiref.util import setup_testing_defaults

from loralab.config.loading import load_experiment
from loralab.sweep.study import run_sweep
from test_sweep import good_and_bad_lr


def get(app, path: str) -> dict:
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def test_optuna_dashboard_shows_the_sweep_with_its_intermediate_values(tiny_neox, tmp_path):
    import optuna_dashboard

    f = good_and_bad_lr(tmp_path, tiny_neox, "{name: successive_halving, every: 2, reduction_factor: 2, synchronous: false}")
    result = run_sweep(load_experiment(f), workspace=tmp_path / "ws")
    assert [t.status for t in result.trials] == ["finished", "pruned"]
    app = optuna_dashboard.wsgi(f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}")
    (study,) = [s for s in get(app, "/api/studies")["study_summaries"] if s["study_name"] == "sw"]
    detail = get(app, f"/api/studies/{study['study_id']}")
    assert detail["has_intermediate_values"] is True
    good, bad = sorted(detail["trials"], key=lambda t: t["number"])
    assert (good["state"], bad["state"]) == ("Complete", "Pruned")
    # The rungs of successive halving with every 2, factor 2, over 12 steps: 2, 4, 8 (the finished trial);
    # the pruned trial stops at the rung where it was judged, and the dashboard shows that loss.
    assert [v["step"] for v in good["intermediate_values"]] == [2, 4, 8]
    steps = [v["step"] for v in bad["intermediate_values"]]
    assert steps and steps == [2, 4, 8][:len(steps)]
    pruned = result.trials[1]
    from loralab.workspace.store import Store

    rec = Store(tmp_path / "ws").get(pruned.run_ids[0])
    assert bad["intermediate_values"][-1]["value"] == rec.metrics["pruned_loss"]
    assert [p["name"] for p in good["params"]] == ["train.learning_rate"]
