"""A sweep's pruner as a training step hook: at its decision steps it measures the held-out loss,
reports it to the Optuna trial, and stops training when Optuna says the trial is clearly worse.

Built from plain data (execute.Pruning: the study's storage, its name, the trial number), so a job
that prunes can be pickled and run by any executor."""

from __future__ import annotations

from typing import Callable

from loralab.execute.jobs import Pruning
from loralab.config.schema import PrunerSpec


def decision_steps(pruner: PrunerSpec, planned: int) -> list[int]:
    """The steps where the pruner can decide, so the held-out loss is measured only there.

    Successive halving and Hyperband judge a trial only at their rungs, `every` x reduction_factor^k
    steps (Optuna's rungs with min_resource = `every`); a loss measured between rungs would be
    paid for and ignored. The median pruner decides at every report after its warm-up."""
    if pruner.name == "none":
        return []
    if pruner.name in ("successive_halving", "hyperband"):
        out, step = [], pruner.every
        while step < planned:
            out.append(step)
            step *= pruner.resolved_reduction_factor
        return out
    return [s for s in range(pruner.every, planned, pruner.every) if s >= pruner.warmup_steps]


def rung_examples(pruner: PrunerSpec, step: int, n_eval: int) -> int:
    """How many eval examples (the first ones) the loss at decision step `step` is measured on.

    `eval_examples` is the first rung's. Successive halving and Hyperband judge reduction_factor times
    fewer trials at each later rung, so each later rung measures reduction_factor times more examples
    (the whole eval set at most): every rung costs about as much evaluation as the first, and the close
    calls between the few trials left are made on many examples, not on the handful that was enough to
    tell the learning rates of the first rung apart. Every trial at a step is measured on the same ones."""
    first = min(pruner.eval_examples or n_eval, n_eval)
    if pruner.name not in ("successive_halving", "hyperband") or first >= n_eval:
        return first
    n, at = first, pruner.every
    while at < step:
        at *= pruner.resolved_reduction_factor
        n *= pruner.resolved_reduction_factor
    return min(n, n_eval)


class PruningHook:
    """A training step hook (train.StepHook): at each decision step the held-out loss goes to
    `report(loss, step)`, which answers whether to stop (Optuna: trial.report then trial.should_prune).

    It remembers what it measured, so a pruned run stores the loss it was judged on instead of
    paying for another evaluation."""

    def __init__(self, prepared, pruner: PrunerSpec, report: Callable[[float, int], bool], planned: int):
        self.prepared, self.report, self.pruner = prepared, report, pruner
        self.steps = set(decision_steps(pruner, planned))
        self.measured: dict[int, float] = {}

    def examples_at(self, step: int) -> list:
        return self.prepared.eval_encoded[: rung_examples(self.pruner, step, len(self.prepared.eval_encoded))]

    def after_step(self, step) -> str | None:
        from loralab.engine.train import eval_loss

        if step.step not in self.steps or step.step >= step.total:  # the last step is judged by the objective
            return None
        loss = eval_loss(step.model, self.examples_at(step.step), pad_id=self.prepared.base.tokenizer.pad_token_id)
        self.measured[step.step] = loss
        return f"pruned at step {step.step}" if self.report(loss, step.step) else None

    def rungs(self) -> dict:
        """Every loss measured at a decision step ({"step": loss}, JSON's string keys), this attempt's and
        those of the attempts it continues, and the eval examples they cover: stored with the run, so a
        later study (sweep.warm) ranks new trials at a rung against it."""
        return {"rung_losses": {str(k): v for k, v in sorted(self.measured.items())},
                "rung_loss_examples": {str(k): len(self.examples_at(k)) for k in sorted(self.measured)}} if self.measured else {}

    def loss_at(self, step: int) -> tuple[float, int, bool] | None:
        """(loss, eval examples it covers, whether that is the whole eval set) measured at `step`."""
        if step not in self.measured:
            return None
        n = len(self.examples_at(step))
        return self.measured[step], n, n == len(self.prepared.eval_encoded)


class PauseHook(PruningHook):
    """Synchronous successive halving's pause (sweep.halving): measure the held-out loss at the rungs up
    to `pause_at`, and stop there keeping the trainer's whole state (`state`), which the runner saves as
    the run's checkpoint: the sweep then continues the run from that step, or drops it, once every trial
    of the rung has been measured."""

    def __init__(self, prepared, pruner: PrunerSpec, pause_at: int):
        super().__init__(prepared, pruner, lambda loss, step: step >= pause_at, planned=pause_at + 1)
        self.steps.add(pause_at)
        self.state: dict | None = None

    def after_step(self, step) -> str | None:
        reason = super().after_step(step)
        if reason is not None:
            self.state = step.trainer.state_dict() if step.trainer is not None else None
            if self.state is not None:  # the rungs it passed go with it, for the run stored at its end
                self.state["rungs"] = self.rungs()
            return f"paused at step {step.step}"
        return None


def make_pruner(spec: PrunerSpec):
    """The Optuna pruner of a sweep's `pruner:` section."""
    import optuna

    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_steps)
    if spec.name == "successive_halving":  # the resource is training steps; the first rung at `every`
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.every,
                                                      reduction_factor=spec.resolved_reduction_factor)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.every, reduction_factor=spec.resolved_reduction_factor)
    return optuna.pruners.NopPruner()


def optuna_reporter(ref: Pruning, spec: PrunerSpec) -> Callable[[float, int], bool]:
    """report(loss, step) -> prune? for the trial `ref` names: Optuna's trial.report, then should_prune
    with the sweep's pruner (`spec`)."""
    import optuna

    storage = optuna.storages.get_storage(ref.storage)
    study = optuna.load_study(study_name=ref.study, storage=storage, pruner=make_pruner(spec))
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(ref.study), ref.trial)
    trial = optuna.trial.Trial(study, trial_id)

    def report(loss: float, step: int) -> bool:
        try:
            trial.report(ref.sign * loss, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker took this trial for dead (its heartbeat stalled past the grace period) and queued
            # its configuration again: train on, so the run is stored once and the retry finds it.
            return False
        return trial.should_prune()

    return report
