"""Reliability, round two (issue 14): what `validate` passes must run, SIGTERM, damaged rows, sweeps
that resume without repeating a configuration. Bad-input rows live in test_reliability_inputs.py;
this file holds what a table of messages cannot show. docs/reliability.md lists the cases."""

from __future__ import annotations

import signal

import pytest
from typer.testing import CliRunner

from loralab.cli import app
from test_reliability_faults import Proc, statuses, write


# --- SIGTERM ---------------------------------------------------------------------------------------


def test_sigterm_marks_the_current_run_interrupted_exits_143_in_one_line_and_a_rerun_finishes(tiny_neox, tmp_path):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    # A fresh interpreter, as `timeout`, Docker, Slurm or Kubernetes would stop; held in B's 2nd step.
    proc = Proc(tmp_path, "run", f, "-w", ws, fault="train.step:wait@6", gate=tmp_path / "never", fresh=True)
    proc.until(lambda: statuses(ws).get("B") == "running", "B started", timeout=120)
    proc.p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "interrupted"}
    tail = [line for line in proc.output.splitlines() if "Terminated" in line]
    assert tail == ["Terminated (SIGTERM): the current run is marked interrupted; finished runs are kept."], proc.output
    assert "Traceback" not in proc.output
    again = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert again.exit_code == 0 and "A: finished earlier" in again.output, again.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "finished"}


def test_the_cli_puts_the_sigterm_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    CliRunner().invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert signal.getsignal(signal.SIGTERM) is before
