"""What every classifier reports: the GLUE metrics (thin wrappers over scikit-learn and scipy, with the GLUE names;
the `evaluate` library needs the Hub), the confusion matrix and whether the predictor is degenerate (constant)."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

from lowrank_bench.errors import LrbenchError


def accuracy(preds, labels) -> float:
    return float(accuracy_score(labels, preds))


def f1(preds, labels) -> float:
    return float(f1_score(labels, preds, zero_division=0.0))


def constant(values) -> bool:
    return len(set(values)) < 2


# A correlation with a constant side is undefined (0/0): NaN here, null in metrics.jsonl, blank in the row; never
# the 0.0 that scikit-learn and a lenient wrapper would report, which reads as "no better than chance".
def matthews(preds, labels) -> float:
    return math.nan if constant(preds) or constant(labels) else float(matthews_corrcoef(labels, preds))


def pearson(preds, labels) -> float:
    return math.nan if constant(preds) or constant(labels) else float(pearsonr(preds, labels).statistic)


def spearman(preds, labels) -> float:
    return math.nan if constant(preds) or constant(labels) else float(spearmanr(preds, labels).statistic)


# -- classification diagnostics -----------------------------------------------------------------------------------
def class_ids(values, num_labels: int, what: str) -> np.ndarray:
    ids = np.asarray(values, dtype=np.int64).reshape(-1)
    outside = ids[(ids < 0) | (ids >= num_labels)]
    if outside.size:
        raise LrbenchError(f"{what} contain class {int(outside[0])}, outside 0..{num_labels - 1} for "
                           f"num_labels={num_labels}; check the task's num_labels against the model's head")
    return ids


def confusion(preds, labels, num_labels: int) -> list[list[int]]:
    """Counts, rows = true label, columns = predicted label."""
    preds, labels = class_ids(preds, num_labels, "predictions"), class_ids(labels, num_labels, "labels")
    if preds.size != labels.size:
        raise LrbenchError(f"{preds.size} predictions for {labels.size} labels; give one prediction per example")
    if preds.size == 0:  # sklearn refuses empty inputs; no examples, no counts
        return [[0] * num_labels for _ in range(num_labels)]
    return confusion_matrix(labels, preds, labels=list(range(num_labels))).astype(int).tolist()


def is_degenerate(preds) -> bool:
    """A constant predictor: every prediction the same class (an empty list is not degenerate)."""
    return len(np.unique(np.asarray(preds).reshape(-1))) == 1
