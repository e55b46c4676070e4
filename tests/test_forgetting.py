"""Continual-learning measures on hand-made accuracy matrices, their CSV and figure."""
from __future__ import annotations

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.forgetting import (AccuracyMatrix, average_accuracy, average_forgetting, backward_transfer,
                                      forgetting, forgetting_figure, forward_transfer, majority_share,
                                      plot_forgetting)

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


def test_forward_transfer_compares_each_later_task_with_its_stand_alone_accuracy():
    reference = [0.82, 0.85, 0.97]  # mrpc, sst2, cola trained alone
    # tasks after the first: sst2 R[1][1] - 0.85 = 0.90 - 0.85 = +0.05; cola R[2][2] - 0.97 = 0.95 - 0.97 = -0.02
    # FWT = (0.05 - 0.02) / 2 = 0.015 (mrpc's 0.82 enters no term: the first task starts from the base as alone)
    assert forward_transfer(R, reference) == pytest.approx(0.015)
    assert forward_transfer(R[:2], reference) == pytest.approx(0.05)  # mid-sequence: the tasks trained so far


def test_forward_transfer_leaves_out_tasks_without_a_reference():
    assert forward_transfer(R, [0.82, None, 0.97]) == pytest.approx(0.95 - 0.97)  # cola only: -0.02
    assert forward_transfer(R, [0.82, None, None]) is None  # no task after the first has one
    assert forward_transfer(R, [None, None, None]) is None
    assert forward_transfer([[0.7]], [0.7]) is None  # one stage: nothing after the first
    with pytest.raises(LrbenchError, match="2 reference accuracies for a matrix of 3 tasks; give one per task"):
        forward_transfer(R, [0.82, 0.85])


def test_majority_share_is_the_largest_true_class_over_all_examples():
    # rows = true labels: 30 + 10 = 40 of class 0, 5 + 55 = 60 of class 1, of 100
    assert majority_share([[30, 10], [5, 55]]) == pytest.approx(0.6)
    assert majority_share([[0, 0], [0, 0]]) is None


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
        "forward_transfer": None,
        "forgetting": {"mrpc": pytest.approx(0.3), "sst2": pytest.approx(0.2)},
    }
    assert matrix.summary({"cola": 0.97})["forward_transfer"] == pytest.approx(0.95 - 0.97)


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


def test_the_figure_reads_on_its_own(tmp_path):
    """Accuracy on [0, 1] above, the perplexity's relative change in a panel below, majority levels, the degenerate
    point marked, the title naming method, model and seed, and the legend to the right of the data."""
    perplexities = [31.0, 31.05, 31.1, 31.093]  # +0.3 % at the end
    majority = [0.68, None, 0.69]
    degenerate = [[False, None, None], [True, False, None], [False, False, False]]
    title = "continual/offline · lora · smollm2-135m · seed 3"
    fig = forgetting_figure(TASKS, R, perplexities, title=title, majority=majority, degenerate=degenerate)
    accuracy, change = fig.axes
    assert len(fig.axes) == 2 and accuracy.get_ylim() == (0, 1)
    assert all(word in accuracy.get_title() for word in ("lora", "smollm2-135m", "seed 3"))
    gids = [line.get_gid() for line in accuracy.get_lines()]
    assert gids == ["task:mrpc", "majority:mrpc", "task:sst2", "task:cola", "majority:cola", "degenerate"]
    assert [tuple(line.get_ydata()) for line in accuracy.get_lines() if line.get_gid().startswith("majority")] == [
        (0.68, 0.68), (0.69, 0.69)]
    colours = {line.get_gid(): line.get_color() for line in accuracy.get_lines()}
    assert colours["task:mrpc"] == colours["majority:mrpc"] and colours["task:cola"] == colours["majority:cola"]
    (marked,) = [line for line in accuracy.get_lines() if line.get_gid() == "degenerate"]
    assert list(zip(marked.get_xdata(), marked.get_ydata())) == [(2, 0.6)]  # mrpc after stage 2
    (ppl,) = change.get_lines()[:1]
    assert ppl.get_ydata()[-1] == pytest.approx(100 * (31.093 / 31.0 - 1))  # 0.3 %
    low, high = change.get_ylim()
    assert low <= -2 and high >= 2  # a 0.3 % move fills under a tenth of the panel
    assert "+0.30 %" in [text.get_text() for text in change.texts]
    legend = accuracy.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["mrpc", "sst2", "cola", "majority class (dotted)",
                                                           "predicts one class"]
    fig.draw_without_rendering()
    assert legend.get_window_extent().x0 >= accuracy.get_window_extent().x1  # outside the data, to the right
    path = tmp_path / "forgetting.png"
    plot_forgetting(path, TASKS, R, perplexities, title, majority=majority, degenerate=degenerate)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_the_figure_without_perplexity_is_one_panel_and_refuses_a_wrong_majority_count():
    fig = forgetting_figure(TASKS, R[:2])
    assert len(fig.axes) == 1 and fig.axes[0].get_ylim() == (0, 1)
    assert [line.get_gid() for line in fig.axes[0].get_lines()] == ["task:mrpc", "task:sst2"]
    with pytest.raises(LrbenchError, match="2 majority-class shares for 3 tasks; give one per task"):
        forgetting_figure(TASKS, R, majority=[0.5, 0.5])
