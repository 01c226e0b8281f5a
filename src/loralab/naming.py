"""How a sweep's trials are named in the workspace, in one place: `trial-0003` for trial 3's runs, and
`trial-0003-confirm` for its confirmation on fresh seeds (sweep.confirm). Every module that writes or
reads such a name (the sweep, its report, trackers, doctor, the dashboard) uses these."""

from __future__ import annotations

import re

_TRIAL = re.compile(r"^trial-(\d{4,})(-confirm)?$")


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def confirm_name(number: int) -> str:
    return f"{trial_name(number)}-confirm"


def trial_number(name: str) -> int | None:
    """The trial a run name belongs to (its search runs or its confirmation), else None."""
    m = _TRIAL.match(name)
    return int(m.group(1)) if m else None


def is_trial(name: str) -> bool:
    """A search trial's own runs (not its confirmation)."""
    m = _TRIAL.match(name)
    return bool(m) and not m.group(2)


def confirmed_trial(name: str) -> str | None:
    """The trial name a confirmation run's name confirms, else None."""
    m = _TRIAL.match(name)
    return trial_name(int(m.group(1))) if m and m.group(2) else None
