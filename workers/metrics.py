"""Classification metrics as pure functions: no torch, no database.

Conventions (documented because tables compare them across variants):
- A prediction is True (fraud), False (not fraud) or None (the answer could not be parsed).
  Unparseable answers are counted in `invalid`, never as a class: they are left out of
  tp/fp/tn/fn (so out of precision and recall) but count as wrong in accuracy.
- A ratio whose denominator is 0 is 0.0 (precision with no positive prediction, recall with no
  positive label, F1 when precision and recall are both 0): a variant that never says "fraud"
  scores 0, not "undefined", so it sorts below one that does.
- ROC-AUC is rank based (Mann-Whitney U), ties count one half; None when one class is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    invalid: int = 0

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn + self.invalid


def confusion(labels: Sequence[bool], predictions: Sequence[bool | None]) -> Confusion:
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "invalid": 0}
    for label, predicted in zip(labels, predictions):
        if predicted is None:
            counts["invalid"] += 1
        elif predicted:
            counts["tp" if label else "fp"] += 1
        else:
            counts["fn" if label else "tn"] += 1
    return Confusion(**counts)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def precision(c: Confusion) -> float:
    return _ratio(c.tp, c.tp + c.fp)


def recall(c: Confusion) -> float:
    return _ratio(c.tp, c.tp + c.fn)


def f1(c: Confusion) -> float:
    p, r = precision(c), recall(c)
    return _ratio(2 * p * r, p + r)


def accuracy(c: Confusion) -> float:
    """Correct answers over all samples: an invalid answer is a wrong answer."""
    return _ratio(c.tp + c.tn, c.total)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties one half; None if a class is absent."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return None
    ranks = average_ranks(scores)
    rank_sum = sum(r for r, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def classification_metrics(labels: Sequence[bool], predictions: Sequence[bool | None],
                           scores: Sequence[float] | None = None) -> dict[str, float | None]:
    """The flat metric set an eval job records (auc only when scores are given)."""
    c = confusion(labels, predictions)
    metrics: dict[str, float | None] = {
        "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn, "invalid": c.invalid,
        "precision": precision(c), "recall": recall(c), "f1": f1(c), "accuracy": accuracy(c),
    }
    if scores is not None:
        metrics["auc"] = roc_auc(labels, scores)
    return metrics
