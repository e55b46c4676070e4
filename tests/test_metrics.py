"""What every classifier reports besides its metrics: the confusion matrix and the degenerate (constant) predictor."""
from __future__ import annotations

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.metrics import confusion, is_degenerate


def test_confusion_rows_are_true_labels_and_columns_predictions():
    preds = [0, 1, 1, 2, 0]
    labels = [0, 1, 2, 2, 1]
    assert confusion(preds, labels, num_labels=4) == [[1, 0, 0, 0],
                                                      [1, 1, 0, 0],
                                                      [0, 1, 1, 0],
                                                      [0, 0, 0, 0]]
    assert confusion([], [], num_labels=2) == [[0, 0], [0, 0]]
    with pytest.raises(LrbenchError, match="predictions contain class 3, outside 0..2 for num_labels=3"):
        confusion([0, 3], [0, 1], num_labels=3)
    with pytest.raises(LrbenchError, match="2 predictions for 3 labels"):
        confusion([0, 1], [0, 1, 1], num_labels=2)


def test_a_constant_predictor_is_degenerate():
    assert is_degenerate([1, 1, 1])
    assert is_degenerate([2])
    assert not is_degenerate([1, 0, 1])
    assert not is_degenerate([])
