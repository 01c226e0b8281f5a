"""A run's statuses, as stored in the database (plain strings: these constants change no stored value).

A sweep trial's `status` user attribute and a trial's outcome (sweep.study.TrialRuns) use the same words."""

from __future__ import annotations


class Status:
    """The status words of a run row: compare with these, never with a literal."""

    RUNNING = "running"  # a process trains or evaluates it now (or died doing so: see Store.in_progress)
    FINISHED = "finished"
    DIVERGED = "diverged"  # stopped by the divergence monitor; a rerun reuses it
    PRUNED = "pruned"  # stopped because other trials of its sweep did better
    INTERRUPTED = "interrupted"  # Ctrl-C, or a dead process found by the next run or `doctor --repair`
    FAILED = "failed"


STATUSES = (Status.RUNNING, Status.FINISHED, Status.DIVERGED, Status.PRUNED, Status.INTERRUPTED, Status.FAILED)
# Terminal outcomes. A rerun reuses finished and diverged runs (REUSED); a pruned run was stopped only
# because other trials of its sweep did better, so a plain `loralab run` trains it in full.
DONE = (Status.FINISHED, Status.DIVERGED, Status.PRUNED)
REUSED = (Status.FINISHED, Status.DIVERGED)
