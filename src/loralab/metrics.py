"""Answer-quality numbers, as pure functions of plain strings and counts (no model, no I/O)."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

from rouge_score import rouge_scorer

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


def summarize_cap(
    predictions: list[str],
    references: list[str],
    n_tokens: list[int],
    stopped: list[bool],
    cap: int,
) -> dict[str, float]:
    """One token cap's scores over an eval set.

    cap_hit_rate is the share of answers cut off by the cap (reached it without emitting an end token):
    a high value means the scores measure truncated answers. With no examples, n is 0 and every other
    value is NaN.
    """
    n = len(predictions)
    if not (len(references) == len(n_tokens) == len(stopped) == n):
        raise ValueError(
            "summarize_cap needs one reference, token count and stop flag per prediction; got "
            f"{n} predictions, {len(references)} references, {len(n_tokens)} token counts, "
            f"{len(stopped)} stop flags"
        )
    return {
        "rouge_l": mean(rouge_l(p, r) for p, r in zip(predictions, references)),
        "exact_match": mean(exact_match(p, r) for p, r in zip(predictions, references)),
        "mean_tokens": mean(n_tokens),
        "cap_hit_rate": mean(1.0 if (k >= cap and not s) else 0.0 for k, s in zip(n_tokens, stopped)),
        "stop_rate": mean(1.0 if s else 0.0 for s in stopped),
        "n": n,
    }
