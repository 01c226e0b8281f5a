"""Watching runs from outside (issue 17): curves streamed to the workspace while training, plain
progress lines in a log, and the reading commands finding the workspace of the file just run."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loralab.cli import app
from loralab.config.loading import load_experiment
from loralab.execute import runner
from loralab.execute.hooks import CurveWriter
from loralab.execute.loop import run_experiment
from loralab.workspace.store import Store
from test_reliability_faults import Proc, sigint_handled, write  # noqa: F401  (a fixture, used by name)

FOUR_STEPS = """evaluation: {drift: false}
runs:
  A: {lora: {r: 2}, train: {max_steps: 4}, generate: {max_new_tokens: 4}}
"""


def streamed_rows(ws: Path) -> int:
    with sqlite3.connect(ws / "loralab.db") as conn:
        return conn.execute("SELECT count(*) FROM steps").fetchone()[0]


def test_the_curve_grows_in_the_workspace_while_the_run_trains_then_moves_into_its_row(tiny_neox, tmp_path, monkeypatch):
    f, ws = write(tmp_path, tiny_neox, FOUR_STEPS), tmp_path / "ws"
    seen = []

    class Watched(CurveWriter):  # a batch after every step, read back at once by another connection
        def __init__(self, store, rid):
            super().__init__(store, rid, every_s=0.0)

        def flush(self):
            super().flush()
            other = Store(ws, create=False)
            try:
                seen.append(other.live_curve(self.run_id))
            finally:
                other.close()

    monkeypatch.setattr(runner, "CurveWriter", Watched)  # the name runner._train builds its hook from
    result = run_experiment(load_experiment(f), workspace=ws)
    assert [len(c["step"]) for c in seen[:4]] == [1, 2, 3, 4]
    assert all(c["planned"] == 4 for c in seen[:4]) and seen[1]["loss"][0] == seen[3]["loss"][0]
    a = next(r for r in result.records if r.name == "A")
    assert a.status == "finished" and streamed_rows(ws) == 0  # the finished curve lives in the run's row only
    store = Store(ws, create=False)
    try:
        assert store.live_curve(a.id)["step"] == [1, 2, 3, 4] and store.live_curve(a.id)["loss"] == a.curves["loss"]
    finally:
        store.close()


def test_a_run_interrupted_by_ctrl_c_keeps_its_partial_curve_and_show_says_how_far_it_got(tiny_neox, tmp_path,
                                                                                           monkeypatch, sigint_handled):
    f, ws = write(tmp_path, tiny_neox, FOUR_STEPS), tmp_path / "ws"
    monkeypatch.setenv("LORALAB_FAULT", "train.step:sigint@3")  # a real Ctrl-C after A's 3rd step
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 130, out.output
    monkeypatch.delenv("LORALAB_FAULT")
    shown = CliRunner().invoke(app, ["show", "A", "-w", str(ws)])
    assert "status interrupted" in shown.output and "trained 3 of 4 steps so far" in shown.output, shown.output
    rec = json.loads(CliRunner().invoke(app, ["show", "A", "-w", str(ws), "--json"]).output)
    assert rec["curves"]["step"] == [1, 2, 3] and len(rec["curves"]["loss"]) == 3
    again = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])  # the rerun trains A anew: a fresh curve
    assert again.exit_code == 0, again.output
    assert streamed_rows(ws) == 0
    assert json.loads(CliRunner().invoke(app, ["show", "A", "-w", str(ws), "--json"]).output)["curves"]["step"] == [1, 2, 3, 4]


def test_a_run_killed_mid_training_keeps_the_curve_streamed_before_the_kill(tiny_neox, tmp_path):
    f, ws = write(tmp_path, tiny_neox, FOUR_STEPS), tmp_path / "ws"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault="train.step:kill@3")
    assert proc.wait() != 0
    rec = json.loads(CliRunner().invoke(app, ["show", "A", "-w", str(ws), "--json"]).output)
    assert rec["status"] == "running"  # as kill -9 left it (doctor tells it from a live run)
    # The first step is written at once, later ones every few seconds: at least it, at most what ran.
    assert rec["curves"]["step"][:1] == [1] and len(rec["curves"]["step"]) <= 3


LOGGED = """evaluation: {drift: true, drift_prompts: 3, drift_max_new_tokens: 3}
runs:
  A: {lora: {r: 2}, train: {max_steps: 4}, generate: {max_new_tokens: 4}}
