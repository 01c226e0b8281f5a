"""`loralab dashboard`: the JSON it serves, its safety headers and errors, and the page itself in
headless Chromium while a sweep runs (the trial count rises without a reload), a screenshot of the
main view, and a script-injection string in the workspace that stays text."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import chromium
from loralab.cli import app
from loralab.config.loading import load_experiment
from loralab.dashboard.app import make_app
from loralab.dashboard.state import Dashboard, _thin
from loralab.execute.loop import run_experiment
from loralab.workspace.store import Store
from test_reliability_faults import SWEEP, Proc, no_process_left_behind, write  # noqa: F401  (autouse: no child left blocked)

fastapi = pytest.importorskip("fastapi")  # `make test` installs loralab[dashboard]
from fastapi.testclient import TestClient  # noqa: E402

RUNS = """evaluation: {drift: false}
runs:
  A: {lora: {r: 2}, train: {max_steps: 4}, generate: {max_new_tokens: 4}}
  B: {lora: {r: 4}, train: {max_steps: 4}, generate: {max_new_tokens: 4}}
"""
HOSTILE = '<script>window.__owned=1</script><img src=x onerror="window.__owned=2">'


@pytest.fixture(scope="module")
def finished_ws(tiny_neox, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dash")
    run_experiment(load_experiment(write(tmp, tiny_neox, RUNS, name="dash")), workspace=tmp / "ws")
    return tmp / "ws"


def test_the_api_serves_runs_curves_and_main_differences_with_safety_headers(finished_ws):
    client = TestClient(make_app(finished_ws))
    page = client.get("/")
    assert page.status_code == 200 and str(finished_ws) in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
    state = client.get("/api/state").json()
    assert state["experiment"] == "dash" and {r["name"] for r in state["runs"]} == {"base", "A", "B"}
    a = next(r for r in state["runs"] if r["name"] == "A")
    assert a["status"] == "finished" and a["step"] == 4 and a["planned"] == 4 and a["eval_loss"] > 0
    head = state["compare"]["head"]
    assert head[1:4] == ["base", "A", "B"]  # as `loralab run` printed it: A is B's reference, as in `compare A B`
    labels = [r["cells"][0] for r in state["compare"]["rows"] if "cells" in r]
    assert "lora.r" in labels and "eval loss" in labels and state["sweeps"] == []
    curves = client.get("/api/curves", params={"ids": f"{a['id']},nope"}).json()
    assert list(curves) == [a["id"]] and curves[a["id"]]["step"] == [1, 2, 3, 4]
    assert client.get("/docs").status_code == 404  # nothing but the page and its two endpoints


def test_curves_are_thinned_for_the_page_keeping_the_last_step():
    assert _thin(5, 10) == [0, 1, 2, 3, 4]
    kept = _thin(10_000, 400)
    assert len(kept) <= 401 and kept[0] == 0 and kept[-1] == 9999 and kept == sorted(kept)


def test_a_dashboard_closes_the_store_it_owns_when_its_block_ends(finished_ws, monkeypatch):
    closed = []
    monkeypatch.setattr(Store, "close", lambda self: closed.append(self))
    with pytest.raises(RuntimeError), Dashboard(finished_ws) as dash:
        assert not closed
        raise RuntimeError("closed on an error too")
    assert closed == [dash.store]


def test_a_running_run_whose_process_is_gone_is_shown_interrupted(finished_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(finished_ws, ws)
    with Store(ws) as store:
        store.start("deadbeef", name="C", experiment="dash", kind="lora", config={}, model={}, data={}, env={}, seed=0)
        store.append_steps("deadbeef", [{"step": 1, "loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "tokens": 10,
                                         "seconds": 1.0, "total": 8}])
    with Dashboard(ws) as dash:
        c = next(r for r in dash.runs() if r["name"] == "C")
    assert c["status"] == "interrupted" and c["gone"] and c["step"] == 1 and c["planned"] == 8 and c["eta_s"] is None  # nobody trains it
    out = CliRunner().invoke(app, ["ls", "-w", str(ws)], terminal_width=200)
    assert out.exit_code == 0 and "interrupted (process gone)" in out.output and " running " not in out.output, out.output
    out = CliRunner().invoke(app, ["show", "C", "-w", str(ws)], terminal_width=200)
    assert out.exit_code == 0 and "status interrupted (process gone)" in out.output, out.output


def test_the_dashboard_counts_failed_trials_as_the_sweep_does():
    """A trial whose process was killed is Optuna's FAIL, but loralab's `interrupted` (it runs again):
    `loralab sweep` says 0 failed, and so does the dashboard."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from loralab.dashboard.state import sweep_progress

    dist = {"r": optuna.distributions.CategoricalDistribution([2, 4])}
    trials = [create_trial(params={"r": 2}, distributions=dist, value=1.0, user_attrs={"status": "finished"}),
              create_trial(params={"r": 4}, distributions=dist, state=TrialState.FAIL, user_attrs={"status": "interrupted"}),
              create_trial(params={"r": 4}, distributions=dist, state=TrialState.FAIL, user_attrs={"status": "failed"})]
    p = sweep_progress("s", trials, [optuna.study.StudyDirection.MINIMIZE], {"trials": 4})
    assert p["failed"] == 1 and p["interrupted"] == 1 and p["done"] == 1


