"""What loralab knows of each metric it stores: its label and format, grouped as the comparison shows
them. Pure data (no torch, no pydantic), so the experiment schema can check metric names against it."""

from __future__ import annotations

# (metric key, label, format). Per-cap keys get "@cap" appended.
LOSS_ROWS = [("eval_loss", "eval loss", "f4"), ("eval_ppl", "eval perplexity", "f2"),
             ("train_eval_loss", "loss on training examples", "f4"),
             ("generalization_gap", "eval − train loss (overfitting)", "f4")]
QUALITY_CAP = [("rouge_l", "ROUGE-L", "f3"), ("chrf", "chrF", "f3"), ("token_f1", "token F1", "f3"),
               ("exact_match", "exact match", "pct")]
VERBOSITY_CAP = [("mean_tokens", "mean tokens", "f1"), ("median_tokens", "median tokens", "f1"),
                 ("p90_tokens", "p90 tokens", "f1"), ("length_ratio", "length / reference", "f2"),
                 ("cap_hit_rate", "hit the cap", "pct"), ("stop_rate", "stopped on its own", "pct"),
                 ("repeated_3gram", "repeated 3-grams", "pct"), ("distinct_2", "distinct 2-grams", "pct")]
DRIFT_ROWS = [("drift_kl", "KL from base (nats/token)", "f4"), ("drift_agreement", "same answer as base", "pct")]
STABILITY_ROWS = [("loss_spikes", "loss spikes", "f1"), ("grad_norm_median", "grad norm median", "f3"),
                  ("grad_norm_max", "grad norm max", "f3"), ("steps_to_90pct_drop", "steps to 90% of loss drop", "f1"),
                  ("loss_final", "final train loss", "f4"), ("final_minus_best", "final − best train loss", "f4"),
                  ("diverged_step", "diverged at step", "f0")]
COST_ROWS = [("train_s", "train time (s)", "f1"), ("eval_s", "eval time (s)", "f1"), ("total_s", "total time (s)", "f1"),
             ("tokens_per_s", "train tokens/s", "f1"), ("train_tokens", "train tokens", "int"),
             ("peak_mem_mb", "peak memory (MB)", "f0"), ("trainable_params", "trainable params", "int"),
             ("adapter_bytes", "adapter size (bytes)", "int"), ("cost", "cost", "money")]

# Per-example keys behind per-cap metrics (samples[i]["outputs"][cap]["metrics"][key]).
PER_EXAMPLE = {"rouge_l": "rouge_l", "chrf": "chrf", "token_f1": "token_f1", "exact_match": "exact_match",
               "mean_tokens": "tokens", "length_ratio": "length_ratio", "cap_hit_rate": "hit_cap",
               "stop_rate": "stopped", "repeated_3gram": "repeated_3gram", "distinct_2": "distinct_2"}


def metric_bases() -> set[str]:
    """Every metric key without its "@cap" (what `evaluation.min_effect` may name)."""
    return {key for rows in (LOSS_ROWS, QUALITY_CAP, VERBOSITY_CAP, DRIFT_ROWS, STABILITY_ROWS, COST_ROWS)
            for key, _, _ in rows}
