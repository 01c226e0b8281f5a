"""The Ray executor: long-lived Ray actors, each with the base model loaded once, take the sweep's or the
run's jobs (execute.Job, plain data), so several trials train at once, on one machine or a cluster.

Each actor declares `cpus_per_trial` CPUs and `gpus_per_trial` GPUs; Ray places it where those are
free and sets its CUDA_VISIBLE_DEVICES, so each actor sees only its own device(s). Every actor opens
the workspace itself (the same folder on one machine; or, across hosts, the same PostgreSQL workspace
and artifacts folder) and runs runner.train_run, the
code LocalExecutor runs, so a trial's stored runs are the same whichever executor trained them.

An actor that dies mid-job (a crash, an out-of-memory kill, a lost node) is replaced and the job runs
once more on another live actor: the run's lock died with the process, so the retry takes over the row it
left `running` (store.start replaces an unfinished row) and no run is stored twice. The replacement takes
jobs only once Ray has placed it: after a lost node it may have no room until a node joins.

Imported only when `executor.kind` is `ray`: Ray is an optional extra (`pip install 'loralab[ray]'`).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Any

from loralab.config.schema import ExecutorSpec
from loralab.errors import Problem, SpecError
from loralab.execute.jobs import Job, Outcome

RETRIES = 1  # a job whose actor died runs once more on a live actor; a second death fails the run
WAIT_NOTE_S = 30.0  # a job waiting this long for an actor with none alive says so (once)
# With every actor lost and none placeable for this long, the job is given back (its trial queued again, for
# another worker or the next sweep): waiting on, the driver's heartbeat would keep the trial from them.
NO_ACTOR_S = 300.0
JOIN_CHECK_S = 10.0  # how often the cluster is asked whether a node joined with room for more actors


class ClusterLost(KeyboardInterrupt):
    """No live actor for NO_ACTOR_S: handled like Ctrl-C (the run in hand marked interrupted, a sweep's trial
    queued again), after a line that says why."""
INSTALL = "pip install 'loralab[ray]'"


def require_ray():
    """The ray module, or the one-message error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise SpecError("the Ray executor needs Ray, which is not installed",
                        [Problem("executor.kind", "ray is not installed", "ray", INSTALL)]) from None
    return ray


