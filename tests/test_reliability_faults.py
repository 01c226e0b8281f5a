"""Faults, as a matrix: kill -9 at named points of a multi-run file and of a sweep, Ctrl-C once and
twice, two processes on one workspace, a full or unwritable disk, out-of-memory runs, and the same
run twice giving the same numbers.

Crashes are real: a `loralab` subprocess kills itself with SIGKILL at a point named by
LORALAB_FAULT (loralab/faults.py). Each case then runs the same command again and checks the
workspace through the store, the Optuna study and `loralab doctor`. docs/reliability.md records
the matrix.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from loralab import faults
from loralab.cli import app
from loralab.workspace.doctor import adapter_complete, check_workspace
from loralab.execute.loop import run_experiment
from loralab.config.loading import load_experiment
from loralab.workspace.store import Store
from loralab.sweep.study import run_sweep

RUNS = """evaluation: {drift: false}
runs:
  A: {lora: {r: 2}, train: {max_steps: 4}, generate: {max_new_tokens: 4}}
  B: {lora: {r: 4}, train: {max_steps: 4}, generate: {max_new_tokens: 4}}
"""
SWEEP = """evaluation: {drift: false}
defaults:
  lora: {r: 2, target_modules: [query_key_value]}
  train: {learning_rate: 1.0e-3, batch_size: 2, max_steps: 4}
  generate: {max_new_tokens: 4}
sweep:
  strategy: grid
  space: {lora.r: [2, 4, 8]}
  pruner: {name: none}
  confirm: {top: 0}  # these tests count the search's own runs
"""


def write(tmp: Path, model: Path, body: str = RUNS, name: str = "faults") -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {model}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 2}}\n{body}")
    return p


_LIVE: list["Proc"] = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failed test must not leave a child blocked on a gate or a lock for the rest of the session."""
    yield
    while _LIVE:
        proc = _LIVE.pop()
        if proc.p.poll() is None:
            proc.p.kill()


class Proc:
    """A `loralab` command in a process of its own, output to a file (a killed one leaves its log).

    Forked from this test process by default: a real process, killed for real, without the 5-10 s a
    fresh interpreter spends importing torch and transformers. `fresh=True` starts `python -m
    loralab.cli` instead, to cover the real entry point too."""

    def __init__(self, tmp: Path, *args, fault: str | None = None, gate: Path | None = None, name: str = "proc",
                 fresh: bool = False):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORALAB_FAULT")}
        env["COLUMNS"] = "200"  # no wrapped log lines
        if fault:
            env["LORALAB_FAULT"] = fault
        if gate:
            env["LORALAB_FAULT_GATE"] = str(gate)
        self.log = tmp / f"{name}.log"
        self.log.write_text("")
        argv = [str(a) for a in args]
        if fresh:
            with open(self.log, "w") as out:
                self.p = subprocess.Popen([sys.executable, "-m", "loralab.cli", *argv], stdout=out,
                                          stderr=subprocess.STDOUT, env=env, cwd=tmp)
        else:
            self.p = _Forked(argv, env, tmp, self.log)
        _LIVE.append(self)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 90) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise

    def until(self, condition, what: str, timeout: float = 90) -> None:
        """Poll `condition()` while the process runs; fail with its log if it ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.p.poll() is None, f"ended (rc {self.p.returncode}) before {what}:\n{self.output}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output}"
            time.sleep(0.05)


class _Forked:
    """The CLI run in a forked child; the parts of Popen the tests use (returncode < 0: killed by that signal)."""

    def __init__(self, argv: list[str], env: dict, cwd: Path, log: Path):
        gc.collect()  # no leftover database handles for the child to finalize
        self.returncode = None
        self.pid = os.fork()
        if self.pid:
            return
        code = 1
        try:  # the child: never returns into pytest
            out = open(log, "a", buffering=1)
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.stdout = sys.stderr = out
            os.environ.clear()
            os.environ.update(env)
            # as a fresh process starts: no handler an earlier test left in pytest (Ray's, say) is inherited
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.chdir(cwd)
            faults.reset()
            import loralab.cli as cli_mod

            cli_mod.console.width = cli_mod.err_console.width = 200
            cli_mod.app(argv, prog_name="loralab")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.wait(10)

    def __del__(self):  # never leave a zombie
        if self.returncode is None:
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def statuses(ws: Path) -> dict[str, str]:
    """Run name -> status, read straight from SQLite while another process may be writing it."""
    try:
        with closing(sqlite3.connect(f"file:{ws / 'loralab.db'}?mode=ro", uri=True, timeout=5)) as conn:
            return dict(conn.execute("SELECT a.name, r.status FROM aliases a JOIN runs r ON r.id = a.run_id").fetchall())
    except sqlite3.Error:  # not created yet
        return {}


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_s") and k not in ("peak_mem_mb", "cost")}


def ran(output: str) -> list[int]:
    """The trial numbers a sweep process ran, from its per-trial log lines."""
    return [int(line.split()[1].rstrip(":")) for line in output.splitlines() if re.match(r"trial \d+: ", line)]


def kinds(ws: Path) -> list[str]:
    return sorted(f.kind for f in check_workspace(ws).findings)


@pytest.fixture(autouse=True)
def fresh_fault_counts():
    faults.reset()
    yield
    faults.reset()


@pytest.fixture(scope="module")
def reference(tiny_neox, tmp_path_factory):
    """The file run without faults: what every crashed-then-resumed workspace must end up holding."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_experiment(load_experiment(write(tmp, tiny_neox)), workspace=tmp / "ws")
    return {r.name: r for r in result.records}


