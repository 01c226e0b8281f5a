"""Trackers on a tiny model: each run copied into MLflow, TensorBoard and W&B, read back with each
library's own reader (MLflow's client on a local SQLite store, TensorBoard's EventAccumulator, W&B's
offline run file parsed into its own protobuf records); no network anywhere."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import loralab
from loralab.cli import app
from loralab.config.loading import parse_experiment
from loralab.errors import SpecError
from test_runner import experiment as run_file

RUNS = """
evaluation: {drift: false}
runs:
  A:
    lora: {r: 4, target_modules: [query_key_value], rank_pattern: {'layers\\.1\\.attention\\.query_key_value': 2}}
    train: {learning_rate: 1.0e-3, batch_size: 2, max_steps: 5}
    generate: {max_new_tokens: 4}
"""


def experiment(tmp_path: Path, model: Path, track: str, name: str = "trk", runs: str = RUNS) -> Path:
    return run_file(tmp_path, model, f"track: {track}\n{runs}", name)


def offline_wandb(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """W&B never reaches the network, and keeps its settings and caches out of the home folder."""
    mp.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(folder / "wandb-home"))


@pytest.fixture(scope="module")
def tracked(tiny_neox, tmp_path_factory):
    """One run tracked by all three trackers, its steps sent one batch per step (FLUSH_S 0), so each
    tracker receives the curve over several calls."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = "{mlflow: {tracking_uri: '" + uri + "'}, tensorboard: {}, wandb: {mode: offline}}"
    exp = loralab.load(experiment(tmp_path, tiny_neox, track))
    console = Console(record=True, width=200)
    with pytest.MonkeyPatch.context() as mp:
        offline_wandb(mp, tmp_path)
        mp.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
        mp.setattr("loralab.track.hook.FLUSH_S", 0.0)
        result = loralab.run(exp, workspace=tmp_path / "ws", console=console)
    base, rec = result.records
    assert rec.status == "finished" and rec.metrics["steps"] == 5
    return rec, uri, tmp_path / "ws", console.export_text(), base


def test_mlflow_holds_params_curve_metrics_and_the_adapter(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    rec, uri, _, log, base = tracked
    assert "tracking" not in log  # no tracker failed
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("trk")  # the MLflow experiment is the loralab experiment
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["A-seed0", "base"]  # the untrained model too: every table's reference point
    assert runs["base"].data.metrics["eval_loss"] == pytest.approx(base.metrics["eval_loss"])
    assert runs["base"].data.tags["loralab.run_id"] == base.id and not client.list_artifacts(runs["base"].info.run_id)
    run = runs["A-seed0"]
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert (tags["loralab.run_id"], tags["loralab.run"], tags["loralab.status"]) == (rec.id, "A", "finished")
    assert params["lora.r"] == "4" and float(params["train.learning_rate"]) == 1e-3 and params["run_id"] == rec.id
    assert params["data.fingerprint"] == rec.data["fingerprint"]
    # A regex key of rank_pattern holds characters MLflow refuses in a key: they become '_'.
    assert params["lora.rank_pattern.layers_.1_.attention_.query_key_value"] == "2"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]  # five steps, sent in five batches
    assert [m.value for m in history] == pytest.approx(rec.curves["loss"])
    assert metrics["eval_loss"] == pytest.approx(rec.metrics["eval_loss"])
    assert metrics["rouge_l/4"] == pytest.approx(rec.metrics["rouge_l@4"])  # '@' is not an MLflow key character
    names = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert names == {f"adapter/{f.name}" for f in Path(rec.adapter_path).iterdir()}
    got = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path / "dl")))
    assert got.read_bytes() == (Path(rec.adapter_path) / "adapter_model.safetensors").read_bytes()


def test_tensorboard_holds_the_curve_final_metrics_and_hparams(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    rec, _, ws, _, _ = tracked
    folder = ws / "tensorboard" / "trk" / "A-seed0"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss] == pytest.approx(rec.curves["loss"], rel=1e-6)  # float32 in the event file
    assert acc.Scalars("final/eval_loss")[0].value == pytest.approx(rec.metrics["eval_loss"], rel=1e-6)
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["lora.r"].number_value == 4 and start.hparams["run_id"].string_value == rec.id
    assert start.hparams["status"].string_value == "finished"


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file, parsed with W&B's own protobuf. The file is a LevelDB log
    (a 7-byte header, then 32 KiB blocks of records: crc32, length, type, data); W&B ships no Python
    reader for it since its core moved to Go."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, parts, pos, block = [], [], 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero-filled trailer
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            out.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return out


