"""The Ray executor on a local Ray instance (127.0.0.1, 2 CPUs, stopped after each test): a sweep on two
actors stores what the in-process executor stores, keeps budget.trials exact with two trials in flight,
survives an actor killed mid-trial, and each actor gets its own (declared) device."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time

import pytest

import loralab
from loralab import api
from loralab.config.loading import load_experiment
from loralab.config.schema import Experiment, ExecutorSpec
from loralab.errors import SpecError
from loralab.execute.prepare import prepare
from loralab.progress import Reporter
from loralab.sweep.study import run_sweep
from loralab.workspace.store import DB_NAME, Store

from test_sweep import BASE, sweep_file

ray = pytest.importorskip("ray")  # installed by `make test` (the ray extra); skipped only outside it

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # each actor trains on one core, as the local run does
GRID = """
strategy: grid
seed: 1
space:
  lora.r: [2, 4]
  train.learning_rate: [1.0e-3, 3.0e-3]
pruner: {name: none}
"""


@pytest.fixture(autouse=True)
def signals_kept():
    """Ray's nodes started in this process (a Cluster's add_node) register their own SIGTERM handler and
    leave it: put the process's handlers back, so processes forked by later tests start as a fresh one."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in before.items():
        if handler is not None:
            signal.signal(s, handler)


@pytest.fixture
def local_ray():
    """A local Ray instance of 2 CPUs (and 2 declared GPUs, for placement), stopped after the test."""
    from loralab.execute.ray_executor import kept_sigterm

    with kept_sigterm():  # processes this test process forks later must not inherit Ray's handler
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": ONE_THREAD},
                 log_to_driver=False, _node_ip_address="127.0.0.1",
                 object_store_memory=100 * 1024**2)  # jobs and outcomes are small; /dev/shm may be too
    yield
    ray.shutdown()


def values(result) -> dict:
    return {tuple(sorted(t.knobs.items())): t.values for t in result.trials}


def test_a_grid_on_two_actors_gives_the_local_executors_trial_results(local_ray, tiny_neox, tmp_path):
    f = sweep_file(tmp_path, tiny_neox, GRID)
    local = run_sweep(load_experiment(f), workspace=tmp_path / "local")
    made = []

    def two_actors(prepared, store, rep):  # the factory api.sweep makes, keeping the executor to look at
        from loralab.execute.ray_executor import RayExecutor

        made.append(RayExecutor(prepared, store, rep, ExecutorSpec(kind="ray", actors=2), ONE_THREAD))
        return made[-1]

    remote = run_sweep(load_experiment(f), workspace=tmp_path / "ray", executor=two_actors)
    assert made[0].slots == 2
    assert len(remote.trials) == 4 and all(t.status == "finished" for t in remote.trials)
    ours, theirs = values(remote), values(local)
    assert ours.keys() == theirs.keys()
    for knobs, v in theirs.items():  # same seeds, same code, one thread each: the same numbers
        assert ours[knobs] == pytest.approx(v, rel=1e-5), knobs


def test_budget_trials_is_exact_with_two_trials_in_flight(local_ray, tiny_neox, tmp_path):
    # Through the file's executor section and the API, as `loralab sweep` goes.
    f = sweep_file(tmp_path, tiny_neox, GRID.replace("pruner:", "budget: {trials: 3}\npruner:"),
                   extra=BASE + "executor: {kind: ray, actors: 2}\n")
    result = api.sweep(loralab.load(f), workspace=tmp_path / "ws")
    # Without counting the trials in flight, the second to finish would see 2 of 3 done and start a 4th.
    assert len(result.trials) == 3 and len(result.ran) == 3
    assert result.stopped == "budget of 3 trials reached"