@contextmanager
def kept_sigterm():
    """ray.init replaces the SIGTERM handler with sys.exit and leaves it there; the CLI's (the current
    trial marked interrupted, exit 143) is put back."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


class Worker:
    """One Ray actor: the base model loaded once (execute.prepare), the workspace opened, jobs run in turn."""

    def __init__(self, exp, only: list[str] | None, workspace: str, artifacts: str | None = None):
        from loralab.execute.local import LocalExecutor
        from loralab.execute.prepare import prepare
        from loralab.progress import Reporter
        from loralab.workspace.store import Store

        rep = Reporter()
        self.local = LocalExecutor(prepare(exp, only, rep), Store(workspace, artifacts=artifacts), rep)

    def run(self, job: Job) -> Outcome:
        return self.local.run(job)

    def placement(self) -> dict[str, Any]:
        """What Ray gave this actor: its GPU ids, its resources, and the devices CUDA will see."""
        import ray

        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "resources": ray.get_runtime_context().get_assigned_resources(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                "host": socket.gethostname()}


class RayExecutor:
    """execute.Executor on Ray actors; `slots` = the number of actors (a sweep or `loralab run` keeps that many jobs
    in flight). Thread-safe: each `run` takes an idle actor, waits for its job, and gives it back."""

    def __init__(self, prepared, store, reporter, spec: ExecutorSpec, env: dict[str, str] | None = None):
        ray = require_ray()
        self.ray, self.prepared, self.store, self.rep, self.spec = ray, prepared, store, reporter, spec
        if not ray.is_initialized():  # without an address: a local Ray instance with this machine's resources
            with kept_sigterm():
                try:
                    ray.init(address=spec.address, include_dashboard=False)
                except Exception as err:  # refused by the cluster (its token), or gone since check_address
                    raise init_error(err, spec.address) from None
            self.started_ray = True
        else:
            self.started_ray = False
        self.remote = ray.remote(num_cpus=spec.cpus_per_trial, num_gpus=spec.gpus_per_trial)(Worker).options(
            runtime_env={"env_vars": dict(env)} if env else None)
        self.args = (prepared.exp, [r.name for r in prepared.runs], *store.location)
        self.closed = False
        self.stopped = threading.Event()  # set by close: the join watcher stops
        room = self._fit()
        if spec.actors is not None and spec.actors > room:  # the others would wait for resources for ever
            raise SpecError(f"executor.actors is {spec.actors} but the Ray cluster holds {room} trial(s) of "
                            f"{spec.cpus_per_trial:g} CPU and {spec.gpus_per_trial:g} GPU",
                            [Problem("executor.actors", f"more than the cluster holds ({room})", spec.actors,
                                     "lower it, or add a machine with `ray start --address ...`")])
        n = spec.actors or room
        self.actors = [self._new_actor() for _ in range(n)]
        self.idle: queue.Queue = queue.Queue()
        for a in self.actors:
            self.idle.put(a)
        self.slots = n
        self.lock = threading.Lock()
        self.starting = 0  # replacement actors not yet placed and ready
        if store.url is None:  # a folder workspace lives on this machine's disk
            self._same_host()
        if spec.actors is None:
            threading.Thread(target=self._watch_joins, daemon=True, name="ray-joins").start()
        reporter.log(f"Ray executor: {n} actor(s), {spec.cpus_per_trial:g} CPU and {spec.gpus_per_trial:g} GPU each, "
                     f"cluster {spec.address or 'local'}")

    def _fit(self) -> int:
        """As many actors as the cluster's resources hold: the fewest of its CPUs and (when trials take
        them) GPUs divided by what one trial declares."""
        total = self.ray.cluster_resources()
        need = {"CPU": self.spec.cpus_per_trial, "GPU": self.spec.gpus_per_trial}
        fits = {key: int(total.get(key, 0) // each) for key, each in need.items() if each > 0}
        key = min(fits, key=fits.get)
        if fits[key] < 1:
            raise SpecError(f"the Ray cluster has no room for one trial ({total.get(key, 0):g} {key} in all)",
                            [Problem(f"executor.{key.lower()}s_per_trial", f"more than the cluster's {key}", need[key],
                                     "lower it, or add a machine with `ray start --address ...`")])
        return fits[key]

    def _same_host(self) -> None:
        """Refuse actors on other machines: each would store its runs in a folder of that machine's own
        disk, and a workspace shared by several hosts (a database server) does not exist yet (a network
        file system is no answer: docs/reliability.md, Network file systems). Waits for the actors' start."""
        here = socket.gethostname()
        away = sorted({p["host"] for p in self.placements()} - {here})
        if away:
            self.close()
            raise SpecError(f"Ray placed actors on other machines ({', '.join(away)}); their runs would be stored "
                            "on those machines' disks, not in this workspace",
                            [Problem("executor.address", "a cluster of several machines", self.spec.address,
                                     f"use a workspace every host reaches (`workspace: postgresql://...` and "
                                     f"`artifacts:` on a shared disk), or a Ray instance on {here} alone")])

    def _new_actor(self):
        return self.remote.remote(*self.args)

    def placements(self) -> list[dict[str, Any]]:
        """Each actor's placement (Worker.placement), in actor order."""
        return self.ray.get([a.placement.remote() for a in self.actors])

    def run(self, job: Job) -> Outcome:
        from ray.exceptions import RayActorError

        for attempt in range(RETRIES + 1):
            actor = self._take(job)
            try:
                out = self.ray.get(actor.run.remote(job))
            except Exception as err:
                if self.closed:  # closed mid-job (Ctrl-C): the job was interrupted, as in this process
                    raise KeyboardInterrupt from None
                if not isinstance(err, RayActorError):
                    raise
                self._replace(actor)
                again = "running it again on a live actor" if attempt < RETRIES else "giving up"
                self.rep.log(f"[yellow]{job.label or job.run.name}: its Ray actor died ({type(err).__name__}); {again}; "
                             f"a replacement joins once the cluster has room for it ({self._need()})[/yellow]")
                continue
            self.idle.put(actor)
            return out
        return self._failed(job)

    def _need(self) -> str:
        return f"{self.spec.cpus_per_trial:g} CPU" + (f", {self.spec.gpus_per_trial:g} GPU" if self.spec.gpus_per_trial else "")

    def _take(self, job: Job):
        """An idle live actor; said once a job has waited a while with every actor lost (replacements waiting)."""
        try:
            return self.idle.get(timeout=WAIT_NOTE_S)
        except queue.Empty:
            with self.lock:
                none_alive = self.starting == len(self.actors)
            if none_alive:
                self.rep.log(f"[yellow]{job.label or job.run.name}: no live Ray actor; waiting up to {NO_ACTOR_S:.0f} s "
                             f"for the cluster to have room for one ({self._need()}): add a node with "
                             f"`ray start --address ...`[/yellow]")
        try:
            return self.idle.get(timeout=max(NO_ACTOR_S - WAIT_NOTE_S, 0.0))
        except queue.Empty:
            self.rep.log(f"[red]{job.label or job.run.name}: no live Ray actor for {NO_ACTOR_S:.0f} s; given back "
                         "(another worker, or the next sweep, runs it)[/red]")
            raise ClusterLost from None

    def _replace(self, dead) -> None:
        """A new actor in place of a dead one, handed to jobs only once Ray placed it and it loaded the model
        (_when_ready): without room (its node lost, the survivors holding the rest) it waits in Ray's queue,
        not in front of a job, and a node that joins later gives it room."""
        fresh = self._new_actor()
        with self.lock:
            self.actors[self.actors.index(dead)] = fresh
            self.starting += 1
        threading.Thread(target=self._when_ready, args=(fresh,), daemon=True, name="ray-replacement").start()

    def _when_ready(self, actor, joined: bool = False) -> None:
        try:
            where = self.ray.get(actor.placement.remote())
        except BaseException:  # killed by close, died while starting, or Ray shut down (SystemExit): nothing to hand on
            where = None
        finally:
            with self.lock:
                self.starting -= 1
        away = where is not None and self.store.url is None and where["host"] != socket.gethostname()
        if where is None or away:  # a folder workspace is this machine's disk (see _same_host): not there
            if away:
                self.ray.kill(actor)
                if not self.stopped.is_set():
                    self.rep.log(f"Ray executor: a node joined on {where['host']}; not used, as this workspace is a "
                                 "folder on this machine (a PostgreSQL workspace lets every host store runs)")
                self.stopped.set()  # no more actors sent there
            if joined:
                with self.lock:
                    self.actors.remove(actor)
            return
        if not self.closed:
            if joined:
                with self.lock:
                    self.slots += 1  # the sweep reads it again: one more trial in flight
                self.rep.log(f"Ray executor: a node joined; {self.slots} actor(s) now")
            self.idle.put(actor)

    def _watch_joins(self) -> None:
        """Nodes that join mid-sweep are used: while `actors` is left to the cluster's size, an actor is added
        whenever the cluster holds more than it has (placed first: a lost node's replacement counts)."""
        while not self.closed and not self.stopped.wait(JOIN_CHECK_S):
            try:
                room = self._fit()
            except BaseException:  # no room at all now (nodes lost), or Ray going down: asked again later
                continue
            with self.lock:
                extra = room - len(self.actors)
                fresh = [self._new_actor() for _ in range(max(extra, 0))]
                self.actors.extend(fresh)
                self.starting += len(fresh)
            for a in fresh:
                threading.Thread(target=self._when_ready, args=(a, True), daemon=True, name="ray-joined").start()

    def _failed(self, job: Job) -> Outcome:
        """A job whose actors kept dying: stored as failed, so the trial ends like any failed run."""
        from loralab.execute.runner import store_failed

        return store_failed(self.prepared, job, self.store, f"its Ray actor died {RETRIES + 1} times")

    def close(self) -> None:
        """Stop the actors (and the local Ray instance this executor started). Called while jobs run
        (Ctrl-C), their `run` calls raise KeyboardInterrupt; their rows stay `running` for the next try."""
        self.closed = True
        self.stopped.set()
        with self.lock:
            actors = list(self.actors)
        for a in actors:
            self.ray.kill(a)
        if self.started_ray:
            self.ray.shutdown()


