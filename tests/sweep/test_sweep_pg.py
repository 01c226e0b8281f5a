"""Sweeps on one PostgreSQL workspace from several processes standing for several hosts (each its own
working folder, one database URL, one artifacts folder): budget.trials stays exact, a worker killed
mid-trial is found by its stopped heartbeat and its configuration runs once more, and every command
reads every trial from either "host". Needs LORALAB_TEST_PG_URL (see the pg_url fixture)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from loralab.cli import app
from loralab.dashboard.state import Dashboard
from loralab.workspace.doctor import check_workspace
from loralab.workspace.store import Store, engine_url

from test_reliability_faults import SWEEP as FAULTS_SWEEP
from test_reliability_faults import Proc, no_process_left_behind, ran  # noqa: F401  (the fixture cleans up Procs)

SWEEP = FAULTS_SWEEP.replace("[2, 4, 8]", "[2, 4, 8, 16]")  # the grid the kill -9 tests use, one point more


def hosts(tmp: Path, model: Path, url: str, budget: str = "") -> tuple[Path, Path, Path]:
    """Two working folders, each with the same experiment file naming the shared workspace; the artifacts folder."""
    shared = tmp / "shared-artifacts"
    body = SWEEP + (f"  budget: {{{budget}}}\n" if budget else "")
    out = []
    for host in ("host-a", "host-b"):
        (tmp / host).mkdir()
        f = tmp / host / "sw.yaml"
        f.write_text(f"name: sw\nmodel: {model}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 2}}\n"
                     f"workspace: '{url}'\nartifacts: {shared}\n{body}")
        out.append(f)
    return out[0], out[1], shared


def trials(url: str) -> list:
    return optuna.load_study(study_name="sw", storage=engine_url(url)).get_trials()


def test_two_hosts_keep_the_trial_budget_exact_and_both_read_every_trial(pg_url, tiny_neox, tmp_path):
    fa, fb, shared = hosts(tmp_path, tiny_neox, pg_url, "trials: 3")
    gate = tmp_path / "go"
    # Host A is held in its first trial's 2nd step. Host B runs trials until finished + running reach the
    # budget (3), then must wait for A's trial rather than start a 4th: counting only its own trials in
    # flight, it would run a 4th grid point.
    first = Proc(fa.parent, "sweep", fa, fault="train.step:wait@2", gate=gate, name="host-a")
    first.until(lambda: (tmp_path / "host-a" / "host-a.log").exists() and _running(pg_url) == 1, "A's trial running",
                timeout=180)
    second = Proc(fb.parent, "sweep", fb, name="host-b")
    second.until(lambda: "Waiting for another sweep process" in second.output, "B waits for A's trial", timeout=300)
    gate.touch()
    assert first.wait(300) == 0, first.output
    assert second.wait(300) == 0, second.output
    done = trials(pg_url)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3  # exactly the budget: no 4th trial
    assert ran(first.output) == [0] and ran(second.output) == [1, 2]
    assert len({t.user_attrs["owner"]["pid"] for t in done}) == 2
    runs = Store(pg_url, create=False).all_runs()
    assert len(runs) == 3 and all(r.status == "finished" for r in runs)
    assert all(Path(r.adapter_path).is_relative_to(shared.resolve()) for r in runs)  # adapters in the shared folder
    assert check_workspace(pg_url).findings == []
    dash = Dashboard(pg_url)  # the live dashboard reads the same database, runs and study alike
    try:
        state = dash.state()
        assert len(state["runs"]) == 3 and [(s["name"], s["done"]) for s in state["sweeps"]] == [("sw", 3)]
    finally:
        dash.close()

    cli = CliRunner()
    for f in (fa, fb):  # either host: ls by URL alone, and the report of the file
        out = cli.invoke(app, ["ls", "-w", pg_url, "--json"])
        assert out.exit_code == 0, out.output
        assert sorted(r["name"] for r in json.loads(out.output)) == ["trial-0000", "trial-0001", "trial-0002"]
        for argv in (["show", "trial-0001"], ["compare", "trial-0000", "trial-0002"], ["doctor"]):
            out = cli.invoke(app, [*argv, "-w", pg_url])
            assert out.exit_code == 0, (argv, out.output)
        out = cli.invoke(app, ["report", str(f), "--out", str(f.parent / "report")])
        assert out.exit_code == 0, out.output
        text = (f.parent / "report" / "report.md").read_text()
        assert all(f"trial-000{n}" in text for n in range(3)) and "trial-0003" not in text


def _running(url: str) -> int:
    try:
        return sum(t.state.name == "RUNNING" for t in trials(url))
    except Exception:  # the study does not exist yet
        return 0


def test_a_worker_killed_on_another_host_is_found_by_its_heartbeat_and_retried_once(pg_url, tiny_neox, tmp_path,
                                                                                   monkeypatch):
    fa, fb, _ = hosts(tmp_path, tiny_neox, pg_url)
    monkeypatch.setenv("LORALAB_HEARTBEAT", "1,3")  # beat every second, dead after 3 silent ones
    dead = Proc(fa.parent, "sweep", fa, fault="train.step:kill@2", name="host-a")
    assert dead.wait(300) == -signal.SIGKILL, dead.output
    (left,) = [t for t in trials(pg_url) if t.state.name == "RUNNING"]
    # That process was on another machine: its pid means nothing here, only its heartbeat tells.
    study = optuna.load_study(study_name="sw", storage=engine_url(pg_url))
    study._storage.set_trial_user_attr(left._trial_id, "owner", {"host": "gpu-host-2", "pid": 1, "started": 0.0})
    assert [f.kind for f in check_workspace(pg_url).findings] in (["interrupted"], ["interrupted", "trial"])

    # Host B runs the other points, then waits for the dead trial's point until its heartbeat is 3 s old,
    # and runs it once more. Bounded: a heartbeat never judged stale would leave B waiting, killed here.
    host_b = Proc(fb.parent, "sweep", fb, name="host-b")
    assert host_b.wait(240) == 0, host_b.output
    assert "were interrupted; their configurations run again" in host_b.output
    done = trials(pg_url)
    complete = [t for t in done if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["knobs"]["lora.r"] for t in complete) == [2, 4, 8, 16]  # none lost, none twice
    (lost,) = [t for t in done if t.user_attrs.get("status") == "interrupted"]
    assert lost.number == left.number and lost.state.name == "FAIL"  # not counted by the budget
    retry = next(t for t in complete if t.user_attrs.get("retry_of") == left.number)
    assert retry.user_attrs["knobs"] == left.user_attrs["knobs"]
    out = CliRunner().invoke(app, ["ls", "-w", pg_url, "--json"])  # the dead trial names no run; its retry does
    assert sorted(r["name"] for r in json.loads(out.output)) == [f"trial-{t.number:04d}" for t in complete]
    runs = Store(pg_url, create=False).all_runs()
    assert len(runs) == 4 and all(r.status == "finished" for r in runs)  # the retry replaced the unfinished row
    assert check_workspace(pg_url).findings == []


def test_heartbeat_settings_come_from_the_environment_and_bad_ones_name_the_variable(monkeypatch, tmp_path):
    from loralab.errors import SpecError
    from loralab.sweep.study import GRACE_S, HEARTBEAT_S, heartbeat_settings, study_storage

    monkeypatch.delenv("LORALAB_HEARTBEAT", raising=False)
    assert heartbeat_settings() == (HEARTBEAT_S, GRACE_S)
    monkeypatch.setenv("LORALAB_HEARTBEAT", "2")
    assert heartbeat_settings() == (2, 6)  # grace: three missed beats
    monkeypatch.setenv("LORALAB_HEARTBEAT", "5,20")
    assert heartbeat_settings() == (5, 20)
    for bad in ("0", "5,5", "x", "1,2,3", "1.5"):
        monkeypatch.setenv("LORALAB_HEARTBEAT", bad)
        with pytest.raises(SpecError) as err:
            heartbeat_settings()
        assert err.value.problems[0].where == "LORALAB_HEARTBEAT"
    local = study_storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert local.heartbeat_interval is None and local.grace_period is None  # one machine: no heartbeat, pids tell


def test_a_trial_taken_for_dead_meanwhile_keeps_training_instead_of_failing_its_run(tmp_path):
    """Its worker only stalled: another one failed the trial and queued its configuration. The pruner's
    report must not crash the run (which the retry will find stored), only stop consulting the pruner."""
    from optuna.trial import TrialState

    from loralab.config.schema import PrunerSpec
    from loralab.execute.jobs import Pruning
    from loralab.sweep.pruning import optuna_reporter

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    trial = study.ask()
    report = optuna_reporter(Pruning(url, "s", trial.number), PrunerSpec(name="median"))
    assert report(1.0, 1) is False
    study.tell(trial.number, state=TrialState.FAIL)  # what recover_interrupted does to a silent trial
    assert report(0.9, 2) is False  # no UpdateFinishedTrialError
