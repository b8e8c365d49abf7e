"""Classification metrics against confusion matrices and AUCs worked out by hand."""

import itertools
import random

import pytest

from qrun.workers.metrics import (
    Confusion,
    accuracy,
    average_ranks,
    classification_metrics,
    confusion,
    f1,
    precision,
    recall,
    roc_auc,
)

T, F, X = True, False, None  # X: an unparseable answer


def test_confusion_counts_by_hand():
    labels = [T, T, T, F, F, F, T, F]
    predictions = [T, F, T, T, F, X, X, F]
    # tp: 0, 2   fn: 1   fp: 3   tn: 4, 7   invalid: 5, 6
    assert confusion(labels, predictions) == Confusion(tp=2, fp=1, tn=2, fn=1, invalid=2)


def test_ratios_by_hand():
    c = Confusion(tp=6, fp=2, tn=9, fn=3, invalid=5)
    assert precision(c) == pytest.approx(6 / 8)
    assert recall(c) == pytest.approx(6 / 9)
    assert f1(c) == pytest.approx(2 * (6 / 8) * (6 / 9) / (6 / 8 + 6 / 9))
    assert accuracy(c) == pytest.approx(15 / 25)  # the 5 invalid answers count as wrong


def test_invalid_answers_are_no_class():
    metrics = classification_metrics([T, F, T], [X, X, X])
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"], metrics["invalid"]) == (0, 0, 0, 0, 3)
    assert metrics["accuracy"] == 0.0
    assert "auc" not in metrics


@pytest.mark.parametrize("labels, predictions, expected", [
    ([T, F], [F, F], (0.0, 0.0, 0.0, 0.5)),  # never says fraud: precision 0/0 -> 0.0
    ([F, F], [F, T], (0.0, 0.0, 0.0, 0.5)),  # no fraud in the data: recall 0/0 -> 0.0
    ([T, F], [T, F], (1.0, 1.0, 1.0, 1.0)),
    ([], [], (0.0, 0.0, 0.0, 0.0)),
])
def test_zero_denominators_give_zero(labels, predictions, expected):
    c = confusion(labels, predictions)
    assert (precision(c), recall(c), f1(c), accuracy(c)) == expected


def test_confusion_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        confusion([T, F], [T])


def test_average_ranks_share_ties():
    assert average_ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
    assert average_ranks([5, 5, 5]) == [2.0, 2.0, 2.0]


def test_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.1, 0.4: pairs 1 + 1 + 1 + 0.5 (the tie) = 3.5 of 4
    assert roc_auc([T, F, T, F], [0.9, 0.1, 0.4, 0.4]) == pytest.approx(0.875)
    assert roc_auc([T, T, F, F], [2, 3, 0, 1]) == 1.0
    assert roc_auc([T, T, F, F], [0, 1, 2, 3]) == 0.0
    assert roc_auc([T, F, T, F], [7, 7, 7, 7]) == 0.5


def test_auc_none_when_one_class_is_absent():
    assert roc_auc([T, T], [0.1, 0.2]) is None
    assert roc_auc([F], [0.1]) is None
    assert roc_auc([], []) is None
    assert classification_metrics([T, T], [T, F], [1.0, -1.0])["auc"] is None


def test_auc_matches_pair_counting():
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(2, 30)
        labels = [rng.random() < 0.4 for _ in range(n)]
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        pairs = [(s_p, s_n) for (s_p, l_p), (s_n, l_n) in itertools.product(zip(scores, labels), repeat=2)
                 if l_p and not l_n]
        expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs) if pairs else None
        assert roc_auc(labels, scores) == pytest.approx(expected)
