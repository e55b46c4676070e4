"""Thin wrappers over scikit-learn and scipy with the GLUE metric names (the `evaluate` library needs the Hub)."""
from __future__ import annotations

import math

from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


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
