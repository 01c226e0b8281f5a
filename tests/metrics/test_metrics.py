"""Metric values checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from loralab.metrics.scores import (
    chrf,
    distinct_n,
    exact_match,
    example_metrics,
    mean,
    normalize,
    perplexity,
    repeated_ngram_rate,
    rouge_l,
    summarize_examples,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The  Cat, sat!  ", "the cat sat"),
        ("Don't stop.", "dont stop"),  # deleted, not replaced by a space
        ("«Paris»", "paris"),  # Unicode punctuation too
        ("a\tb\n\nc", "a b c"),
        ("x + y = 3", "x y 3"),  # ASCII symbols count as punctuation; '=' too
        ("The answer", "the answer"),  # articles are kept
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_match_ignores_case_punctuation_and_spacing_only():
    assert exact_match("Paris.", " paris") == 1.0
    assert exact_match("The cat", "cat") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "Paris") == 0.0


def test_rouge_l_of_identical_texts_is_one():
    assert rouge_l("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(1.0)


def test_rouge_l_of_empty_output_is_zero():
    assert rouge_l("", "The cat sat on the mat.") == 0.0
    assert rouge_l("!!!", "The cat sat on the mat.") == 0.0  # no words left after tokenizing
    assert rouge_l("", "") == 0.0  # rouge-score's choice; exact_match says 1.0 here


def test_rouge_l_partial_overlap_is_lcs_f1():
    # LCS("the cat sat", "the black cat sat down quietly") = the cat sat = 3 words.
    # P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat sat", "the black cat sat down quietly") == pytest.approx(2 / 3)
    # Same words, wrong order: LCS is 1 word of 3, so P = R = F = 1/3 (a bag of words would give 1).
    assert rouge_l("sat cat the", "the cat sat") == pytest.approx(1 / 3)


def test_rouge_l_stems_words():
    assert rouge_l("running dogs", "run dog") == pytest.approx(1.0)


def test_mean():
    assert mean([1, 2, 4]) == pytest.approx(7 / 3)
    assert mean(x for x in [0.5]) == 0.5
    assert math.isnan(mean([]))


# --- chrF -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The cat sat.", "The cat sat.", 1.0),
        ("abc", "xyz", 0.0),  # no character in common
        ("a b", "ab", 1.0),  # whitespace is ignored
        ("", "abc", 0.0),
        ("", "", 0.0),  # sacrebleu's choice for empty sides
        # "ab" vs "abc": only char orders 1 and 2 exist on both sides.
        # order 1: P = 2/2, R = 2/3; order 2: P = 1/1 ("ab"), R = 1/2 ("ab","bc").
        # avg P = 1, avg R = 7/12; F(beta=2) = 5PR / (4P + R) = (35/12) / (55/12) = 7/11.
        ("ab", "abc", 7 / 11),
        # "yesyesyesyes" vs "yes": orders 1-3 exist on both sides, R = 1 at each;
        # P = 3/12, 2/11, 1/10 -> avg 39/220; F = 5P / (4P + 1) = 195/376.
        ("yes yes yes yes", "yes", 195 / 376),
    ],
)
def test_chrf_by_hand(prediction, reference, expected):
    assert chrf(prediction, reference) == pytest.approx(expected)


# --- token F1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "the cat", 0.8),  # P = 2/3, R = 1 -> 2PR/(P+R) = 4/5
        ("The Cat!", "the cat", 1.0),  # compared after normalize
        ("sat cat the", "the cat sat", 1.0),  # order ignored (unlike ROUGE-L's 1/3)
        ("dog", "the cat", 0.0),
        ("", "", 1.0),
        ("...", "", 1.0),  # nothing left on either side after normalize
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        # multiset: "the the the" vs "the cat": overlap min(3,1) = 1 -> P = 1/3, R = 1/2, F = 2/5
        ("the the the", "the cat", 0.4),
        # overlap 2 ("a" twice): P = 2/3, R = 2/4 -> F = 2*(1/3)/(7/6) = 4/7
        ("a a b", "a a c d", 4 / 7),
    ],
)
def test_token_f1_by_hand(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


# --- perplexity -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "expected"),
    [(0.0, 1.0), (math.log(2), 2.0), (math.log(50257), 50257.0), (1000.0, math.inf), (math.inf, math.inf),
     (-math.inf, 0.0)],
)
def test_perplexity(loss, expected):
    assert perplexity(loss) == pytest.approx(expected)


def test_perplexity_of_nan_is_nan():
    assert math.isnan(perplexity(math.nan))


# --- repetition -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "n", "repeated", "distinct"),
    [
        # trigrams (1,2,3) (2,3,1) (3,1,2) (1,2,3): 4, the last seen before -> 1/4 repeated, 3/4 distinct
        ([1, 2, 3, 1, 2, 3], 3, 1 / 4, 3 / 4),
        # bigrams (1,2) (2,3) (3,1) (1,2) (2,3): 5, 3 unique -> 2/5 repeated, 3/5 distinct
        ([1, 2, 3, 1, 2, 3], 2, 2 / 5, 3 / 5),
        ([7, 7, 7, 7], 1, 3 / 4, 1 / 4),  # unigrams: 4 tokens, 1 unique
        ([7, 7, 7, 7, 7], 3, 2 / 3, 1 / 3),  # (7,7,7) three times
        ([1, 2, 3, 4], 3, 0.0, 1.0),
        ([1, 2, 3], 3, 0.0, 1.0),  # exactly one n-gram
        ([1, 2], 3, 0.0, 1.0),  # no n-grams: nothing repeated
        ([], 2, 0.0, 1.0),
        (["a", "b", "a", "b"], 2, 1 / 3, 2 / 3),  # any hashable tokens: ab ba ab
    ],
)
def test_repetition_by_hand(tokens, n, repeated, distinct):
    assert repeated_ngram_rate(tokens, n) == pytest.approx(repeated)
    assert distinct_n(tokens, n) == pytest.approx(distinct)


def test_repetition_defaults_are_trigram_rate_and_distinct_bigrams():
    tokens = [1, 2, 3, 1, 2, 3]
    assert repeated_ngram_rate(tokens) == pytest.approx(1 / 4)
    assert distinct_n(tokens) == pytest.approx(3 / 5)


@pytest.mark.parametrize("fn", [repeated_ngram_rate, distinct_n])
def test_repetition_rejects_n_below_one(fn):
    with pytest.raises(ValueError, match="at least 1"):
        fn([1, 2, 3], 0)


# --- example_metrics --------------------------------------------------------------------------------

_EXAMPLE_KEYS = {"rouge_l", "chrf", "exact_match", "token_f1", "tokens", "length_ratio", "hit_cap", "stopped",
                 "repeated_3gram", "distinct_2"}


def test_example_metrics_answer_equal_to_reference():
    row = example_metrics("Paris is big.", "Paris is big.", tokens=[5, 6, 7, 8], reference_tokens=4,
                          stopped=True, cap=16)
    assert row == {
        "rouge_l": pytest.approx(1.0), "chrf": pytest.approx(1.0), "exact_match": 1.0, "token_f1": 1.0,
        "tokens": 4.0, "length_ratio": 1.0, "hit_cap": 0.0, "stopped": 1.0,
        "repeated_3gram": 0.0, "distinct_2": 1.0,
    }


def test_example_metrics_empty_answer():
    row = example_metrics("", "Paris", tokens=[], reference_tokens=2, stopped=True, cap=16)
    assert row == {
        "rouge_l": 0.0, "chrf": 0.0, "exact_match": 0.0, "token_f1": 0.0,
        "tokens": 0.0, "length_ratio": 0.0, "hit_cap": 0.0, "stopped": 1.0,
        "repeated_3gram": 0.0, "distinct_2": 1.0,
    }


def test_example_metrics_looping_answer_cut_off_at_the_cap():
    # Never emitted an end token: 8 tokens at cap 8, looping over 1 2 3.
    row = example_metrics("yes yes yes yes", "yes", tokens=[1, 2, 3, 1, 2, 3, 1, 2], reference_tokens=2,
                          stopped=False, cap=8)
    assert row == {
        "rouge_l": pytest.approx(0.4),  # LCS 1 word: P = 1/4, R = 1
        "chrf": pytest.approx(195 / 376),  # see test_chrf_by_hand
        "exact_match": 0.0,
        "token_f1": pytest.approx(0.4),  # overlap min(4, 1) = 1: P = 1/4, R = 1
        "tokens": 8.0,
        "length_ratio": 4.0,  # 8 / 2
        "hit_cap": 1.0,
        "stopped": 0.0,
        "repeated_3gram": pytest.approx(3 / 6),  # 6 trigrams, the last 3 repeat the first 3
        "distinct_2": pytest.approx(3 / 7),  # 7 bigrams, 3 unique
    }


@pytest.mark.parametrize(
    ("n_tokens", "stopped", "cap", "hit"),
    [
        (8, False, 8, 1.0),
        (8, True, 8, 0.0),  # ended with an end token exactly at the cap: not cut off
        (7, False, 8, 0.0),  # stopped for another reason (e.g. a stop string) before the cap
        (9, False, 8, 1.0),
    ],
)
def test_example_metrics_hit_cap(n_tokens, stopped, cap, hit):
    row = example_metrics("a", "a", tokens=list(range(n_tokens)), reference_tokens=1, stopped=stopped, cap=cap)
    assert row["hit_cap"] == hit
    assert row["stopped"] == (1.0 if stopped else 0.0)


def test_example_metrics_length_ratio_is_nan_without_reference_tokens():
    row = example_metrics("a", "", tokens=[1], reference_tokens=0, stopped=True, cap=8)
    assert set(row) == _EXAMPLE_KEYS
    assert math.isnan(row["length_ratio"])


# --- summarize_examples -----------------------------------------------------------------------------


def _row(**overrides):
    row = dict.fromkeys(_EXAMPLE_KEYS, 0.0)
    row.update(overrides)
    return row


def test_summarize_examples_by_hand():
    rows = [
        _row(rouge_l=1.0, chrf=1.0, exact_match=1.0, token_f1=1.0, tokens=1, length_ratio=1.0, stopped=1.0,
             distinct_2=1.0),
        _row(rouge_l=0.5, chrf=0.6, token_f1=0.8, tokens=2, length_ratio=math.nan, stopped=1.0, distinct_2=1.0),
        _row(rouge_l=0.0, chrf=0.2, token_f1=0.0, tokens=3, length_ratio=3.0, stopped=1.0, distinct_2=0.5),
        _row(rouge_l=0.5, chrf=0.2, token_f1=0.4, tokens=4, length_ratio=2.0, stopped=1.0, distinct_2=1.0,
             repeated_3gram=0.1),
        _row(rouge_l=0.0, chrf=0.0, token_f1=0.0, tokens=10, length_ratio=5.0, hit_cap=1.0, stopped=0.0,
             repeated_3gram=0.5, distinct_2=0.5),
    ]
    assert summarize_examples(rows) == {
        "rouge_l": pytest.approx(2.0 / 5),
        "chrf": pytest.approx(2.0 / 5),
        "exact_match": pytest.approx(1 / 5),
        "token_f1": pytest.approx(2.2 / 5),
        "mean_tokens": pytest.approx(20 / 5),
        "median_tokens": pytest.approx(3.0),
        # sorted 1 2 3 4 10: position 0.9 * 4 = 3.6 -> 4 + 0.6 * (10 - 4)
        "p90_tokens": pytest.approx(7.6),
        "length_ratio": pytest.approx((1 + 3 + 2 + 5) / 4),  # the NaN row left out
        "cap_hit_rate": pytest.approx(1 / 5),
        "stop_rate": pytest.approx(4 / 5),
        "repeated_3gram": pytest.approx(0.6 / 5),
        "distinct_2": pytest.approx(4.0 / 5),
        "n": 5,
    }


def test_summarize_examples_of_real_rows_by_hand():
    predictions = ["Paris", "the cat sat", "", "blah blah blah blah"]
    references = ["paris.", "the black cat sat down quietly", "Rome", "yes"]
    n_tokens, stopped = [2, 3, 0, 8], [True, True, True, False]
    rows = [example_metrics(p, r, list(range(k)), 2, s, cap=8)
            for p, r, k, s in zip(predictions, references, n_tokens, stopped)]
    new = summarize_examples(rows)
    # ROUGE-L: 1 (same after stemming/case), LCS 3 of 3 and 6 -> F 2/3, then 0 and 0.
    assert new["rouge_l"] == pytest.approx((1 + 2 / 3) / 4)
    assert new["exact_match"] == pytest.approx(1 / 4) and new["mean_tokens"] == pytest.approx(13 / 4)
    assert new["cap_hit_rate"] == pytest.approx(1 / 4)  # only the unstopped answer at 8 tokens
    assert new["stop_rate"] == pytest.approx(3 / 4) and new["n"] == 4
    assert new["length_ratio"] == pytest.approx((1 + 1.5 + 0 + 4) / 4)
    assert new["p90_tokens"] == pytest.approx(3 + 0.7 * (8 - 3))  # sorted 0 2 3 8: position 2.7


def test_summarize_examples_length_ratio_all_nan_is_nan():
    summary = summarize_examples([_row(tokens=1, length_ratio=math.nan)])
    assert math.isnan(summary["length_ratio"])
    assert summary["median_tokens"] == 1.0 and summary["p90_tokens"] == 1.0 and summary["n"] == 1


def test_summarize_examples_with_no_rows_is_nan_not_zero():
    summary = summarize_examples([])
    assert set(summary) == {"rouge_l", "chrf", "exact_match", "token_f1", "mean_tokens", "median_tokens",
                            "p90_tokens", "length_ratio", "cap_hit_rate", "stop_rate", "repeated_3gram",
                            "distinct_2", "n"}
    assert summary["n"] == 0
    assert all(math.isnan(v) for k, v in summary.items() if k != "n")
