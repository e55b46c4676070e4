"""Thin wrappers over scikit-learn and scipy with the GLUE metric names (the `evaluate` library needs the Hub)."""
from __future__ import annotations

import math

from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def accuracy(preds, labels) -> float:
    return float(accuracy_score(labels, preds))


def f1(preds, labels) -> float:
    return float(f1_score(labels, preds, zero_division=0.0))


def matthews(preds, labels) -> float:
    return float(matthews_corrcoef(labels, preds))


def pearson(preds, labels) -> float:
    value = pearsonr(preds, labels).statistic
    return 0.0 if math.isnan(value) else float(value)


def spearman(preds, labels) -> float:
    value = spearmanr(preds, labels).statistic
    return 0.0 if math.isnan(value) else float(value)
