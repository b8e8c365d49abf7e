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


# ---------------------------------------------------------------- any number of classes

A, B, C = "a", "b", "c"


def test_class_metrics_by_hand():
    from qrun.workers.metrics import class_metrics, class_scores

    labels = [A, A, A, B, B, C, C, C]
    predictions = [A, B, X, B, A, C, C, B]
    # a: 1 right of 2 valid answers (one invalid), answered a twice -> p 1/2, r 1/2
    # b: 1 right of 2, answered b 3 times -> p 1/3, r 1/2; c: 2 right of 3, answered c twice -> p 1, r 2/3
    m = class_metrics(labels, predictions, [A, B, C])
    assert (m["accuracy"], m["invalid"], m["classes"]) == (4 / 8, 1, 3)
    f1s = {A: 0.5, B: 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), C: 2 * 1 * (2 / 3) / (1 + 2 / 3)}
    for label, expected in f1s.items():
        assert m[f"f1[{label}]"] == pytest.approx(expected)
    assert (m["precision[b]"], m["recall[c]"], m["support[a]"], m["support[c]"]) == (pytest.approx(1 / 3),
                                                                                      pytest.approx(2 / 3), 3, 3)
    assert m["macro_f1"] == pytest.approx(sum(f1s.values()) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * f1s[A] + 2 * f1s[B] + 3 * f1s[C]) / 8)
    assert m["macro_precision"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    cells = {k: v for k, v in m.items() if k.startswith("confusion[")}
    assert cells == {"confusion[a->a]": 1, "confusion[a->b]": 1, "confusion[a->invalid]": 1, "confusion[b->b]": 1,
                     "confusion[b->a]": 1, "confusion[c->c]": 2, "confusion[c->b]": 1}
    assert class_scores(m)[B] == {"precision": pytest.approx(1 / 3), "recall": 0.5, "f1": pytest.approx(f1s[B]),
                                  "support": 2}


def test_two_classes_agree_with_the_binary_metrics():
    import random

    from qrun.workers.metrics import class_metrics

    rng = random.Random(3)
    for _ in range(30):
        labels = [rng.random() < 0.5 for _ in range(12)]
        predictions = [rng.choice([T, F, X]) for _ in range(12)]
        binary = classification_metrics(labels, predictions)
        per_class = class_metrics(labels, predictions, [F, T])
        assert per_class["f1[True]"] == pytest.approx(binary["f1"])
        assert per_class["precision[True]"] == pytest.approx(binary["precision"])
        assert per_class["recall[True]"] == pytest.approx(binary["recall"])
        assert (per_class["accuracy"], per_class["invalid"]) == (pytest.approx(binary["accuracy"]), binary["invalid"])


def test_a_class_without_rows_counts_in_macro_only_where_answered():
    from qrun.workers.metrics import class_metrics

    unanswered = class_metrics([A, B], [A, B], [A, B, C])
    assert unanswered["macro_f1"] == 1.0 and unanswered["support[c]"] == 0 and unanswered["f1[c]"] == 0.0
    answered = class_metrics([A, B], [A, C], [A, B, C])  # c answered though no row is c: a wrong class
    assert answered["macro_f1"] == pytest.approx(1 / 3)


def test_generation_metrics():
    from qrun.workers.metrics import generation_metrics

    assert generation_metrics([True, False, None, True]) == {"match": 0.5, "invalid": 1}
    assert generation_metrics([]) == {"match": 0.0, "invalid": 0}
