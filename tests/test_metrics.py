"""Metric values checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from loralab.metrics import exact_match, mean, normalize, rouge_l, summarize_cap


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


def test_summarize_cap_by_hand():
    summary = summarize_cap(
        predictions=["Paris", "the cat sat", "", "blah blah blah blah"],
        references=["paris.", "the black cat sat down quietly", "Rome", "yes"],
        n_tokens=[2, 3, 0, 8],
        stopped=[True, True, True, False],  # the last never stopped: cut off at the cap
        cap=8,
    )
    assert summary == {
        "rouge_l": pytest.approx((1 + 2 / 3 + 0 + 0) / 4),
        "exact_match": pytest.approx(1 / 4),
        "mean_tokens": pytest.approx((2 + 3 + 0 + 8) / 4),
        "cap_hit_rate": pytest.approx(1 / 4),
        "stop_rate": pytest.approx(3 / 4),
        "n": 4,
    }


def test_summarize_cap_counts_only_unstopped_answers_at_the_cap_as_cut_off():
    summary = summarize_cap(["a", "b", "c"], ["a", "b", "c"], n_tokens=[4, 4, 3], stopped=[False, False, False], cap=4)
    assert summary["cap_hit_rate"] == pytest.approx(2 / 3)  # the 3-token answer was not cut off by cap 4
    assert summary["stop_rate"] == 0.0


def test_summarize_cap_with_no_examples_is_nan_not_zero():
    summary = summarize_cap([], [], [], [], cap=8)
    assert summary["n"] == 0
    assert set(summary) == {"rouge_l", "exact_match", "mean_tokens", "cap_hit_rate", "stop_rate", "n"}
    assert all(math.isnan(v) for k, v in summary.items() if k != "n")


def test_summarize_cap_rejects_lists_of_different_lengths():
    with pytest.raises(ValueError, match="one reference"):
        summarize_cap(["a", "b"], ["a"], [1, 1], [True, True], cap=4)
