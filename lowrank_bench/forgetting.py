"""Continual learning: how much a sequence of tasks makes a model forget, as numbers, a CSV and a figure.

R[i][j] is the accuracy on task j after training stage i (stage i trains task i), for T stages. Only the tasks
already trained are evaluated: R[i][j] is None for j > i. Following Lopez-Paz & Ranzato 2017 (GEM) and Chaudhry
et al. 2018 (RWalk):

    average accuracy    ACC  = 1/T     * sum_j         R[T-1][j]
    backward transfer   BWT  = 1/(T-1) * sum_{j<T-1}   (R[T-1][j] - R[j][j])             (< 0: forgetting)
    forgetting of j     f_j  = max_{l in [j, T-2]} R[l][j] - R[T-1][j]       for j < T-1  (>= 0 for forgetting)
    average forgetting  F    = 1/(T-1) * sum_{j<T-1}   f_j

BWT compares with the accuracy right after learning a task, forgetting with its best accuracy before the end. With
one stage nothing can be forgotten yet: BWT and F are None, the per-task forgetting is empty.

Stage numbers count from 0 in code (`record(stage, ...)`, R[i]) and from 1 in files and figures (`after_stage` = 1
is the row after training the first task; the figure's "after 1: mrpc"), where people read them.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowrank_bench.errors import LrbenchError, choices


# -- the measures -------------------------------------------------------------------------------------------------
def checked(R) -> list[list[float]]:
    """The lower triangle of a T x T matrix, rows cut to their seen tasks; a missing entry is an error."""
    if not R:
        raise LrbenchError("accuracy matrix is empty; record the accuracies of at least one stage")
    rows = []
    for i, row in enumerate(R):
        seen = list(row[:i + 1])
        if len(seen) < i + 1 or any(value is None for value in seen):
            missing = next(j for j in range(i + 1) if j >= len(seen) or seen[j] is None)
            raise LrbenchError(f"accuracy matrix: R[{i}][{missing}] (task {missing} after stage {i}) is missing; "
                               "record the accuracy of every task seen so far after each stage")
        rows.append([float(value) for value in seen])
    return rows


def average_accuracy(R) -> float:
    return float(np.mean(checked(R)[-1]))


def backward_transfer(R) -> float | None:
    rows = checked(R)
    final = rows[-1]
    if len(rows) == 1:
        return None
    return float(np.mean([final[j] - rows[j][j] for j in range(len(rows) - 1)]))


def forgetting(R) -> dict[int, float]:
    rows = checked(R)
    final = rows[-1]
    return {j: max(rows[l][j] for l in range(j, len(rows) - 1)) - final[j] for j in range(len(rows) - 1)}


def average_forgetting(R) -> float | None:
    per_task = forgetting(R)
    return float(np.mean(list(per_task.values()))) if per_task else None


# -- recording ----------------------------------------------------------------------------------------------------
@dataclass
class AccuracyMatrix:
    """R filled in as a run goes: `record(stage, task, accuracy)` after each evaluation. `tasks` in training order."""

    tasks: list[str]
    rows: list[list[float | None]] = field(init=False)

    def __post_init__(self):
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise LrbenchError("a continual sequence needs at least one task; give the list of tasks")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise LrbenchError(f"continual tasks {self.tasks} repeat {', '.join(repeated)}; name each task once")
        self.rows = [[None] * len(self.tasks) for _ in self.tasks]

    def record(self, stage: int, task: str, value: float) -> None:
        if not 0 <= stage < len(self.tasks):
            raise LrbenchError(f"stage={stage} but the sequence has {len(self.tasks)} stages; "
                               f"choose 0 <= stage <= {len(self.tasks) - 1}")
        if task not in self.tasks:
            raise LrbenchError(f"task {task!r} is not in the sequence; valid: {choices(self.tasks)}")
        j = self.tasks.index(task)
        if j > stage:
            raise LrbenchError(f"task {task!r} is trained at stage {j}, so it cannot be scored after stage {stage}; "
                               "record only the tasks trained so far")
        self.rows[stage][j] = float(value)

    def stages_done(self) -> int:
        """Stages with at least one accuracy recorded (the rows a CSV or a summary shows so far)."""
        return sum(any(value is not None for value in row) for row in self.rows)

    def summary(self) -> dict:
        """The measures over the stages done so far: after the last stage, over the whole sequence."""
        R = self.rows[:self.stages_done()]
        return {
            "average_accuracy": average_accuracy(R),
            "backward_transfer": backward_transfer(R),
            "average_forgetting": average_forgetting(R),
            "forgetting": {self.tasks[j]: value for j, value in forgetting(R).items()},
        }

    def to_csv(self, path) -> None:
        """`after_stage,<task1>,...`: one row per stage done (numbered from 1), empty cells for unseen tasks."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["after_stage", *self.tasks])
        for i, row in enumerate(self.rows[:self.stages_done()]):
            writer.writerow([i + 1, *("" if value is None else value for value in row)])
        path = Path(path)
        write_atomically(path, path.with_suffix(f".{os.getpid()}.tmp"), lambda tmp: tmp.write_text(buffer.getvalue()))