@pytest.fixture(scope="module")
def reference_sweep(tiny_neox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference_sweep")
    result = run_sweep(load_experiment(write(tmp, tiny_neox, SWEEP, "sw")), workspace=tmp / "ws")
    return {t.knobs["lora.r"]: t.values for t in result.trials}


# --- the fault hook itself ----------------------------------------------------------------------


def test_fault_points_fire_on_the_nth_visit_only_and_reject_typos(monkeypatch):
    monkeypatch.setenv("LORALAB_FAULT", "store.finish:enospc@2,evaluate:memory")
    faults.fault_point("store.finish")  # first visit: nothing
    with pytest.raises(OSError, match="No space left"):
        faults.fault_point("store.finish")
    faults.fault_point("store.finish")  # third: nothing again
    with pytest.raises(MemoryError):
        faults.fault_point("evaluate")
    monkeypatch.setenv("LORALAB_FAULT", "store.finsh:kill")
    with pytest.raises(ValueError, match="point of train.step"):
        faults.fault_point("store.finish")
    monkeypatch.delenv("LORALAB_FAULT")
    faults.fault_point("store.finish")  # unset: nothing at all


# --- kill -9 --------------------------------------------------------------------------------------

# Hits counted from the start of `loralab run`: base is evaluated first, then A and B train 4 steps each.
RUN_KILLS = [
    ("train.step@6", "B is training (its 2nd step)"),  # a fresh `python -m loralab.cli`, the others forked
    ("evaluate@3", "B is being evaluated"),
    ("adapter.save@2", "B's adapter is written to adapter.tmp, not yet moved into place"),
    ("store.finish@3", "B's results are being written, inside the transaction"),
]


@pytest.mark.parametrize("fault, when", RUN_KILLS, ids=[w for _, w in RUN_KILLS])
def test_kill_9_during_a_multi_run_file_then_the_same_command_finishes_it(fault, when, tiny_neox, tmp_path, reference):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault=fault, fresh=fault == RUN_KILLS[0][0])
    assert proc.wait() == -signal.SIGKILL, proc.output  # died at that point, not before or after
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "running"}  # B is not finished without metrics
    a_before = Store(ws).find("A")
    assert kinds(ws) == ["interrupted"]  # doctor sees B left running by a dead process, and nothing else

    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 0, out.output
    assert "base: finished earlier" in out.output and "A: finished earlier" in out.output
    store = Store(ws)
    runs = store.all_runs()
    assert sorted(r.name for r in runs) == ["A", "B", "base"]  # nothing lost, nothing duplicated
    assert all(r.status == "finished" and "eval_loss" in r.metrics for r in runs)
    a, b = store.find("A"), store.find("B")
    assert (a.updated_at, a.metrics) == (a_before.updated_at, a_before.metrics)  # kept, not trained again
    # Trained in a killed process and a fresh one: the same numbers as an uninterrupted run.
    assert untimed(a.metrics) == untimed(reference["A"].metrics)
    assert untimed(b.metrics) == untimed(reference["B"].metrics) and b.curves["loss"] == reference["B"].curves["loss"]
    assert adapter_complete(Path(b.adapter_path)) and sorted(p.name for p in store.run_dir(b.id).iterdir()) == ["adapter"]
    assert check_workspace(ws).findings == []