def _running_rows(ws) -> int:
    if isinstance(ws, str):  # a PostgreSQL workspace
        try:
            store = Store(ws, create=False)
        except Exception:  # not created yet
            return 0
        try:
            return sum(r.status == "running" for r in store.all_runs())
        finally:
            store.close()
    try:
        with sqlite3.connect(f"file:{ws / DB_NAME}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from runs where status = 'running'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or being written
        return 0


@pytest.mark.parametrize("where", ["folder", "postgresql"])
def test_an_actor_killed_mid_trial_leaves_every_trial_run_once(where, local_ray, tiny_neox, tmp_path, request,
                                                               monkeypatch):
    extra = BASE
    if where == "postgresql":  # one workspace for many hosts: the driver may sit on another machine than its actors
        import socket

        ws = request.getfixturevalue("pg_url")
        extra += f"artifacts: {tmp_path / 'shared'}\n"
        monkeypatch.setattr(socket, "gethostname", lambda: "the-driver")  # the actors report the real name
    else:
        ws = tmp_path / "ws"
    f = sweep_file(tmp_path, tiny_neox, GRID, extra=extra)
    gate = tmp_path / "gate"
    # Each actor's first job waits after its 2nd training step until the gate exists: the test kills
    # one actor there (mid-trial, its run row `running`), then opens the gate.
    env = {**ONE_THREAD, "LORALAB_FAULT": "train.step:wait@2", "LORALAB_FAULT_GATE": str(gate)}
    made = []

    def two_actors(prepared, store, rep):
        from loralab.execute.ray_executor import RayExecutor

        made.append(RayExecutor(prepared, store, rep, ExecutorSpec(kind="ray", actors=2), env))
        return made[-1]

    def kill_one():
        deadline = time.monotonic() + 120
        while _running_rows(ws) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        killed.append(_running_rows(ws))
        ray.kill(made[0].actors[0], no_restart=True)
        gate.touch()

    killed: list[int] = []
    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    result = run_sweep(load_experiment(f), workspace=ws, executor=two_actors)
    killer.join(timeout=10)
    assert killed == [2]  # both actors were mid-trial when one was killed
    assert sorted(t.status for t in result.trials) == ["finished"] * 4
    ids = [i for t in result.trials for i in t.run_ids]
    assert len(ids) == len(set(ids)) == 4  # every trial once, each its own run
    store = Store(ws, create=False)
    try:
        assert sorted(store.get(i).status for i in ids) == ["finished"] * 4
        assert _running_rows(ws) == 0  # the dead actor's row was taken over, not left running
        if where == "postgresql":
            assert all(str(store.get(i).adapter_path).startswith(str((tmp_path / "shared").resolve())) for i in ids)
    finally:
        store.close()


def test_an_actor_lost_after_a_checkpoint_continues_its_trial_from_there(local_ray, tiny_neox, tmp_path):
    """A lost actor (a preempted node) costs only the steps since its trial's last checkpoint: the trial goes
    on from that step on the other actor and ends with the numbers of a sweep that was never stopped."""
    f = sweep_file(tmp_path, tiny_neox, GRID, extra=BASE.replace("max_steps: 6}", "max_steps: 6, checkpoint_every: 2}"))
    local = run_sweep(load_experiment(f), workspace=tmp_path / "local")
    ws, gate = tmp_path / "ray", tmp_path / "gate"
    # Each actor's first trial waits after its 3rd step (its checkpoint at step 2 written) until the gate exists.
    env = {**ONE_THREAD, "LORALAB_FAULT": "train.step:wait@3", "LORALAB_FAULT_GATE": str(gate)}
    made, killed = [], []

    def two_actors(prepared, store, rep):
        from loralab.execute.ray_executor import RayExecutor

        made.append(RayExecutor(prepared, store, rep, ExecutorSpec(kind="ray", actors=2), env))
        return made[-1]

    def kill_one():
        deadline = time.monotonic() + 120
        while len(list(ws.glob("runs/*/checkpoints/step-00000002/meta.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # both actors now wait at step 3
        killed.append(_running_rows(ws))
        ray.kill(made[0].actors[0], no_restart=True)
        gate.touch()

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    remote = run_sweep(load_experiment(f), workspace=ws, executor=two_actors)
    killer.join(timeout=10)
    assert killed == [2]
    assert sorted(t.status for t in remote.trials) == ["finished"] * 4
    with Store(ws, create=False) as store:
        records = [store.get(i) for t in remote.trials for i in t.run_ids]
        assert len(records) == 4 and all(r.status == "finished" for r in records)
        assert [r.timings.get("resumed_at") for r in records].count([2]) == 1  # the lost actor's trial, from step 2
        assert not any(ws.glob("runs/*/checkpoints"))  # cleaned once stored
    ours, theirs = values(remote), values(local)
    assert ours.keys() == theirs.keys()
    for knobs, v in theirs.items():
        assert ours[knobs] == pytest.approx(v, rel=1e-5), knobs


def test_each_actor_sees_only_its_own_device(local_ray, tiny_neox, tmp_path):
    from loralab.execute.ray_executor import RayExecutor

    exp = loralab.load(sweep_file(tmp_path, tiny_neox, GRID))
    store = Store(tmp_path / "ws")
    spec = ExecutorSpec(kind="ray", gpus_per_trial=1)  # actors: as many as the 2 declared GPUs hold
    ex = RayExecutor(prepare(exp), store, Reporter(), spec, ONE_THREAD)
    try:
        places = ex.placements()
    finally:
        ex.close()
        store.close()
    assert ex.slots == 2
    assert sorted(p["gpu_ids"][0] for p in places) == ["0", "1"]
    assert sorted(p["cuda_visible_devices"] for p in places) == ["0", "1"]  # what torch would see
    assert all(p["resources"]["GPU"] == 1.0 for p in places)


def test_executor_options_are_checked_before_anything_loads(monkeypatch):
    plain = Experiment()
    with pytest.raises(SpecError, match="--executor and --address"):
        api.executor_factory(plain, "local", "127.0.0.1:6379")
    assert api.executor_factory(plain) is None  # the default: in this process
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(SpecError) as info:
        api.executor_factory(plain, "ray")
    assert "pip install 'loralab[ray]'" in str(info.value.problems[0])


def test_loralab_run_on_ray_stores_what_the_local_executor_stores(local_ray, tiny_neox, tmp_path):
    from test_runner import SEED_RUNS, experiment

    exp = loralab.load(experiment(tmp_path, tiny_neox, name="ex", runs="evaluation: {drift: false}\nrepeats: 2\n" + SEED_RUNS))
    local = api.run(exp, workspace=tmp_path / "local")
    remote = api.run(exp, workspace=tmp_path / "ray", executor="ray")  # 2 actors: the 2 CPUs, 1 each
    assert [(r.name, r.seed) for r in remote.records] == [(r.name, r.seed) for r in local.records]
    assert [r.id for r in remote.records] == [r.id for r in local.records]  # the same runs, in file order
    for ours, theirs in zip(remote.records, local.records):
        assert ours.status == theirs.status == "finished"
        assert ours.metrics["eval_loss"] == pytest.approx(theirs.metrics["eval_loss"], rel=1e-5), ours.name


def test_the_cli_refuses_an_address_for_the_local_executor(tiny_neox, tmp_path):
    from typer.testing import CliRunner

    from loralab.cli import app

    f = sweep_file(tmp_path, tiny_neox, GRID)
    out = CliRunner().invoke(app, ["sweep", str(f), "--executor", "local", "--address", "127.0.0.1:6379",
                                   "-w", str(tmp_path / "ws")])
    assert out.exit_code == 2, out.output
    assert "--executor and --address" in out.output and not (tmp_path / "ws").exists()


def test_starting_ray_keeps_the_clis_sigterm_handler(tiny_neox, tmp_path):
    import signal

    def ours(signum, frame):  # what the CLI installs: the current trial marked interrupted, exit 143
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, ours)
    try:
        f = sweep_file(tmp_path, tiny_neox, GRID.replace("pruner:", "budget: {trials: 1}\npruner:"))
        spec = ExecutorSpec(kind="ray", actors=1, cpus_per_trial=2)  # a local Ray instance of its own
        from loralab.execute.ray_executor import factory

        made = []
        result = run_sweep(load_experiment(f), workspace=tmp_path / "ws",
                           executor=lambda *a: made.append(factory(spec, ONE_THREAD)(*a)) or made[-1])
        assert signal.getsignal(signal.SIGTERM) is ours and len(result.trials) == 1
        assert made[0].started_ray and not ray.is_initialized()  # it started Ray, and stopped it on close
    finally:
        signal.signal(signal.SIGTERM, before)


def test_actors_are_sized_by_the_scarcest_resource_and_never_more_than_fit(local_ray, tiny_neox, tmp_path):
    from loralab.execute.ray_executor import RayExecutor

    exp = loralab.load(sweep_file(tmp_path, tiny_neox, GRID))
    prepared, store = prepare(exp), Store(tmp_path / "ws")
    try:
        # 2 GPUs hold 2 trials, but 2 CPUs hold one trial of 2 CPUs: one actor, not a second waiting for ever.
        ex = RayExecutor(prepared, store, Reporter(), ExecutorSpec(kind="ray", gpus_per_trial=1, cpus_per_trial=2))
        assert ex.slots == 1
        ex.close()
        with pytest.raises(SpecError, match="holds 2 trial"):
            RayExecutor(prepared, store, Reporter(), ExecutorSpec(kind="ray", actors=3))
    finally:
        store.close()


def test_actors_on_another_machine_are_refused(local_ray, tiny_neox, tmp_path, monkeypatch):
    import socket

    from loralab.execute.ray_executor import RayExecutor

    exp = loralab.load(sweep_file(tmp_path, tiny_neox, GRID))
    prepared, store = prepare(exp), Store(tmp_path / "ws")
    real = socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: "the-driver")  # the actors still report this machine
    try:
        with pytest.raises(SpecError, match=f"other machines \\({real}\\)"):  # they would store runs on their own disk
            RayExecutor(prepared, store, Reporter(), ExecutorSpec(kind="ray", actors=1))
    finally:
        store.close()


def test_an_unreachable_or_malformed_address_is_one_line_before_anything_loads(tiny_neox, tmp_path):
    """`--address 127.0.0.1:1` once retried for ever in silence; a malformed one crashed in Ray. Both are
    refused before the model loads, the workspace is made or Ray starts, naming what the user wrote."""
    from typer.testing import CliRunner

    from loralab.cli import app

    f = sweep_file(tmp_path, tiny_neox, GRID)
    t0 = time.monotonic()
    out = CliRunner().invoke(app, ["sweep", str(f), "--address", "127.0.0.1:1", "-w", str(tmp_path / "ws")])
    assert out.exit_code == 2, out.output
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in out.output and "--address" in out.output
    assert time.monotonic() - t0 < 60 and not (tmp_path / "ws").exists() and not ray.is_initialized()
    for bad in ("10.0.0.5", "http://head:6379", "head:99999"):
        out = CliRunner().invoke(app, ["sweep", str(f), "--address", bad, "-w", str(tmp_path / "ws")])
        assert out.exit_code == 2 and "is not a Ray address" in out.output and "--address" in out.output, out.output
        assert "do not fit together" not in out.output
    f.write_text(f.read_text() + "executor: {kind: ray, address: 'head'}\n")
    out = CliRunner().invoke(app, ["validate", str(f)])
    assert out.exit_code == 2 and "executor.address" in out.output and "HOST:PORT" in out.output, out.output


def test_gpus_asked_of_a_machine_without_cuda_are_refused_before_ray_starts(monkeypatch):
    import torch

    from loralab.execute.ray_executor import factory

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SpecError) as info:
        factory(ExecutorSpec(kind="ray", gpus_per_trial=1))
    assert info.value.problems[0].where == "executor.gpus_per_trial" and "no GPU" in str(info.value)
    assert not ray.is_initialized()
    factory(ExecutorSpec(kind="ray"))  # CPU trials need none


def test_a_lost_node_whose_replacement_has_no_room_does_not_hang_the_sweep(local_ray, tiny_neox, tmp_path):
    """An actor dies with its node; its replacement can be placed nowhere (here: it needs a resource of the
    lost node, as `Pending Demands` showed). The job used to wait on the unplaceable replacement for ever; it
    now runs again on the live actor, said in one line, and every trial finishes once."""
    from rich.console import Console

    from loralab.execute.ray_executor import RayExecutor, Worker

    f = sweep_file(tmp_path, tiny_neox, GRID)
    ws, gate = tmp_path / "ws", tmp_path / "gate"
    env = {**ONE_THREAD, "LORALAB_FAULT": "train.step:wait@2", "LORALAB_FAULT_GATE": str(gate)}
    made = []

    def two_actors(prepared, store, rep):
        ex = RayExecutor(prepared, store, rep, ExecutorSpec(kind="ray", actors=2), env)
        lost = ray.remote(num_cpus=1, resources={"the-lost-node": 1})(Worker).options(runtime_env={"env_vars": env})
        ex._new_actor = lambda: lost.remote(*ex.args)  # a replacement with no room anywhere in the cluster
        made.append(ex)
        return ex

    def kill_one():
        deadline = time.monotonic() + 120
        while _running_rows(ws) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ray.kill(made[0].actors[0], no_restart=True)
        gate.touch()

    console = Console(record=True, width=300)
    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    out: list = []
    sweep = threading.Thread(target=lambda: out.append(run_sweep(load_experiment(f), workspace=ws, executor=two_actors,
                                                                 reporter=Reporter(console))), daemon=True)
    sweep.start()
    sweep.join(timeout=400)
    assert not sweep.is_alive(), "the sweep hung on the replacement actor: " + console.export_text()[-2000:]
    result = out[0]
    assert sorted(t.status for t in result.trials) == ["finished"] * 4
    ids = [i for t in result.trials for i in t.run_ids]
    assert len(ids) == len(set(ids)) == 4 and _running_rows(ws) == 0
    text = console.export_text()
    assert text.count("its Ray actor died (") == 1 and "running it again on a live actor" in text
    assert "a replacement joins once the cluster has room for it (1 CPU)" in text
    deadline = time.monotonic() + 30
    while made[0].starting and time.monotonic() < deadline:  # closed: the waiting replacement is killed, not kept
        time.sleep(0.1)
    assert made[0].starting == 0


def test_a_refused_connection_names_the_token_fix_when_the_auth_mode_is_unset(monkeypatch):
    """Ray 2.60 logs a refused token on stderr and raises a plain ConnectionError (seen with a two-node
    cluster started as the README says, minus RAY_AUTH_MODE): loralab's one line says what to set."""
    from loralab.execute.ray_executor import init_error

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    err = init_error(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"), "10.0.0.5:6379")
    assert "Ray could not connect to 10.0.0.5:6379 (ConnectionError: Failed to connect" in err.args[0]
    assert "RAY_AUTH_MODE=token" in err.problems[0].fix and "~/.ray/auth_token" in err.problems[0].fix
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set already: the token is not the likely cause
    assert "RAY_AUTH_MODE" not in init_error(ConnectionError("x"), "10.0.0.5:6379").problems[0].fix


def test_a_node_that_joins_mid_sweep_gets_an_actor(tiny_neox, tmp_path, monkeypatch):
    """Two local Ray nodes (ray.cluster_utils.Cluster): the executor starts with the head's one CPU, and
    once a second node joins it places an actor there and counts one more slot (the sweep reads it)."""
    from ray.cluster_utils import Cluster

    from loralab.execute import ray_executor
    from loralab.execute.ray_executor import RayExecutor, kept_sigterm

    monkeypatch.setattr(ray_executor, "JOIN_CHECK_S", 0.5)
    with kept_sigterm():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "object_store_memory": 100 * 1024**2})
    store, ex = Store(tmp_path / "ws"), None
    try:
        with kept_sigterm():
            ray.init(address=cluster.address, runtime_env={"env_vars": ONE_THREAD}, log_to_driver=False)
        exp = loralab.load(sweep_file(tmp_path, tiny_neox, GRID))
        ex = RayExecutor(prepare(exp), store, Reporter(), ExecutorSpec(kind="ray"), ONE_THREAD)
        assert ex.slots == 1
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        deadline = time.monotonic() + 180
        while ex.slots < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ex.slots == 2 and ex.starting == 0
        nodes = {p["host"] for p in ex.placements()}
        assert len(ex.actors) == 2 and nodes == {__import__("socket").gethostname()}
        assert ex.idle.qsize() == 2  # both take jobs
    finally:
        if ex is not None:
            ex.close()
        store.close()
        ray.shutdown()
        cluster.shutdown()


