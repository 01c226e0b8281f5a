"""Every private name of Optuna that loralab relies on, in one module, for the versions listed here.

Optuna has no public way to: write a trial's attributes without running the sampler's `before_trial`
(`study._storage`, `trial._trial_id`, `study._study_id`), ask which trials' heartbeats went stale
(`RDBStorage._get_stale_trial_ids`, `storages._heartbeat.is_heartbeat_enabled`), or read a GridSampler's
shuffled grid (`_all_grids`, `_param_names`, `_search_space`, `_get_unvisited_grid_ids`). Nothing else in
loralab touches a `_name` of Optuna: each use goes through a function here, and
tests/sweep/test_optuna_internals.py checks each against the installed Optuna, so an upgrade that moves
one fails that test, not a user's sweep. Optuna itself is imported only when one is first called.
"""

from __future__ import annotations

import functools
from typing import Any

# Keep in step with pyproject.toml's `optuna` requirement; widen only after the internals test passes
# on the new version.
SUPPORTED = ">=4.0,<6"
LOWEST, BELOW = (4, 0), (6, 0)

# RDBStorage's private methods that loralab calls, so a retrying storage wraps them too (sweep.study).
RETRIED_PRIVATE_METHODS = ("_get_stale_trial_ids",)


def version_problem(version: str) -> str | None:
    """Why an Optuna version is outside SUPPORTED, or None when it is inside."""
    try:
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        return f"optuna {version} is not a version loralab can read (it supports optuna{SUPPORTED})"
    if LOWEST <= parts < BELOW:
        return None
    return f"optuna {version} is installed, and loralab supports optuna{SUPPORTED}"


@functools.cache
def checked() -> Any:
    """The optuna module, once its version was found inside SUPPORTED; else one clear error."""
    import optuna

    from loralab.errors import LoralabError, Problem

    why = version_problem(optuna.__version__)
    if why is not None:
        raise LoralabError(why + ": loralab uses Optuna internals that another version may lack",
                           [Problem("optuna", "unsupported version", optuna.__version__,
                                    f"pip install 'optuna{SUPPORTED}'")])
    return optuna


def storage(study) -> Any:
    """A study's storage (optuna.storages.BaseStorage)."""
    checked()
    return study._storage


def study_id(study) -> int:
    checked()
    return study._study_id


def trial_id(trial) -> int:
    """The storage's id of a trial (optuna.Trial or FrozenTrial); `trial.number` counts within its study."""
    checked()
    return trial._trial_id


def set_trial_attr(study, trial, key: str, value: Any, *, system: bool = False) -> None:
    """Write a trial's user (or system) attribute through the storage: `optuna.Trial(study, id)` would run
    the sampler's before_trial first, which a grid trial must not (it would take a grid point)."""
    store = storage(study)
    (store.set_trial_system_attr if system else store.set_trial_user_attr)(trial_id(trial), key, value)


def stored_trial(study, trial):
    """The trial as stored now (FrozenTrial): its state may have been changed by another process."""
    return storage(study).get_trial(trial_id(trial))


def all_trials(study) -> list:
    """Every trial of the study read from the storage without a copy and without the study's cache."""
    return storage(study).get_all_trials(study_id(study), deepcopy=False)


def heartbeat_enabled(storage_) -> bool:
    checked()
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage_)


def stale_trial_ids(study) -> set[int]:
    """Ids of RUNNING trials whose heartbeat is older than the grace period (Optuna's own test, as its
    fail_stale_trials uses); empty on a storage without heartbeat (a local SQLite file)."""
    store = storage(study)
    return set(store._get_stale_trial_ids(study_id(study))) if heartbeat_enabled(store) else set()


def grid_points(sampler) -> list[tuple]:
    """A GridSampler's points in its (seeded, shuffled) order: point k is what trial k gets."""
    checked()
    return sampler._all_grids


def grid_param_names(sampler) -> list[str]:
    """The parameter names, in the order of each grid point's values."""
    checked()
    return sampler._param_names


def grid_search_space(sampler) -> dict:
    """The search space as the sampler stores it in a trial's `search_space` system attribute."""
    checked()
    return sampler._search_space


def unvisited_grid_ids(sampler, study) -> list[int]:
    checked()
    return sampler._get_unvisited_grid_ids(study)


def worker_alive(trial, stale: set[int]) -> bool:
    """Whether a RUNNING trial's worker still works on it: its heartbeat (database server) is not among
    `stale` (stale_trial_ids), and, when it runs on this host, its process exists (known at once, without
    waiting for the grace period). The one test of a dead worker: the sweep's recovery and doctor use it."""
    from loralab.workspace.locks import process_alive

    return trial_id(trial) not in stale and process_alive(trial.user_attrs.get("owner"))