def test_ctrl_c_while_a_runs_results_are_committed_keeps_that_run_finished(tiny_neox, tmp_path):
    """The stop waits for the commit (interrupts.held): B's results, all computed, are not thrown away."""
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault="store.finish:sigint@3")
    assert proc.wait() == 130, proc.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "finished"}
    b = Store(ws).find("B")
    assert "eval_loss" in b.metrics and adapter_complete(Path(b.adapter_path))
    assert sorted(p.name for p in Store(ws).run_dir(b.id).iterdir()) == ["adapter"]
    assert check_workspace(ws).findings == []


def _trials(ws: Path) -> list:
    return optuna.load_study(study_name="sw", storage=f"sqlite:///{ws / 'optuna.db'}").get_trials()


# Hits counted from the start of `loralab sweep` (no base run): trial 0 trains, is evaluated and stored, then trial 1.
SWEEP_KILLS = [
    ("evaluate@2", "trial 1 is being evaluated", ["interrupted", "trial"]),
    ("store.finish@1", "trial 0's results are being written", ["interrupted", "trial"]),
    ("run.stored@1", "trial 0's run is stored, the study not yet told", ["trial"]),
]


@pytest.mark.parametrize("fault, when, found", SWEEP_KILLS, ids=[w for _, w, _ in SWEEP_KILLS])
def test_kill_9_during_a_sweep_then_the_same_command_finishes_it(fault, when, found, tiny_neox, tmp_path, reference_sweep):
    f, ws = write(tmp_path, tiny_neox, SWEEP, "sw"), tmp_path / "ws"
    proc = Proc(tmp_path, "sweep", f, "-w", ws, fault=fault)
    assert proc.wait() == -signal.SIGKILL, proc.output
    assert "RUNNING" in [t.state.name for t in _trials(ws)]
    assert kinds(ws) == found  # the trial is a note (the next sweep resumes it); a half-stored run a problem

    resumed = run_sweep(load_experiment(f), workspace=ws)
    complete = [t for t in resumed.trials if t.state == "COMPLETE"]
    assert sorted(t.knobs["lora.r"] for t in complete) == [2, 4, 8]  # every point once: none lost, none twice
    assert {t.knobs["lora.r"]: t.values for t in complete} == reference_sweep  # same numbers as without the kill
    (lost,) = [t for t in resumed.trials if t.status == "interrupted"]
    retry = next(t for t in complete if t.knobs == lost.knobs)
    reused = {t.number: t.user_attrs["reused"] for t in _trials(ws) if t.state.name == "COMPLETE"}
    # A run stored before the kill is taken as it is by the retry; any other was never finished, so it is trained.
    assert reused[retry.number] == (1 if fault.startswith("run.stored") else 0)
    assert sum(reused.values()) == reused[retry.number]
    runs = Store(ws).all_runs()
    assert len(runs) == 3 and all(r.status == "finished" for r in runs)  # one row per configuration
    assert check_workspace(ws).findings == []


# --- Ctrl-C ---------------------------------------------------------------------------------------


