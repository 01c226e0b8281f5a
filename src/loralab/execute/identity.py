"""What a run is: its adapter id and run id, hashes of the settings that make it, so a stored run is found
by the settings that would make it again, and the config, model and data descriptions stored with it."""

from __future__ import annotations

from typing import Any

from loralab.config.schema import ANALYSIS_ONLY, RunSpec, config_hash
from loralab.execute.prepare import Prepared


def adapter_id(prepared: Prepared, run: RunSpec) -> str:
    """What the run's adapter is: the same function of its settings that its stored row gets
    (store.adapter_identity), so a stored adapter is found by the settings that would train it."""
    from loralab.workspace.store import adapter_identity

    return adapter_identity(_run_config(prepared, run), *_describe(prepared))


def run_id(prepared: Prepared, run: RunSpec | None, full_eval: bool = True, probe: bool = True) -> str:
    """One stored run: an adapter (adapter_id) evaluated one way (caps, evaluation and generation
    settings). Adding a cap or changing generate.batch_size makes new run ids of the same adapters,
    which are evaluated again, not retrained (train_run).

    A loss-only evaluation (a sweep trial that needs no generation) is a different run, so a later
    `loralab run` of the same settings does not reuse it without its generation metrics."""
    evaluation = prepared.exp.evaluation.model_dump(exclude=ANALYSIS_ONLY)
    if not full_eval:
        evaluation["loss_only"] = True
    if not probe:  # no training-probe loss (nor generalization gap) either
        evaluation["train_probe"] = False
    how = {"eval_caps": prepared.exp.eval_caps, "eval_max_len": prepared.eval_max_len, "evaluation": evaluation}
    groups = [ex.group for ex in prepared.dataset.eval]
    if any(g is not None for g in groups):  # data.group_field: samples stored without the groups are evaluated anew
        how["eval_groups"] = config_hash(groups)
    if run is None:  # the untrained model: what it is and how it is evaluated
        what = {"model": prepared.base.fingerprint, "data": prepared.dataset.fingerprint, "system_prompt": prepared.dataset.system_prompt,
                "device": str(prepared.base.device).split(":")[0], "dtype": prepared.base.info["dtype"]}
        return "base-" + config_hash({"kind": "base", **what, **how})
    return config_hash({"adapter": adapter_id(prepared, run), **how, "generate": run.generate.model_dump()})


def _describe(prepared: Prepared) -> tuple[dict, dict]:
    b, d = prepared.base, prepared.dataset
    model = {"name": b.name, "path": b.path, "fingerprint": b.fingerprint, "arch": b.arch, **b.info}
    data = {"name": d.name, "fingerprint": d.fingerprint, "n_train": len(d.train), "n_eval": len(d.eval),
            "system_prompt": d.system_prompt}
    return model, data


def _run_config(prepared: Prepared, run: RunSpec | None) -> dict:
    cfg: dict[str, Any] = {"eval_caps": prepared.exp.eval_caps, "device": str(prepared.base.device), "dtype": prepared.base.info["dtype"],
                           "evaluation": prepared.exp.evaluation.model_dump(),
                           "cost": prepared.exp.cost.model_dump() if prepared.exp.cost else None}
    if run is not None:
        cfg.update({"lora": run.lora.model_dump(), "train": run.train.model_dump(),
                    "generate": run.generate.model_dump(), "resolved_target_modules": prepared.targets_for(run)})
    return cfg
