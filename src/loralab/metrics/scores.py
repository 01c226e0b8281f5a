"""Answer-quality numbers, as pure functions of plain strings and counts (no model, no I/O)."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, delete punctuation, collapse whitespace: so 'Paris.' and ' paris' count as the same answer.

    Punctuation is deleted, not replaced by a space (as in SQuAD's scorer): "don't" -> "dont".
    Articles are kept; dropping them is English-only and hides real differences in short answers.
    """
    kept = (ch for ch in text.lower() if not _is_punctuation(ch))
    return _SPACES.sub(" ", "".join(kept)).strip()


def _is_punctuation(ch: str) -> bool:
    # ASCII symbols such as + $ | are not Unicode "P*" punctuation but read as punctuation in answers.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answers agree after `normalize`, else 0.0; a float so it averages directly."""
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    """Built once: the scorer sets up a Porter stemmer, too slow to redo for every pair."""
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (LCS of stemmed words), as `rouge-score` computes it.

    rouge-score keeps only [a-z0-9] words, so a side with none of them (empty text, pure punctuation,
    non-Latin script) scores 0.0, even when both sides are empty.
    """
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


def mean(xs: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values, so 'nothing measured' is not mistaken for a score of 0."""
    values = [float(x) for x in xs]
    if not values:
        return math.nan
    return math.fsum(values) / len(values)


@lru_cache(maxsize=1)
def _chrf_metric() -> CHRF:
    """Built once: `sacrebleu.sentence_chrf` builds a new CHRF object for every pair."""
    return CHRF()


def chrf(prediction: str, reference: str) -> float:
    """chrF (character n-grams 1-6, beta 2, whitespace ignored) on a 0-1 scale like the other scores.

    Partial credit for near-misses in spelling and inflection, which word overlap scores as wrong.
    sacrebleu's choice: an empty side scores 0.0, even when both sides are empty.
    """
    return float(_chrf_metric().sentence_score(prediction, [reference]).score) / 100.0


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style word F1 after `normalize`: credit for a partly right short answer, order ignored.

    Overlap counts repeated words at most as often as they occur on both sides (multiset).
    Both empty: 1.0, the two agree (as exact_match says); one empty: 0.0.
    """
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def perplexity(loss: float) -> float:
    """exp(mean token loss), the scale people quote; inf instead of an OverflowError for a diverged loss."""
    try:
        return math.exp(loss)  # nan stays nan, inf stays inf
    except OverflowError:
        return math.inf


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got {n}")
    seq = list(tokens)
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repeated_ngram_rate(tokens: Sequence[Hashable], n: int = 3) -> float:
    """Share of the n-grams that already occurred earlier in the same answer: high for looping output.

    No n-grams (fewer than n tokens): 0.0, nothing was repeated. Equals 1 - distinct_n(tokens, n).
    """
    grams = _ngrams(tokens, n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def distinct_n(tokens: Sequence[Hashable], n: int = 2) -> float:
    """Unique n-grams / all n-grams: low for repetitive output.

    No n-grams: 1.0 (nothing repeated) rather than NaN, so per-example means need no NaN handling and
    it stays the complement of repeated_ngram_rate; short answers show up in the token counts instead.
    """
    grams = _ngrams(tokens, n)
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def example_metrics(
    prediction: str,
    reference: str,
    tokens: Sequence[int],
    reference_tokens: int,
    stopped: bool,
    cap: int,
) -> dict[str, float]:
    """Every per-answer number for one eval example at one max_new_tokens cap, so length and looping
    ("longer answers, sometimes drifting") are measured next to quality.

    hit_cap marks an answer cut off by the cap (reached it without an end token). length_ratio is NaN
    when the reference has no tokens: no length to compare against.
    """
    n_tokens = len(tokens)
    return {
        "rouge_l": rouge_l(prediction, reference),
        "chrf": chrf(prediction, reference),
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "tokens": float(n_tokens),
        "length_ratio": n_tokens / reference_tokens if reference_tokens else math.nan,
        "hit_cap": 1.0 if (n_tokens >= cap and not stopped) else 0.0,
        "stopped": 1.0 if stopped else 0.0,
        "repeated_3gram": repeated_ngram_rate(tokens, 3),
        "distinct_2": distinct_n(tokens, 2),
    }


_MEAN_KEYS = ("rouge_l", "chrf", "exact_match", "token_f1")
_SUMMARY_KEYS = (*_MEAN_KEYS, "mean_tokens", "median_tokens", "p90_tokens", "length_ratio",
                 "cap_hit_rate", "stop_rate", "repeated_3gram", "distinct_2")


def summarize_examples(rows: list[dict[str, float]]) -> dict[str, float]:
    """One cap's numbers over an eval set, from `example_metrics` rows.

    Token counts get median and 90th percentile (numpy's linear interpolation) besides the mean, since a
    few runaway answers move the mean alone. length_ratio skips NaN (references without tokens); the
    other means keep NaN, which would mean a bug upstream. No rows: n is 0 and every other value NaN.
    """
    if not rows:
        return {**{k: math.nan for k in _SUMMARY_KEYS}, "n": 0}
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    ratios = [r["length_ratio"] for r in rows if not math.isnan(r["length_ratio"])]
    return {
        **{k: mean(r[k] for r in rows) for k in _MEAN_KEYS},
        "mean_tokens": float(tokens.mean()),
        "median_tokens": float(np.median(tokens)),
        "p90_tokens": float(np.percentile(tokens, 90)),
        "length_ratio": mean(ratios),
        "cap_hit_rate": mean(r["hit_cap"] for r in rows),
        "stop_rate": mean(r["stopped"] for r in rows),
        "repeated_3gram": mean(r["repeated_3gram"] for r in rows),
        "distinct_2": mean(r["distinct_2"] for r in rows),
        "n": len(rows),
    }
