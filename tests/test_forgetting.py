"""Continual-learning measures on hand-made accuracy matrices, their CSV and figure."""
from __future__ import annotations

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.forgetting import (AccuracyMatrix, average_accuracy, average_forgetting, backward_transfer,
                                      forgetting, plot_forgetting)

TASKS = ["mrpc", "sst2", "cola"]
R = [[0.8, None, None],
     [0.6, 0.9, None],
     [0.5, 0.7, 0.95]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def filled(rows=R, tasks=TASKS) -> AccuracyMatrix:
    matrix = AccuracyMatrix(tasks)
    for stage, row in enumerate(rows):
        for task, value in zip(tasks, row):
            if value is not None:
                matrix.record(stage, task, value)
    return matrix


# -- the measures -------------------------------------------------------------------------------------------------
def test_measures_of_a_three_stage_sequence():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25
    assert forgetting(R) == pytest.approx({0: 0.8 - 0.5, 1: 0.9 - 0.7})
    assert average_forgetting(R) == pytest.approx(0.25)


def test_forgetting_starts_from_the_best_accuracy_not_the_one_right_after_training():
    # mrpc improves after sst2 (0.6 -> 0.9) before dropping to 0.7; sst2 improves at the end (0.5 -> 0.8)
    rows = [[0.6, None, None],
            [0.9, 0.5, None],
            [0.7, 0.8, 0.9]]
    assert forgetting(rows) == pytest.approx({0: 0.9 - 0.7, 1: 0.5 - 0.8})
    assert average_forgetting(rows) == pytest.approx(((0.9 - 0.7) + (0.5 - 0.8)) / 2)
    assert backward_transfer(rows) == pytest.approx(((0.7 - 0.6) + (0.8 - 0.5)) / 2)  # BWT sees only the diagonal
    assert average_accuracy(rows) == pytest.approx(0.8)


def test_one_stage_has_accuracy_but_no_transfer_or_forgetting():
    assert average_accuracy([[0.7]]) == pytest.approx(0.7)
    assert backward_transfer([[0.7]]) is None
    assert forgetting([[0.7]]) == {}
    assert average_forgetting([[0.7]]) is None


def test_a_missing_entry_is_named():
    with pytest.raises(LrbenchError, match=r"R\[2\]\[1\] \(task 1 after stage 2\) is missing"):
        backward_transfer([[0.8, None, None], [0.6, 0.9, None], [0.5, None, 0.95]])


# -- recording ----------------------------------------------------------------------------------------------------
def test_accuracy_matrix_summary_names_the_tasks():
    matrix = filled()
    assert matrix.rows == R
    summary = matrix.summary()
    assert summary == {
        "average_accuracy": pytest.approx(2.15 / 3),
        "backward_transfer": pytest.approx(-0.25),
        "average_forgetting": pytest.approx(0.25),
        "forgetting": {"mrpc": pytest.approx(0.3), "sst2": pytest.approx(0.2)},
    }


def test_summary_mid_sequence_covers_the_stages_done():
    summary = filled(R[:2]).summary()
    assert summary["average_accuracy"] == pytest.approx((0.6 + 0.9) / 2)
    assert summary["backward_transfer"] == pytest.approx(0.6 - 0.8)
    assert summary["forgetting"] == {"mrpc": pytest.approx(0.2)}


def test_record_refuses_what_the_matrix_cannot_hold():
    matrix = AccuracyMatrix(TASKS)
    with pytest.raises(LrbenchError, match="stage=3 but the sequence has 3 stages"):
        matrix.record(3, "mrpc", 0.5)
    with pytest.raises(LrbenchError, match="task 'qnli' is not in the sequence; valid: cola, mrpc, sst2"):
        matrix.record(0, "qnli", 0.5)
    with pytest.raises(LrbenchError, match="task 'cola' is trained at stage 2, so it cannot be scored after stage 0"):
        matrix.record(0, "cola", 0.5)
    with pytest.raises(LrbenchError, match="repeat mrpc"):
        AccuracyMatrix(["mrpc", "sst2", "mrpc"])


def test_csv_has_one_row_per_stage_done_and_empty_cells_for_unseen_tasks(tmp_path):
    path = tmp_path / "continual" / "accuracy.csv"
    filled(R[:2]).to_csv(path)
    assert path.read_text() == "after_stage,mrpc,sst2,cola\n1,0.8,,\n2,0.6,0.9,\n"
    filled().to_csv(path)  # rewritten in place
    assert path.read_text() == "after_stage,mrpc,sst2,cola\n1,0.8,,\n2,0.6,0.9,\n3,0.5,0.7,0.95\n"
    assert [p.name for p in path.parent.iterdir()] == ["accuracy.csv"]  # no temporary file left


# -- the figure ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("perplexities", [None, [31.0, 33.5, 40.2, 52.0], [20.0, None, 900.0, 1500.0]],
                         ids=["accuracy only", "with perplexity", "log-scale perplexity"])
def test_plot_writes_a_png(tmp_path, perplexities):
    path = tmp_path / "forgetting.png"
    plot_forgetting(path, TASKS, R, perplexities, title="CURLoRA r=16")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 5000  # a drawn figure, not an empty canvas
    assert [p.name for p in tmp_path.iterdir()] == ["forgetting.png"]


def test_plot_mid_sequence_and_a_wrong_perplexity_count(tmp_path):
    path = tmp_path / "mid.png"
    plot_forgetting(path, TASKS, R[:2], [31.0, 33.5, 40.2])  # before, after 1, after 2
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(LrbenchError, match="5 perplexities for 3 stages; give at most 4"):
        plot_forgetting(tmp_path / "bad.png", TASKS, R, [31.0, 33.5, 40.2, 41.0, 42.0])
    assert not (tmp_path / "bad.png").exists()