@pytest.fixture
def sigint_handled():
    """Python's own SIGINT handler, as in a terminal. A suite started in the background (`&`, nohup)
    inherits SIGINT ignored, and the CLI rightly leaves an ignored SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_marks_the_current_run_interrupted_exits_130_and_a_rerun_finishes(tiny_neox, tmp_path, monkeypatch,
                                                                                   sigint_handled):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # so the CLI installs its own
    monkeypatch.setenv("LORALAB_FAULT", "train.step:sigint@6")  # a real SIGINT to this process while B trains
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 130, out.output
    assert "Ctrl-C again to quit at once" in out.output and "finished runs are kept" in out.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "interrupted"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after the command
    monkeypatch.delenv("LORALAB_FAULT")
    again = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert again.exit_code == 0 and "A: finished earlier" in again.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "finished"}


def test_a_second_ctrl_c_ends_the_process_at_once_even_inside_native_code(tiny_neox, tmp_path, sigint_handled):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    proc = Proc(tmp_path, "run", f, "-w", ws, fault="train.step:wait@6", gate=tmp_path / "never")
    proc.until(lambda: statuses(ws).get("B") == "running", "B started")
    # Hold the database's write lock: marking B interrupted now waits inside SQLite's C code (busy
    # timeout 30 s), where Python runs no signal handler.
    with closing(sqlite3.connect(ws / "loralab.db", timeout=5, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")
        proc.p.send_signal(signal.SIGINT)
        proc.until(lambda: "Ctrl-C again to quit at once" in proc.output, "the first Ctrl-C was handled")
        time.sleep(0.5)
        assert proc.p.poll() is None  # still cleaning up: blocked on the lock
        t0 = time.monotonic()
        proc.p.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == -signal.SIGINT
        assert time.monotonic() - t0 < 5
        lock.execute("ROLLBACK")
    assert statuses(ws)["B"] == "running" and statuses(ws)["A"] == "finished"  # A kept; B never got marked
    assert kinds(ws) == ["interrupted"]  # what doctor (or the next run) takes care of


# --- two processes, one workspace -----------------------------------------------------------------


def two_at_once(tmp: Path, command: str, f: Path, ws: Path, hold: str, running: str, waited: str) -> tuple[Proc, Proc]:
    """The first process is held by fault `hold` (a `wait`) while run `running` is in progress; the second
    starts, and once its log says `waited`, the first is let go. Both must succeed."""
    gate = tmp / "go"
    first = Proc(tmp, command, f, "-w", ws, fault=hold, gate=gate, name="first")
    first.until(lambda: statuses(ws).get(running) == "running", f"{running} started")
    second = Proc(tmp, command, f, "-w", ws, name="second")
    second.until(lambda: waited in second.output, f"the second logged {waited!r}")
    gate.touch()
    assert first.wait() == 0, first.output
    assert second.wait() == 0, second.output
    return first, second


def test_two_runs_of_one_file_at_once_train_each_run_once(tiny_neox, tmp_path):
    ws = tmp_path / "ws"  # the first is held in A's 2nd step
    first, second = two_at_once(tmp_path, "run", write(tmp_path, tiny_neox), ws, "train.step:wait@2", "A",
                                "A: another process is training it; waiting")
    both = first.output + second.output
    assert both.count("base: eval loss") == 1 and both.count("A: eval loss") == 1 and both.count("B: eval loss") == 1
    assert "A: finished earlier" in second.output and "A: eval loss" in first.output
    runs = Store(ws).all_runs()
    assert sorted(r.name for r in runs) == ["A", "B", "base"] and all(r.status == "finished" for r in runs)


def test_two_sweeps_on_one_study_at_once_lose_no_trial_and_repeat_none(tiny_neox, tmp_path):
    ws = tmp_path / "ws"
    # The first is held in trial 0. The second must leave that live trial alone (not recover it as
    # interrupted), take the other grid points, then wait for trial 0 rather than run its point again.
    first, second = two_at_once(tmp_path, "sweep", write(tmp_path, tiny_neox, SWEEP, "sw"), ws, "train.step:wait@1",
                                "trial-0000", "Waiting for another sweep process")
    trials = _trials(ws)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # no FAIL: nothing wrongly recovered
    assert sorted(t.user_attrs["knobs"]["lora.r"] for t in trials) == [2, 4, 8]
    assert all(t.user_attrs["reused"] == 0 for t in trials)  # each configuration trained once
    assert ran(first.output) == [0] and ran(second.output) == [1, 2]
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2
    assert len(Store(ws).all_runs()) == 3 and check_workspace(ws).findings == []


# --- a full or unwritable disk --------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["adapter.save:enospc@2", "store.finish:enospc@3"])
def test_a_full_disk_stops_with_a_clear_error_and_no_half_written_run_is_finished(fault, tiny_neox, tmp_path, monkeypatch):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    monkeypatch.setenv("LORALAB_FAULT", fault)  # B's adapter save, or B's result transaction, finds no space
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 1, out.output
    assert "the disk is full" in out.output and "Fix: free some space" in out.output and "Traceback" not in out.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "failed"}
    store = Store(ws)
    assert store.find("B").metrics == {} and not (store.run_dir(store.find("B").id) / "adapter.tmp").exists()
    monkeypatch.delenv("LORALAB_FAULT")
    again = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert again.exit_code == 0 and "A: finished earlier" in again.output
    assert statuses(ws) == {"base": "finished", "A": "finished", "B": "finished"}


def _not_writable() -> Path:
    p = Path("/sys/loralab-workspace")
    try:
        p.mkdir()
    except OSError:
        return p
    p.rmdir()
    pytest.skip("/sys is writable here")


@pytest.mark.parametrize("where, message", [
    ("file", "the workspace path is not a folder loralab can create"),
    ("sys", "the workspace is not writable"),
    ("garbage-db", "loralab.db is not a readable loralab database"),
])
def test_an_unusable_workspace_is_a_clear_error_written_before_any_training(where, message, tiny_neox, tmp_path):
    f = write(tmp_path, tiny_neox)
    if where == "file":
        ws = tmp_path / "ws"
        ws.write_text("my notes\n")
    elif where == "sys":
        ws = _not_writable()
    else:
        ws = tmp_path / "ws"
        ws.mkdir()
        (ws / "loralab.db").write_bytes(b"this is not SQLite" * 100)
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 1, out.output
    assert message in out.output and "Fix:" in out.output and "Traceback" not in out.output
    assert "eval loss" not in out.output  # stopped before evaluating anything
    if where == "file":
        assert ws.read_text() == "my notes\n"


# --- out of memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("action, error", [("oom", "OutOfMemoryError"), ("memory", "MemoryError")])
def test_an_out_of_memory_run_is_stored_failed_with_its_reason_and_the_next_goes_on(action, error, tiny_neox, tmp_path,
                                                                                    monkeypatch):
    f, ws = write(tmp_path, tiny_neox), tmp_path / "ws"
    monkeypatch.setenv("LORALAB_FAULT", f"train.step:{action}@2")  # A's 2nd step
    monkeypatch.setenv("COLUMNS", "400")  # unwrapped log lines
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(ws)])
    assert out.exit_code == 1, out.output
    assert "A: out of memory in training step" in out.output and "1 run(s) failed: A" in out.output
    assert statuses(ws) == {"base": "finished", "A": "failed", "B": "finished"}
    reason = Store(ws).find("A").error.strip().splitlines()[-1]
    assert reason.startswith(f"out of memory in training step 3 ({error}). Fix: lower train.batch_size (2)")
    shown = CliRunner().invoke(app, ["show", "A", "-w", str(ws)])
    assert "status failed" in shown.output and "out of memory in training step 3" in shown.output


# --- determinism ------------------------------------------------------------------------------------


def test_the_same_run_twice_on_cpu_gives_identical_losses_metrics_and_outputs(tiny_neox, tmp_path, reference):
    seeds = RUNS + "seeds: [0, 1]\n"
    again = run_experiment(load_experiment(write(tmp_path, tiny_neox, seeds)), workspace=tmp_path / "again")
    by = {(r.name, r.seed): r for r in again.records}
    for name in ("base", "A", "B"):
        first, second = reference[name], by[(name, None if name == "base" else 0)]
        assert untimed(second.metrics) == untimed(first.metrics)
        assert {k: v for k, v in second.curves.items() if k != "seconds"} == {
            k: v for k, v in first.curves.items() if k != "seconds"}
        assert [s["outputs"] for s in second.samples] == [s["outputs"] for s in first.samples]
        assert [s["loss"] for s in second.samples] == [s["loss"] for s in first.samples]
    # ... and the comparison is sharp enough to see a change: another seed gives other numbers.
    assert by[("A", 1)].curves["loss"] != by[("A", 0)].curves["loss"]
