"""One table of every metric loralab stores: its label and format, the group the comparison shows it
in, which way is better, whether it is measured at each eval cap, and the stage that produces it.
Comparison, findings, sweep objectives and "does this objective need generation" all read it.

Pure data (no torch, no pydantic), so the experiment schema can check metric names against it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The stages of one run, in order: what must run for a metric to exist.
STAGES = ("training", "loss", "generation", "drift", "cost")


@dataclass(frozen=True)
class Metric:
    key: str  # as stored; a per-cap metric is stored as "key@cap"
    label: str
    fmt: str  # f0..f4 (decimals), pct (a share shown in percent), int, money
    group: str  # the comparison's section: quality, verbosity, drift, stability, cost ("" = not shown)
    better: str | None  # "higher", "lower", or None when neither way is better
    stage: str  # one of STAGES
    per_cap: bool = False
    per_example: str | None = None  # the per-example field behind it (samples[i]["outputs"][cap]["metrics"])


def _m(key, label, fmt, group, better, stage, per_cap=False, per_example=None) -> Metric:
    return Metric(key, label, fmt, group, better, stage, per_cap, per_example)


METRICS: tuple[Metric, ...] = (
    # quality: held-out and training-probe losses (teacher forcing), then per-cap answer quality
    _m("eval_loss", "eval loss", "f4", "quality", "lower", "loss"),
    _m("eval_ppl", "eval perplexity", "f2", "quality", "lower", "loss"),
    _m("train_eval_loss", "loss on training examples", "f4", "quality", "lower", "loss"),
    _m("generalization_gap", "eval − train loss (overfitting)", "f4", "quality", "lower", "loss"),
    _m("rouge_l", "ROUGE-L", "f3", "quality", "higher", "generation", True, "rouge_l"),
    _m("chrf", "chrF", "f3", "quality", "higher", "generation", True, "chrf"),
    _m("token_f1", "token F1", "f3", "quality", "higher", "generation", True, "token_f1"),
    _m("exact_match", "exact match", "pct", "quality", "higher", "generation", True, "exact_match"),
    # verbosity: neither way is better in general (a task decides)
    _m("mean_tokens", "mean tokens", "f1", "verbosity", None, "generation", True, "tokens"),
    _m("median_tokens", "median tokens", "f1", "verbosity", None, "generation", True),
    _m("p90_tokens", "p90 tokens", "f1", "verbosity", None, "generation", True),
    _m("length_ratio", "length / reference", "f2", "verbosity", None, "generation", True, "length_ratio"),
    _m("cap_hit_rate", "hit the cap", "pct", "verbosity", None, "generation", True, "hit_cap"),
    _m("stop_rate", "stopped on its own", "pct", "verbosity", "higher", "generation", True, "stopped"),
    _m("repeated_3gram", "repeated 3-grams", "pct", "verbosity", "lower", "generation", True, "repeated_3gram"),
    _m("distinct_2", "distinct 2-grams", "pct", "verbosity", "higher", "generation", True, "distinct_2"),
    # drift on general prompts: what a task adapter should not cause
    _m("drift_kl", "KL from base (nats/token)", "f4", "drift", "lower", "drift"),
    _m("drift_agreement", "same answer as base", "pct", "drift", "higher", "drift"),
    # stability of the training curve
    _m("loss_spikes", "loss spikes", "f1", "stability", "lower", "training"),
    _m("grad_norm_median", "grad norm median", "f3", "stability", None, "training"),
    _m("grad_norm_max", "grad norm max", "f3", "stability", "lower", "training"),
    _m("steps_to_90pct_drop", "steps to 90% of loss drop", "f1", "stability", "lower", "training"),
    _m("loss_final", "final train loss", "f4", "stability", "lower", "training"),
    _m("final_minus_best", "final − best train loss", "f4", "stability", "lower", "training"),
    _m("diverged_step", "diverged at step", "f0", "stability", None, "training"),
    # cost
    _m("train_s", "train time (s)", "f1", "cost", "lower", "training"),
    # PiSSA's SVD, OLoRA's QR, EVA's data pass, LoftQ's fit: part of training, carried with the adapter
    _m("init_s", "init time (s)", "f1", "cost", "lower", "training"),
    _m("eval_s", "eval time (s)", "f1", "cost", "lower", "cost"),
    _m("total_s", "total time (s)", "f1", "cost", "lower", "cost"),
    _m("tokens_per_s", "train tokens/s", "f1", "cost", "higher", "training"),
    _m("train_tokens", "train tokens", "int", "cost", None, "training"),
    _m("peak_mem_mb", "peak memory (MB)", "f0", "cost", "lower", "training"),
    _m("trainable_params", "trainable params", "int", "cost", None, "training"),
    _m("adapter_bytes", "adapter size (bytes)", "int", "cost", "lower", "cost"),
    _m("cost", "cost", "money", "cost", "lower", "cost"),
    # stored for the record and for the sweep, not rows of the comparison
    _m("train_ppl", "perplexity on training examples", "f2", "", "lower", "loss"),
    _m("eval_tokens", "eval tokens", "int", "", None, "cost"),
    _m("train_loss_final", "last step's train loss", "f4", "", "lower", "training"),
    _m("loss_first", "first train loss", "f4", "", None, "training"),
    _m("loss_best", "best train loss", "f4", "", "lower", "training"),
    _m("steps", "steps trained", "int", "", None, "training"),
    _m("planned_steps", "steps planned", "int", "", None, "training"),
    _m("total_params", "model parameters", "int", "", None, "training"),
    _m("padding_share", "padding share of a batch", "pct", "", "lower", "training"),
    _m("last_good_loss", "last finite loss before divergence", "f4", "", None, "training"),
    _m("pruned_step", "pruned at step", "f0", "", None, "training"),
    _m("pruned_loss", "loss the pruner judged", "f4", "", "lower", "loss"),
    _m("pruned_loss_examples", "eval examples the pruner judged on", "int", "", None, "loss"),
    _m("saved_steps", "steps not trained (stopped early)", "int", "", None, "training"),
    _m("saved_s", "seconds saved by stopping early", "f1", "", None, "training"),
)
BY_KEY = {m.key: m for m in METRICS}
GROUPS = ("quality", "verbosity", "drift", "stability", "cost")


def metric(key: str) -> Metric | None:
    """The row of a stored key ("rouge_l@50" reads rouge_l's row); None for an unknown key."""
    return BY_KEY.get(key.partition("@")[0])


def rows(group: str, per_cap: bool) -> list[tuple[str, str, str]]:
    """(key, label, format) of a comparison section, per-cap metrics apart (they repeat at each cap)."""
    return [(m.key, m.label, m.fmt) for m in METRICS if m.group == group and m.per_cap == per_cap]


def metric_bases() -> set[str]:
    """Every metric key without its "@cap" (what `evaluation.min_effect` may name)."""
    return set(BY_KEY)


def better_of(key: str) -> str | None:
    m = metric(key)
    return m.better if m else None


# The comparison's sections, as (key, label, format) lists.
LOSS_ROWS = rows("quality", False)
QUALITY_CAP = rows("quality", True)
VERBOSITY_CAP = rows("verbosity", True)
DRIFT_ROWS = rows("drift", False)
STABILITY_ROWS = rows("stability", False)
COST_ROWS = rows("cost", False)
# Per-example keys behind per-cap metrics (samples[i]["outputs"][cap]["metrics"][key]).
PER_EXAMPLE = {m.key: m.per_example for m in METRICS if m.per_example}
