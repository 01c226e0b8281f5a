"""Who is working on what, so that two processes never train the same run and a crash is told from
work in progress.

File locks (`flock`) mark work in progress in a folder workspace: the kernel drops them when the
process dies, even by kill -9, so a lock that can be taken means nobody is at it any more (a
PostgreSQL workspace uses advisory locks, which the server drops with the connection: store.py).
Optuna trials record their owner process (host, pid, start time), judged here by whether that
process still exists; a trial of another host is judged by its heartbeat (sweep/study.py).

flock works on local file systems; on NFS it is emulated with byte-range locks that depend on the
server's lock manager (see docs/reliability.md): keep workspaces on a local disk.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; locking is skipped and liveness is unknown (treated as dead)
    fcntl = None  # type: ignore[assignment]


@contextmanager
def file_lock(path: Path, *, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if needed) for the block; yields whether it was
    taken. Blocking: waits for the holder (calling `on_wait` once first), then yields True."""
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken = True
        except BlockingIOError:
            taken = False
            if blocking:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
                taken = True
        yield taken
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(path: Path) -> bool:
    """Whether another process (or another descriptor of this one) holds the lock on `path` now."""
    if fcntl is None or not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def process_identity() -> dict:
    """This process, in a form another process can check later: pid alone is reused after exit."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def process_alive(owner: dict | None) -> bool:
    """Whether the process `owner` names still runs. A process on another machine cannot be checked
    and counts as alive: its own machine's next sweep recovers its trials if it died."""
    import psutil

    if not isinstance(owner, dict) or "pid" not in owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(owner["pid"]))
        if abs(proc.create_time() - float(owner.get("started", 0))) > 1.0:
            return False  # the pid was reused by a later process
        return proc.status() != psutil.STATUS_ZOMBIE  # killed, not yet reaped by its parent
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