"""


def test_outside_a_terminal_each_phase_prints_plain_lines_with_progress_and_eta(tiny_neox, tmp_path):
    f, ws = write(tmp_path, tiny_neox, LOGGED), tmp_path / "ws"
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws), "--log-every", "0"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "train A: 4 steps" in lines  # the phase starts
    assert all(l.startswith("train A: ") for l in lines if "train A" in l and "ETA" in l)  # lines, not a bar redrawn
    progress = [l for l in lines if l.startswith("train A: ") and "%" in l]
    assert len(progress) == 3, lines  # steps 1-3 (the 4th is the end line)
    clock = r"\d+:\d\d:\d\d"  # H:MM:SS, whatever a busy machine makes of the seconds
    assert re.fullmatch(rf"train A: 1/4 steps \(25%\), loss \d+\.\d{{4}}, {clock} elapsed, ETA {clock}", progress[0])
    assert any(re.fullmatch(rf"train A: 4/4 steps, loss \d+\.\d{{4}}, {clock} elapsed \(done\)", l) for l in lines)
    # drift: the base's answers, the adapter's and the KL, 3 prompts each, with their own lines
    assert "drift A: 9 prompt passes" in lines and any(l.startswith("drift A: 9/9 prompt passes") for l in lines)
    assert any(l.startswith("drift A: 3/9 prompt passes (33%)") for l in lines)


def test_outside_a_terminal_progress_lines_come_no_more_often_than_asked(tiny_neox, tmp_path):
    f, ws = write(tmp_path, tiny_neox, FOUR_STEPS), tmp_path / "ws"
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws), "--log-every", "3600"])
    assert out.exit_code == 0, out.output
    train = [l for l in out.output.splitlines() if l.startswith("train A")]
    assert len(train) == 2 and train[1].startswith("train A: 4/4 steps"), train  # the start and the end only


def test_reading_commands_find_the_workspace_of_the_file_just_run(tiny_neox, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write(tmp_path, tiny_neox, "workspace: my-runs\n" + FOUR_STEPS)
    assert CliRunner().invoke(app, ["run", f.name]).exit_code == 0
    assert not (tmp_path / "loralab-workspace").exists()
    for args in (["ls"], ["ls", "-w", f.name], ["show", "A"], ["show", "A", "-w", f.name], ["compare", "base", "A"]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0 and "A" in out.output, (args, out.output)
    assert "my-runs" in CliRunner().invoke(app, ["ls"]).output
    assert (tmp_path / "loralab-workspace").exists() is False  # reading created nothing
    # Two files naming two workspaces: which one is asked, with both listed.
    g = write(tmp_path, tiny_neox, "workspace: other-runs\n" + FOUR_STEPS, name="second")
    assert CliRunner().invoke(app, ["run", g.name]).exit_code == 0
    out = CliRunner().invoke(app, ["ls"])
    assert out.exit_code == 2 and "my-runs (from faults.yaml)" in out.output and "other-runs (from second.yaml)" in out.output
    assert "other-runs" in CliRunner().invoke(app, ["ls", "-w", g.name]).output


def test_ls_never_cuts_a_trial_name_on_a_narrow_terminal(tiny_neox, tmp_path, monkeypatch):
    f, ws = write(tmp_path, tiny_neox, FOUR_STEPS.replace("  A:", "  trial-0001-a-long-run-name:")), tmp_path / "ws"
    assert CliRunner().invoke(app, ["run", str(f), "-w", str(ws)]).exit_code == 0
    monkeypatch.setenv("COLUMNS", "80")
    out = CliRunner().invoke(app, ["ls", "-w", str(ws)])
    assert "trial-0001-a-long-run-name" in out.output, out.output


def test_progress_clocks_read_hours_minutes_seconds():
    from loralab.progress import _clock

    assert [_clock(s) for s in (0, 59.6, 61, 3725, 90061)] == ["0:00:00", "0:01:00", "0:01:01", "1:02:05", "25:01:01"]