def test_dashboard_errors_are_one_clear_message(finished_ws, tmp_path, monkeypatch):
    out = CliRunner().invoke(app, ["dashboard", "-w", str(tmp_path / "none")])
    assert out.exit_code != 0 and "no loralab workspace" in out.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = CliRunner().invoke(app, ["dashboard", "-w", str(finished_ws), "--port", str(busy.getsockname()[1])])
    assert out.exit_code == 2 and "--port" in out.output and "another --port" in out.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    out = CliRunner().invoke(app, ["dashboard", "-w", str(finished_ws)])
    assert out.exit_code == 2 and "pip install 'loralab[dashboard]'" in out.output


# -- in a browser ---------------------------------------------------------------------------------


def browser_or_skip() -> str:
    binary = chromium.find()
    if binary is None:
        if os.environ.get("LORALAB_REQUIRE_CHROMIUM") == "1":
            pytest.fail("Chromium is required here (LORALAB_REQUIRE_CHROMIUM=1): apt-get install chromium")
        pytest.skip("Chromium not installed (CI installs it: .ci/run)")
    return binary


class Served:
    """The dashboard app on a free local port, in a thread of this process (uvicorn's own server)."""

    def __init__(self, ws: Path, refresh_s: float = 0.2):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(make_app(ws, refresh_s), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the dashboard did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def until(page, expression: str, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {page.evaluate('document.body.innerText')}"
        time.sleep(0.1)


SWEEP_CELL = "(document.querySelector('#sweeps td.%s') || {}).textContent"


def test_the_page_follows_a_running_sweep_without_a_reload(tiny_neox, tmp_path):
    binary = browser_or_skip()
    f, ws, gate = write(tmp_path, tiny_neox, SWEEP, name="live"), tmp_path / "ws", tmp_path / "gate"
    # The sweep (its own process) stops at trial 1's 2nd step (the 6th step trained) until the gate opens.
    proc = Proc(tmp_path, "sweep", f, "-w", ws, fault="train.step:wait@6", gate=gate)
    proc.until(lambda: (ws / "optuna.db").is_file() and (ws / "loralab.db").is_file(), "the workspace exists")
    with Served(ws) as url, chromium.Browser(binary) as browser:
        page = browser.open(url)
        page.evaluate("window.__first_load = true")  # gone if the page ever reloaded
        until(page, (SWEEP_CELL % "done") + " === '1' && " + (SWEEP_CELL % "running") + " === '1'",
              "one trial done, one running")
        running = until(page, "[...document.querySelectorAll('#runs tr')].find(r => r.textContent.includes('running'))"
                              "?.querySelector('.progress').textContent", "a running trial's progress")
        assert running.endswith("/4")
        until(page, "document.querySelectorAll('#curves polyline').length >= 1", "the running trial's curve")
        assert page.evaluate(SWEEP_CELL % "left") == "—" and page.evaluate(SWEEP_CELL % "trials") == "2"
        shot = page.screenshot(tmp_path / "dashboard.png")
        polls = int(page.evaluate("document.body.dataset.polls"))
        gate.write_text("go")
        until(page, (SWEEP_CELL % "done") + " === '3'", "all three trials done", timeout=90)
        # the same page, updated by its own polling: never reloaded
        assert page.evaluate("window.__first_load") is True and int(page.evaluate("document.body.dataset.polls")) > polls
        assert page.evaluate(SWEEP_CELL % "running") == "0" and page.evaluate(SWEEP_CELL % "best").endswith(")")
        assert page.problems() == []  # no console error, no CSP violation, no exception
        assert all(u.startswith(url) for u in page.requests())  # nothing fetched from anywhere else
    assert proc.wait() == 0, proc.output
    check_screenshot(shot)
    if os.environ.get("LORALAB_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["LORALAB_DASHBOARD_SCREENSHOT"])


def check_screenshot(png: Path) -> None:
    """The main view was drawn: a 1200-pixel-wide page, and far from blank (the tables, the curve)."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 600  # the viewport less a scroll bar
    raw, pos = b"", 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            raw += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    pixels = zlib.decompress(raw)
    assert len(set(pixels[i:i + 64] for i in range(0, len(pixels), 4096))) > 50  # many distinct regions, not one colour


def test_hostile_names_in_the_workspace_stay_text_in_the_page(finished_ws, tmp_path):
    binary = browser_or_skip()
    ws = tmp_path / "ws"
    shutil.copytree(finished_ws, ws)
    store = Store(ws)
    store.start("0123456789ab", name=HOSTILE, experiment="dash", kind="lora", config={}, model={}, data={}, env={}, seed=0)
    store.append_steps("0123456789ab", [{"step": 1, "loss": 1.5, "grad_norm": 1.0, "lr": 1e-3, "tokens": 4,
                                         "seconds": 0.1, "total": 4}])
    store.close()
    with Served(ws) as url, chromium.Browser(binary) as browser:
        page = browser.open(url)
        until(page, "document.querySelectorAll('#runs tbody tr').length === 4", "the four runs")
        assert page.evaluate("window.__owned") is None
        assert page.evaluate("document.querySelectorAll('#runs script, #runs img, #curves img').length") == 0
        assert HOSTILE in page.evaluate("document.querySelector('#runs').innerText")
        page.evaluate("document.querySelector('#runs tbody tr').click()")
        until(page, "document.querySelectorAll('#curves polyline').length >= 1", "the clicked run's curve")
        assert page.evaluate("window.__owned") is None and page.problems() == []


def test_the_command_serves_the_page_and_stops_cleanly_on_ctrl_c(finished_ws, tmp_path):
    """`loralab dashboard` as a user starts it: the page and its JSON on 127.0.0.1, then Ctrl-C ends it
    with exit code 0 and no word about interrupted runs (a server has none)."""
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loralab.cli", "dashboard", "-w", str(finished_ws), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline, state = time.monotonic() + 60, None
        while state is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
            try:
                state = httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=2).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert {r["name"] for r in state["runs"]} == {"base", "A", "B"}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}/" in out and "interrupted" not in out.lower()


def test_each_run_says_which_host_ray_node_and_process_trained_it(finished_ws):
    """The placement is recorded with the run (env.placement) and shown by `show` and the dashboard; a run
    stored before it was recorded (env without it) still reads, with nothing shown."""
    state = Dashboard(finished_ws).state()
    a = next(r for r in state["runs"] if r["name"] == "A")
    assert a["host"] == f"{socket.gethostname()} (pid {os.getpid()})"  # trained in this process, no Ray here
    rec = Store(finished_ws, create=False).find("A")
    assert rec.env["placement"] == {"host": socket.gethostname(), "pid": os.getpid(), "ray_node": None}
    out = CliRunner().invoke(app, ["show", "A", "-w", str(finished_ws)])
    assert out.exit_code == 0 and f"trained on {socket.gethostname()} (pid {os.getpid()})" in out.output
    from loralab.environment import placement_text

    assert placement_text({}) is None and placement_text({"placement": "junk"}) is None
    assert placement_text({"placement": {"host": "n1", "pid": 7, "ray_node": "ab" * 28}}) == "n1 (pid 7, Ray node abababababab)"


def test_a_workspace_path_holding_html_stays_text_in_the_page(finished_ws, tmp_path):
    ws = tmp_path / HOSTILE.replace("/", "")
    shutil.copytree(finished_ws, ws)
    page = TestClient(make_app(ws)).get("/")
    assert page.status_code == 200
    assert "<script>window.__owned" not in page.text and "<img src=x" not in page.text
    assert "&lt;script&gt;window.__owned=1&lt;" in page.text  # shown, as text


def test_a_damaged_optuna_db_still_shows_the_runs_and_says_the_study_could_not_be_read(finished_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(finished_ws, ws)
    (ws / "optuna.db").write_bytes(b"this is not a SQLite database\0" * 200)
    client = TestClient(make_app(ws))
    for _ in range(2):  # every poll, not only the first
        got = client.get("/api/state")
        assert got.status_code == 200
        state = got.json()
        assert {r["name"] for r in state["runs"]} == {"base", "A", "B"} and state["sweeps"] == []
        assert state["sweep_error"].startswith("the sweep study could not be read (")
    assert Dashboard(finished_ws).state()["sweep_error"] is None


@pytest.mark.parametrize("host", ["256.1.1.1", "no-such-host.invalid", "192.0.2.1"])  # unresolvable, or not ours
def test_a_bad_host_is_reported_as_the_host_not_the_port(finished_ws, host):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    out = CliRunner().invoke(app, ["dashboard", "-w", str(finished_ws), "--host", host, "--port", port])
    assert out.exit_code == 2, out.output
    assert "--host" in out.output and "not an address of this machine" in out.output and "another --port" not in out.output


def test_a_workspace_database_damaged_while_served_is_one_line_not_a_500(finished_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(finished_ws, ws)
    client = TestClient(make_app(ws))
    assert client.get("/api/state").status_code == 200
    client.app.state.dashboard.store.engine.dispose()  # as after a restart of the server: no open connection
    db = ws / "loralab.db"
    for extra in ("-wal", "-shm"):
        (ws / f"loralab.db{extra}").unlink(missing_ok=True)
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xee" * (4096 - 100)  # its schema page
    db.write_bytes(bytes(data))
    got = client.get("/api/state")
    assert got.status_code == 503 and "is not a readable loralab database" in got.json()["error"]
    assert len(got.json()["error"].splitlines()) == 1