def write_atomically(path: Path, tmp: Path, write) -> None:
    """`write(tmp)`, then rename over `path`: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- the figure ---------------------------------------------------------------------------------------------------
def plot_forgetting(path, tasks: list[str], R, perplexities: list[float | None] | None = None,
                    title: str = "") -> None:
    """Accuracy of each task across the stages (one line per task, from the stage that trains it), and optionally
    the perplexity on a second axis: one value before the first stage (x = 0, "before"), then one after each stage
    (up to len(tasks) + 1 values, None where not measured). Stages not done yet (rows of R, perplexities at the end
    of the list) leave their x positions empty, so a figure drawn mid-sequence has the final figure's axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes, and no GUI backend picked by pyplot
    import matplotlib.pyplot as plt

    n_stages = len(tasks)
    if perplexities is not None and len(perplexities) > n_stages + 1:
        raise LrbenchError(f"{len(perplexities)} perplexities for {n_stages} stages; give at most {n_stages + 1}: one "
                           "before the first stage, then one after each stage (None where not measured)")
    labels = [f"after {i + 1}: {task}" for i, task in enumerate(tasks)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * (n_stages + 1)), 4.5))
    try:
        for j, task in enumerate(tasks):
            points = [(i + 1, row[j]) for i, row in enumerate(R) if j < len(row) and row[j] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=task)
        ax.set_ylabel("accuracy")
        handles, names = ax.get_legend_handles_labels()
        if perplexities is not None:
            handles, names = plot_perplexity(ax, perplexities, handles, names)
            ax.set_xticks(range(n_stages + 1), ["before", *labels])
        else:
            ax.set_xticks(range(1, n_stages + 1), labels)
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles, names, loc="best", fontsize="small")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        # the temporary name keeps the .png suffix: matplotlib picks the format from it
        write_atomically(path, path.with_suffix(f".{os.getpid()}.tmp.png"), lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def plot_perplexity(ax, perplexities, handles: list, names: list) -> tuple[list, list]:
    points = [(x, value) for x, value in enumerate(perplexities) if value is not None]
    if not points:
        return handles, names
    right = ax.twinx()
    (line,) = right.plot(*zip(*points), marker="s", linestyle="--", color="0.35")
    values = [value for _, value in points]
    if min(values) > 0 and max(values) / min(values) > 10:
        right.set_yscale("log")
    right.set_ylabel("perplexity")
    # accuracies in front: a twin axis is drawn over its host, and would hide a task's single point under its marker
    ax.set_zorder(right.get_zorder() + 1)
    ax.patch.set_visible(False)
    return handles + [line], names + ["perplexity"]
