"""Classification metrics as pure functions: no torch, no database.

Conventions (documented because tables compare them across variants):
- A prediction is True (fraud), False (not fraud) or None (the answer could not be parsed).
  Unparseable answers are counted in `invalid`, never as a class: they are left out of
  tp/fp/tn/fn (so out of precision and recall) but count as wrong in accuracy.
- A ratio whose denominator is 0 is 0.0 (precision with no positive prediction, recall with no
  positive label, F1 when precision and recall are both 0): a variant that never says "fraud"
  scores 0, not "undefined", so it sorts below one that does.
- ROC-AUC is rank based (Mann-Whitney U), ties count one half; None when one class is absent.

Tasks of any number of classes (`class_metrics`) follow the same conventions per class, labels being
any hashable (the label texts of workers.tasks): precision[c] = right answers c / answers c, recall[c]
= right answers c / rows of class c that got a valid answer, so that for two classes f1[positive] is
the binary F1 above. Macro averages run over the classes that have rows or were answered (as
scikit-learn's do: a class of the task that the data lacks and no answer names is left out); the
weighted F1 weighs each class by its rows. Their flat names (`f1[spam]`, `confusion[spam->ham]`) are
the table's (metric_name, confusion_name).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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


# ---------------------------------------------------------------- any number of classes

PER_CLASS = ("precision", "recall", "f1", "support")
INVALID = "invalid"  # the confusion matrix's column of answers that name no class


def metric_name(name: str, label: str) -> str:
    """A per-class metric's name in the table: `f1[spam]`."""
    return f"{name}[{label}]"


def confusion_name(label: str, predicted: str) -> str:
    """A confusion-matrix cell's name in the table: `confusion[spam->ham]` (rows of class spam answered ham)."""
    return f"confusion[{label}->{predicted}]"


def confusion_matrix(labels: Sequence[Hashable], predictions: Sequence[Hashable | None],
                     classes: Sequence[Hashable]) -> dict[Hashable, dict[Hashable, int]]:
    """{true class: {answered class or INVALID: rows}}, every cell present (zeros too)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    matrix = {c: {p: 0 for p in [*classes, INVALID]} for c in classes}
    for label, predicted in zip(labels, predictions):
        matrix[label][INVALID if predicted is None else predicted] += 1
    return matrix


def per_class(matrix: dict[Hashable, dict[Hashable, int]]) -> dict[Hashable, dict[str, float]]:
    """{class: {precision, recall, f1, support}} from a confusion matrix (the conventions above)."""
    out = {}
    for c in matrix:
        right = matrix[c][c]
        answered_c = sum(matrix[t][c] for t in matrix)
        valid_rows = sum(n for p, n in matrix[c].items() if p != INVALID)
        p, r = _ratio(right, answered_c), _ratio(right, valid_rows)
        out[c] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": sum(matrix[c].values())}
    return out


def class_metrics(labels: Sequence[Hashable], predictions: Sequence[Hashable | None],
                  classes: Sequence[Hashable]) -> dict[str, float]:
    """The flat metrics of a task of any number of classes: accuracy, invalid, classes, macro precision,
    recall and F1, weighted F1, each class's precision[c], recall[c], f1[c], support[c], and the
    confusion matrix's non-zero cells confusion[c->p] (p may be INVALID; absent cells are 0)."""
    matrix = confusion_matrix(labels, predictions, classes)
    scores = per_class(matrix)
    counted = [c for c in classes if scores[c]["support"] or sum(matrix[t][c] for t in classes)]
    total = len(labels)
    metrics: dict[str, float] = {
        "accuracy": _ratio(sum(matrix[c][c] for c in classes), total),
        "invalid": sum(matrix[c][INVALID] for c in classes), "classes": len(classes),
        "macro_precision": _mean([scores[c]["precision"] for c in counted]),
        "macro_recall": _mean([scores[c]["recall"] for c in counted]),
        "macro_f1": _mean([scores[c]["f1"] for c in counted]),
        "weighted_f1": _ratio(sum(scores[c]["f1"] * scores[c]["support"] for c in classes), total),
    }
    for c in classes:
        metrics |= {metric_name(name, str(c)): scores[c][name] for name in PER_CLASS}
        metrics |= {confusion_name(str(c), str(p)): n for p, n in matrix[c].items() if n}
    return metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def class_scores(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{class: {precision, recall, f1, support}} read back from an eval's flat metrics (empty for an eval
    that recorded none), in the order the metrics list them."""
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        for metric in PER_CLASS:
            if name.startswith(metric + "[") and name.endswith("]"):
                out.setdefault(name[len(metric) + 1:-1], {})[metric] = value
    return {label: scores for label, scores in out.items() if "support" in scores}


def generation_metrics(matches: Sequence[bool | None]) -> dict[str, float]:
    """A generation task's metrics: match (share of rows whose answer matched the reference), and invalid
    (answers the scorer could not read: no JSON field, no match of the pattern; they count as misses)."""
    return {"match": _ratio(sum(1 for m in matches if m), len(matches)),
            "invalid": sum(1 for m in matches if m is None)}
