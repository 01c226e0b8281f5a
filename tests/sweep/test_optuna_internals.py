"""Each Optuna internal that loralab.sweep._optuna relies on exists and behaves as assumed in the
installed Optuna: an Optuna upgrade that moves one fails here, not in a user's sweep."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from loralab.errors import LoralabError
from loralab.sweep import _optuna
from loralab.workspace.locks import process_identity

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_installed_optuna_is_in_the_supported_range_and_pyproject_says_the_same_range():
    assert _optuna.version_problem(optuna.__version__) is None
    assert _optuna.checked() is optuna
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if re.match(r"optuna\b", d)] == ["optuna" + _optuna.SUPPORTED]


@pytest.mark.parametrize(("version", "inside"), [("4.0.0", True), ("5.1.0", True), ("5.9.0.dev0", True),
                                                  ("3.6.1", False), ("6.0.0", False), ("10.0", False), ("x.y", False)])
def test_versions_outside_the_range_are_named(version, inside):
    why = _optuna.version_problem(version)
    assert (why is None) == inside
    if not inside:
        assert version in why and _optuna.SUPPORTED in why


def test_an_unsupported_optuna_is_refused_at_first_use_with_the_fix(monkeypatch):
    _optuna.checked.cache_clear()
    monkeypatch.setattr(optuna, "__version__", "6.0.0")
    try:
        with pytest.raises(LoralabError, match=r"optuna 6\.0\.0 is installed.*supports optuna>=4\.0,<6") as err:
            _optuna.trial_id(object())
        assert err.value.problems[0].fix == "pip install 'optuna>=4.0,<6'"
    finally:
        _optuna.checked.cache_clear()


def test_study_storage_ids_and_attributes_written_through_the_storage():
    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    assert isinstance(_optuna.storage(study), optuna.storages.BaseStorage)
    assert _optuna.study_id(study) == _optuna.storage(study).get_study_id_from_name(study.study_name)
    # The storage id of a Trial and of its FrozenTrial is the same, and it is not the trial's number
    ids = {_optuna.trial_id(t) for t in (first, second)}
    assert len(ids) == 2 and {_optuna.trial_id(t) for t in study.get_trials(deepcopy=False)} == ids
    _optuna.set_trial_attr(study, second, "status", "interrupted")
    _optuna.set_trial_attr(study, second, "grid_id", 3, system=True)
    study.tell(first, 1.0)
    stored = _optuna.stored_trial(study, second)
    assert stored.number == 1 and stored.user_attrs == {"status": "interrupted"} and stored.system_attrs["grid_id"] == 3
    assert _optuna.stored_trial(study, first).state == TrialState.COMPLETE
    assert [t.number for t in _optuna.all_trials(study)] == [0, 1]


def test_stale_trials_are_those_whose_heartbeat_is_older_than_the_grace_period(tmp_path):
    plain = optuna.create_study(storage=f"sqlite:///{tmp_path / 'plain.db'}")
    plain.ask()
    assert not _optuna.heartbeat_enabled(_optuna.storage(plain)) and _optuna.stale_trial_ids(plain) == set()
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    beating, silent, done = study.ask(), study.ask(), study.ask()
    for t in (beating, silent, done):
        storage.record_heartbeat(_optuna.trial_id(t))
    study.tell(done, 0.5)
    assert _optuna.heartbeat_enabled(storage) and _optuna.stale_trial_ids(study) == set()
    time.sleep(2.1)  # past the grace period
    storage.record_heartbeat(_optuna.trial_id(beating))
    assert _optuna.stale_trial_ids(study) == {_optuna.trial_id(silent)}  # finished trials are never stale


def test_a_worker_is_alive_while_its_process_lives_and_its_heartbeat_is_not_stale():
    study = optuna.create_study()
    mine, gone = study.ask(), study.ask()
    mine.set_user_attr("owner", process_identity())
    gone.set_user_attr("owner", {**process_identity(), "started": 0.0})  # this pid, but another process
    mine_t, gone_t = study.get_trials(deepcopy=False)
    assert _optuna.worker_alive(mine_t, set()) and not _optuna.worker_alive(gone_t, set())
    assert not _optuna.worker_alive(mine_t, {_optuna.trial_id(mine_t)})


def test_a_grid_sampler_gives_trial_k_its_point_k_and_marks_trials_with_its_search_space():
    space = {"r": [4, 8, 16], "lr": [1e-4, 3e-4]}
    sampler = optuna.samplers.GridSampler(space, seed=7)
    points, names = _optuna.grid_points(sampler), _optuna.grid_param_names(sampler)
    assert sorted(names) == ["lr", "r"] and len(points) == 6
    assert sorted(dict(zip(names, p))["r"] for p in points) == [4, 4, 8, 8, 16, 16]
    study = optuna.create_study(sampler=sampler)
    assert sorted(_optuna.unvisited_grid_ids(sampler, study)) == list(range(6))
    for k in range(3):
        trial = study.ask()
        params = {n: trial.suggest_categorical(n, space[n]) for n in names}
        assert params == dict(zip(names, points[k]))
        frozen = _optuna.stored_trial(study, trial)
        assert frozen.system_attrs["grid_id"] == k
        assert frozen.system_attrs["search_space"] == _optuna.grid_search_space(sampler)
        study.tell(trial, 0.0)
    assert sorted(_optuna.unvisited_grid_ids(sampler, study)) == [3, 4, 5]


def test_every_private_storage_method_a_retrying_storage_wraps_exists():
    for name in _optuna.RETRIED_PRIVATE_METHODS:
        assert callable(getattr(optuna.storages.RDBStorage, name))
