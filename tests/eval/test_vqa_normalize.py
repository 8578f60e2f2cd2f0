"""The official VQA scorer's rules, on its known tricky cases, and hand-computed accuracies."""

from __future__ import annotations

from fractions import Fraction

import pytest

from lmm.eval.metrics import vqa_metrics
from lmm.eval.vqa_normalize import normalize_answer, process_punctuation, vqa_accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes.", "yes"),  # a final period goes
        ("2.5", "2.5"),  # a period before a digit stays
        ("e.g.", "eg"),  # periods not before a digit go
        ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted, not spaced
        ("hot-dog", "hot dog"),  # a mark not touching a space becomes a space
        ("hot - dog", "hot dog"),  # a mark touching a space is deleted (then spaces collapse)
        ("yes!", "yes"),
        ("What?", "what"),
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("The Cat", "cat"),  # articles dropped, lower-cased
        ("an apple", "apple"),
        ("a/b", "b"),  # "/" -> space, then the article "a" is dropped
        ("dont", "don't"),  # contractions restored
        ("Isnt", "isn't"),
        ("it's", "it's"),  # apostrophes are not punctuation for the official scorer
        ("$5.00", "$5.00"),
        ("3:00", "3:00"),  # ':' is not in the official punctuation list
        ("\tYES\n", "yes"),
        ("(red)", "red"),
    ],
)
def test_normalize_answer_follows_the_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_decides_each_mark_separately_and_keeps_case():
    # decided mark by mark: "," touches a space (deleted), "-" does not (becomes a space)
    assert process_punctuation("New-York, NY") == "New York NY"
    assert process_punctuation("x;y") == "x y"


def _answers(**counts) -> list[str]:
    out = []
    for word, n in counts.items():
        out += [word] * n
    assert len(out) == 10
    return out


# Expected values by hand: for each of the 10 annotators, leave them out and count matches among the
# other 9; min(1, matches / 3); average the 10 values.
HAND = [
    ("yes", _answers(yes=10), Fraction(1)),  # 9 matches every time
    ("red", _answers(red=4, blue=6), Fraction(1)),  # 3 or 4 matches -> 1
    ("red", _answers(red=3, blue=7), Fraction(3 * 2, 3) / 10 + Fraction(7, 10)),  # 0.9, not 1.0
    ("red", _answers(red=2, blue=8), (2 * Fraction(1, 3) + 8 * Fraction(2, 3)) / 10),  # 0.6
    ("red", _answers(red=1, blue=9), 9 * Fraction(1, 3) / 10),  # 0.3
    ("green", _answers(red=1, blue=9), Fraction(0)),
    ("Two", _answers(**{"2": 5, "3": 5}), Fraction(1)),  # "Two" -> "2"
    ("the dog.", _answers(dog=2, cat=8), (2 * Fraction(1, 3) + 8 * Fraction(2, 3)) / 10),
]


@pytest.mark.parametrize("pred, answers, expected", HAND)
def test_vqa_accuracy_matches_hand_computed_leave_one_out(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(float(expected), abs=1e-12)


def test_three_matching_humans_score_point_nine():
    assert vqa_accuracy("red", _answers(red=3, blue=7)) == pytest.approx(0.9, abs=1e-12)


def test_unanimous_answers_are_not_normalised_as_in_the_official_code():
    # The official scorer only normalises human answers when they disagree.
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0


def test_dataset_accuracy_is_the_mean_of_hand_computed_question_scores():
    preds = {str(i): p for i, (p, _, _) in enumerate(HAND)}
    answers = {str(i): a for i, (_, a, _) in enumerate(HAND)}
    expected = sum(e for _, _, e in HAND) / len(HAND)
    result = vqa_metrics(preds, answers)
    assert result["vqa_accuracy"] == pytest.approx(float(expected), abs=1e-12)
    assert result["per_sample"]["2"] == pytest.approx(0.9, abs=1e-12)


def test_empty_human_answers_raise_a_clear_error():
    with pytest.raises(ValueError, match="empty 'answers'"):
        vqa_accuracy("yes", [])