def test_wandb_offline_run_holds_config_history_and_summary(tracked):
    rec, _, ws, _, _ = tracked
    files = {}
    for f in (ws / "wandb").glob("wandb/offline-run-*/run-*.wandb"):
        records = wandb_records(f)
        files[next(r.run.display_name for r in records if r.WhichOneof("record_type") == "run")] = records
    assert sorted(files) == ["A-seed0", "base"]
    records = files["A-seed0"]
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert (run.display_name, run.run_group, run.project) == ("A-seed0", "trk", "loralab")
    assert f"run_id:{rec.id}" in run.tags
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["lora.r"] == 4 and config["run_id"] == rec.id
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r, k in zip(records, kinds) if k == "history"]
    assert [h["train/step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["train/loss"] for h in history] == pytest.approx(rec.curves["loss"])
    summary = {}
    for r, k in zip(records, kinds):
        if k == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    assert summary["eval_loss"] == pytest.approx(rec.metrics["eval_loss"]) and summary["status"] == "finished"
    (done,) = [r.exit for r, k in zip(records, kinds) if k == "exit"]
    assert done.exit_code == 0


def test_a_tracker_failing_mid_run_is_named_once_and_the_run_is_stored(tiny_neox, tmp_path, monkeypatch):
    from loralab.track._tensorboard import TensorboardTracker

    monkeypatch.setattr("loralab.track.hook.FLUSH_S", 0.0)  # log_steps is called at each of the 5 steps
    calls = []

    def broken(self, rows):
        calls.append(len(rows))
        raise OSError("disk gone")

    monkeypatch.setattr(TensorboardTracker, "log_steps", broken)
    finished = []
    monkeypatch.setattr(TensorboardTracker, "finish", lambda self, *a: finished.append(self.dir.name))
    console = Console(record=True, width=300)
    result = loralab.run(loralab.load(experiment(tmp_path, tiny_neox, "[tensorboard]")), workspace=tmp_path / "ws",
                         console=console)
    rec = result.records[1]
    assert rec.status == "finished" and rec.metrics["steps"] == 5 and Path(rec.adapter_path).is_dir()
    assert calls == [1] and finished == ["base"]  # A's tracker was left out of the rest of A after its first failure
    log = console.export_text()
    assert log.count("tracking of A-seed0 stopped at log_steps (OSError: disk gone)") == 1


def test_a_run_evaluated_from_a_stored_adapter_sends_the_stored_curve(tiny_neox, tmp_path):
    """A new cap evaluates the stored adapter and trains nothing: its tracker run gets the stored curve."""
    ws = tmp_path / "ws"
    first = loralab.run(loralab.load(experiment(tmp_path, tiny_neox, "[tensorboard]", name="re")), workspace=ws)
    again = loralab.run(loralab.load(experiment(tmp_path, tiny_neox, "[tensorboard]", name="re",
                                                runs=RUNS.replace("max_new_tokens: 4", "max_new_tokens: [4, 6]"))),
                        workspace=ws)
    assert again.records[1].id != first.records[1].id and not again.skipped[1:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / "tensorboard" / "re" / "A-seed0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]  # once: the earlier copy was replaced
    assert "final/rouge_l/6" in acc.Tags()["scalars"]


# --- input ----------------------------------------------------------------------------------------


def parse(track: str):
    text = f"track: {track}\nruns: {{A: {{}}}}\n"
    return parse_experiment(yaml.safe_load(text), "exp.yaml", text)


def test_track_takes_a_list_or_a_mapping_with_options():
    assert parse("[wandb, mlflow]").track.names == ["mlflow", "wandb"]
    spec = parse("{mlflow: {tracking_uri: 'http://127.0.0.1:5000'}, tensorboard:}").track
    assert spec.names == ["mlflow", "tensorboard"] and spec.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert parse("mlflow").track.names == ["mlflow"] and parse("[]").track.names == []


@pytest.mark.parametrize("track, where, says", [
    ("[mlflow, comet]", "track.comet", "mlflow"),  # the fix lists the trackers there are
    ("[mlflow, mlflow]", "track", "listed twice"),
    ("{wandb: {mode: sometimes}}", "track.wandb.mode", "offline"),
])
def test_a_bad_track_names_its_field(track, where, says):
    with pytest.raises(SpecError) as info:
        parse(track)
    (problem,) = info.value.problems
    assert str(problem).startswith(where) and says in str(problem)


@pytest.mark.parametrize("library", ["mlflow", "wandb", "tensorboard"])
def test_a_missing_tracker_library_is_exit_2_naming_the_pip_command(tiny_neox, tmp_path, monkeypatch, library):
    monkeypatch.setitem(sys.modules, library, None)  # `import library` now fails, as when it is not installed
    f = experiment(tmp_path, tiny_neox, f"[{library}]")
    out = CliRunner().invoke(app, ["validate", str(f)])
    assert out.exit_code == 2 and f"pip install 'loralab[{library}]'" in out.output and "track" in out.output
    f = experiment(tmp_path, tiny_neox, "[]")
    out = CliRunner().invoke(app, ["run", str(f), "--track", f"{library}", "-w", str(tmp_path / "ws")])
    assert out.exit_code == 2 and f"pip install 'loralab[{library}]'" in out.output
    assert not (tmp_path / "ws").exists()  # refused before anything was written


def test_cli_track_overrides_the_file_keeping_its_options():
    exp = parse("{mlflow: {tracking_uri: 'sqlite:///x.db'}, wandb: {}}")
    assert loralab.api.with_tracking(exp, "mlflow,tensorboard").track.names == ["mlflow", "tensorboard"]
    assert loralab.api.with_tracking(exp, "mlflow").track.mlflow.tracking_uri == "sqlite:///x.db"
    assert loralab.api.with_tracking(exp, "none").track.names == []
    with pytest.raises(SpecError, match="unknown tracker"):
        loralab.api.with_tracking(exp, "mlflow,neptune")


def test_an_mlflow_server_that_is_down_costs_a_warning_not_the_run(tiny_neox, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: no server listens on port 9
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    console = Console(record=True, width=300)
    f = experiment(tmp_path, tiny_neox, "{mlflow: {tracking_uri: 'http://127.0.0.1:9'}}")
    result = loralab.run(loralab.load(f), workspace=tmp_path / "ws", console=console)
    assert result.records[1].status == "finished" and not result.failed
    assert console.export_text().count("mlflow: tracking of A-seed0 stopped at start") == 1


def test_an_mlflow_server_that_never_answers_costs_seconds_and_is_named_once_per_run(tiny_neox, tmp_path, monkeypatch):
    """A server that accepts connections and never replies: MLflow's own defaults (7 retries with backoff,
    120 s a request) stalled a run for over 20 minutes. loralab bounds the retries unless the user set
    them, and a later run of the process does not ask the silent server again; every run is stored."""
    import socket
    import time

    from loralab.track import _mlflow

    for var in _mlflow.HTTP_DEFAULTS:  # set then deleted: restored (absent) after the test, whatever the tracker sets
        monkeypatch.setenv(var, "1")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # the user's own setting is kept: the test stays short
    monkeypatch.setattr(_mlflow, "_down", {})
    console = Console(record=True, width=300)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections are queued by the kernel, never answered
        f = experiment(tmp_path, tiny_neox, "{mlflow: {tracking_uri: 'http://127.0.0.1:%d'}}" % silent.getsockname()[1])
        t0 = time.monotonic()
        result = loralab.run(loralab.load(f), workspace=tmp_path / "ws", console=console)
        spent = time.monotonic() - t0
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert all(r.status == "finished" for r in result.records) and not result.failed
    text = console.export_text()
    assert text.count("mlflow: tracking of A-seed0 stopped at start") == 1 and "not asked again" in text
    # MLflow's defaults: 8 tries of 2 s plus 1+2+...+64 s of backoff, minutes; bounded: two tries, once
    assert spent < 60, spent


def test_sweep_trials_are_tracker_runs_tagged_with_their_trial(tiny_neox, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from loralab.sweep.study import run_sweep

    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    f = tmp_path / "sw.yaml"
    f.write_text(f"name: sw\nmodel: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 f"track: {{mlflow: {{tracking_uri: '{uri}'}}}}\nevaluation: {{drift: false}}\n"
                 "defaults:\n  lora: {r: 4, target_modules: [query_key_value]}\n"
                 "  train: {learning_rate: 1.0e-3, batch_size: 2, max_steps: 3}\n  generate: {max_new_tokens: 4}\n"
                 "sweep:\n  strategy: grid\n  space: {lora.r: [2, 4]}\n  pruner: {name: none}\n")
    result = run_sweep(loralab.load(f), workspace=tmp_path / "ws")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    got = sorted((r.info.run_name, r.data.tags["loralab.trial"], r.data.params["lora.r"]) for r in runs)
    want = [(f"trial-{t.number:04d}-seed0", str(t.number), str(t.knobs["lora.r"])) for t in result.trials]
    # the best trial's confirmation on fresh seeds (sweep.confirm) is tagged with the trial it confirms
    best = result.best[0]
    want += [(f"trial-{best.number:04d}-confirm-seed{s}", str(best.number), str(best.knobs["lora.r"])) for s in (1000, 1001)]
    assert got == sorted(want) and len(got) == 4


def test_a_diverged_run_sends_every_step_including_the_one_that_stopped_it(tmp_path, monkeypatch):
    """The divergence monitor stops training before later step hooks see the step: the tracker gets
    that step from the stored curve when the run closes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from test_runner import diverging_experiment

    monkeypatch.setattr("loralab.track.hook.FLUSH_S", 0.0)  # every step sent as it comes
    f = diverging_experiment(tmp_path)
    f.write_text(f.read_text() + "track: [tensorboard]\n")
    result = loralab.run(loralab.load(f), workspace=tmp_path / "ws", only=["A"])
    a = result.records[1]
    assert a.status == "diverged"
    acc = EventAccumulator(str(tmp_path / "ws" / "tensorboard" / "seed" / "A-seed0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == a.curves["step"] and a.curves["step"][-1] == a.metrics["diverged_step"]
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["status"].string_value == "diverged"


def test_tracker_folders_that_cannot_be_written_are_refused_by_validate(tiny_neox, tmp_path, monkeypatch):
    """A tensorboard log_dir under a file, an MLflow SQLite store on a read-only disk: validate says so
    (exit 2, the field named), where before the first run's tracker failed and was dropped."""
    (tmp_path / "plain").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if str(p) == str(ro) else real(p))
    f = experiment(tmp_path, tiny_neox, "{tensorboard: {log_dir: '%s'}, mlflow: {tracking_uri: 'sqlite:///%s'}}"
                   % (tmp_path / "plain" / "tb", ro / "mlflow.db"))
    out = CliRunner().invoke(app, ["validate", str(f)])
    assert out.exit_code == 2, out.output
    assert "track.tensorboard.log_dir" in out.output and "is a file, not a folder" in out.output
    assert "track.mlflow.tracking_uri" in out.output and "read-only file system" in out.output
    f = experiment(tmp_path, tiny_neox, "{tensorboard: {log_dir: '%s'}}" % (tmp_path / "tb"))
    assert CliRunner().invoke(app, ["validate", str(f)]).exit_code == 0


def test_the_tracker_names_are_one_list_the_schema_registry_extras_and_cli_share():
    import tomllib

    from loralab.config.schema import TRACKERS
    from loralab.track import REGISTRY

    assert TRACKERS == ("mlflow", "tensorboard", "wandb")  # TrackSpec's fields, in their order
    assert set(REGISTRY) == set(TRACKERS)
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all(REGISTRY[n].extra in extras for n in TRACKERS)
    from loralab.cli import TrackOpt

    assert "comma-separated mlflow, tensorboard, wandb (" in TrackOpt.help  # --track's help, from TRACKERS