def test_with_every_actor_lost_the_trial_is_given_back_in_bounded_time(local_ray, tiny_neox, tmp_path, monkeypatch):
    """The only actor dies and its replacement has no room: waiting on, the driver's heartbeat would keep the
    trial from every other worker. After NO_ACTOR_S the trial is given back (queued again, told interrupted)
    with a line that says why, and the sweep stops like an interrupted one."""
    import optuna
    from rich.console import Console

    from loralab.execute import ray_executor
    from loralab.execute.ray_executor import ClusterLost, RayExecutor, Worker

    monkeypatch.setattr(ray_executor, "WAIT_NOTE_S", 1.0)
    monkeypatch.setattr(ray_executor, "NO_ACTOR_S", 4.0)
    f = sweep_file(tmp_path, tiny_neox, GRID)
    ws, gate = tmp_path / "ws", tmp_path / "gate"
    env = {**ONE_THREAD, "LORALAB_FAULT": "train.step:wait@2", "LORALAB_FAULT_GATE": str(gate)}
    made = []

    def one_actor(prepared, store, rep):
        ex = RayExecutor(prepared, store, rep, ExecutorSpec(kind="ray", actors=1), env)
        lost = ray.remote(num_cpus=1, resources={"the-lost-node": 1})(Worker).options(runtime_env={"env_vars": env})
        ex._new_actor = lambda: lost.remote(*ex.args)
        made.append(ex)
        return ex

    def kill_it():
        deadline = time.monotonic() + 120
        while _running_rows(ws) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        ray.kill(made[0].actors[0], no_restart=True)
        gate.touch()

    console = Console(record=True, width=300)
    threading.Thread(target=kill_it, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(ClusterLost):
        run_sweep(load_experiment(f), workspace=ws, executor=one_actor, reporter=Reporter(console))
    assert time.monotonic() - t0 < 200
    text = console.export_text()
    assert "no live Ray actor; waiting up to 4 s" in text and "no live Ray actor for 4 s; given back" in text
    trials = optuna.load_study(study_name="sw", storage=f"sqlite:///{ws / 'optuna.db'}").get_trials()
    first = trials[0]
    assert first.state.name == "FAIL" and first.user_attrs["status"] == "interrupted"
    assert any(t.state.name == "WAITING" and t.user_attrs.get("retry_of") == first.number for t in trials)