PROBE_S = 10.0  # how long the cluster's address may take to accept a connection (ray.init would retry for ever)


def _host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) an address connects to first: the GCS of `HOST:PORT`, the client server of
    `ray://HOST[:PORT]` (10001 by default); None for `auto` and `local`, which name no socket."""
    if address in ("auto", "local"):
        return None
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if rest.rpartition(":")[2].isdigit() else (rest, "", "10001" if client else "")
    return host.strip("[]"), int(port)


def check_address(address: str | None, where: str = "executor.address") -> None:
    """A Ray address must be reachable: refused within PROBE_S seconds, with one line, instead of
    ray.init retrying an unreachable cluster for ever. `where`: what the user wrote it as."""
    target = _host_port(address) if address else None
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=PROBE_S).close()
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err) or type(err).__name__)
        raise SpecError(f"cannot reach the Ray cluster at {address} ({why})",
                        [Problem(where, f"unreachable: {why}", address,
                                 "start the cluster there (`ray start --head` prints its address), or fix the "
                                 "address; leave it out for a Ray instance on this machine")]) from None


def init_error(err: BaseException, address: str | None) -> SpecError:
    """ray.init's failure as one message; a cluster with token authentication (Ray 2.52+, the default of a
    local cluster from Ray 2.59, see README, Ray clusters) refuses a process without its token."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    # Ray logs a refused token on stderr and raises a plain ConnectionError: the mode is what can be checked
    auth = address not in (None, "local") and os.environ.get("RAY_AUTH_MODE", "").lower() != "token"
    token = ("RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token from the head, or RAY_AUTH_TOKEN) "
             "for every process: `ray start` on each node and this command")
    fix = (f"check that the cluster runs (`ray status` on its head); one with token authentication needs {token}"
           if auth else "check the address and that the cluster runs (`ray status` on its head)")
    return SpecError(f"Ray could not connect to {address or 'a local instance'} ({type(err).__name__}: {first})",
                     [Problem("executor.address", "Ray did not connect",
                              address, fix)])


def check_gpus(spec: ExecutorSpec, ray) -> None:
    """GPUs asked of a local Ray instance on a machine without CUDA: refused before Ray starts."""
    if spec.gpus_per_trial > 0 and spec.address is None and not ray.is_initialized():
        import torch

        if torch.cuda.device_count() == 0:
            raise SpecError(f"executor.gpus_per_trial is {spec.gpus_per_trial:g} but this machine has no CUDA GPU",
                            [Problem("executor.gpus_per_trial", "no GPU on this machine", spec.gpus_per_trial,
                                     "set it to 0 on a CPU machine, or give `address:` a cluster with GPUs")])


def factory(spec: ExecutorSpec, env: dict[str, str] | None = None, where: str = "executor.address"):
    """An ExecutorFactory making a RayExecutor of `spec`; `env`: variables every actor gets. The address
    and the GPUs are checked here, before anything loads; `where`: how the address was given."""
    ray = require_ray()
    check_address(spec.address, where)
    check_gpus(spec, ray)

    def make(prepared, store, reporter):
        return RayExecutor(prepared, store, reporter, spec, env)

    return make
