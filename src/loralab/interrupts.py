"""Short stretches of work that a Ctrl-C or SIGTERM must not cut in two.

The CLI turns both signals into exceptions (KeyboardInterrupt, `cli.Terminated`) raised wherever the main
thread happens to be. Inside `held()` — a checkpoint written and the older one removed, a run's results
committed — the exception waits until the stretch is done, so a stop never leaves two checkpoints, a
checkpoint without its cleanup, or a finished run without its results. A second signal still ends the
process at once (the CLI resets the handler to the default action on the first).
"""

from __future__ import annotations

import contextlib
import threading

_depth = 0
_pending: BaseException | None = None


def deliver(exc: BaseException) -> None:
    """Raise `exc` now, or, inside `held()`, when the held stretch ends (called from signal handlers)."""
    global _pending
    if _depth and threading.current_thread() is threading.main_thread():
        if _pending is None:  # the first stop is the one reported
            _pending = exc
        return
    raise exc


@contextlib.contextmanager
def held():
    """Run the block whole; a stop that arrived meanwhile is raised after it (unless the block failed)."""
    global _depth, _pending
    main = threading.current_thread() is threading.main_thread()
    if main:
        _depth += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if main:
            _depth -= 1
            if _depth == 0 and _pending is not None:
                exc, _pending = _pending, None
                if not failed:
                    raise exc
