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

Forward transfer (`forward_transfer`) keeps GEM's form, a mean over the tasks after the first of an accuracy minus
a reference, but compares R[j][j] with the task's stand-alone accuracy (`reference[j]`: task j trained alone from
the same base on the same budget) rather than GEM's R[j-1][j] - b_j:

    forward transfer    FWT  = 1/|K|   * sum_{j in K}    (R[j][j] - reference[j]),   K = {j in 1..T-1 with a reference}

(= GEM's 1/(T-1) sum_{j=1..T-1} when every task has one; None when K is empty). > 0: the tasks trained before j
helped to learn it; < 0: they got in the way.

The figure (`forgetting_figure`, written by `plot_forgetting`) draws each task's accuracy across the stages on a
fixed [0, 1] axis, each task's majority-class share (`majority_share` of an evaluation's confusion matrix: what
predicting one class scores) as a dotted line in the task's colour, a red ring over each (stage, task) where the
classifier predicted a single class, and the perplexity's relative change from its first value in a panel below.

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


def forward_transfer(R, reference) -> float | None:
    """What learning the earlier tasks first does to learning task j: the accuracy right after training j in the
    sequence minus its stand-alone accuracy, averaged over the tasks after the first that have a reference,

        FWT = 1/|K| * sum_{j in K} (R[j][j] - reference[j]),   K = {j in 1..T-1 : reference[j] is not None}

    for T stages done; None when K is empty (one stage, or no reference after the first task). `reference` holds
    one value per task of the matrix (its width), None where unknown.

    GEM (Lopez-Paz & Ranzato 2017) defines FWT = 1/(T-1) * sum_{j=1..T-1} (R[j-1][j] - b_j): the accuracy on task j
    before training it, against b_j, a randomly initialised model's. That measures zero-shot transfer through one
    shared head. Here each task gets a fresh head (task-incremental), so both terms are an untrained head's chance
    accuracy and say nothing. The reference is instead the task trained alone from the same base on the same
    budget, and the sequence's term the accuracy once task j is learnt, R[j][j] (the negative of Chaudhry et al.'s
    intransigence with a stand-alone rather than a joint-training reference). The first task starts from the base
    as its stand-alone run does, so it is left out as in GEM's sum."""
    rows = checked(R)
    width = len(R[0])
    if len(reference) != width:
        raise LrbenchError(f"{len(reference)} reference accuracies for a matrix of {width} tasks; give one per "
                           "task, in training order (None where unknown)")
    gains = [rows[j][j] - float(reference[j]) for j in range(1, len(rows)) if reference[j] is not None]
    return float(np.mean(gains)) if gains else None


def majority_share(confusion) -> float | None:
    """What always predicting the most frequent true class scores: max_i sum_k C[i][k] / sum_{i,k} C[i][k], from a
    confusion matrix C with rows = true labels (metrics.confusion); None without examples."""
    counts = np.asarray(confusion, dtype=float)
    total = counts.sum()
    return float(counts.sum(axis=1).max() / total) if counts.size and total > 0 else None


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

    def summary(self, reference: dict[str, float] | None = None) -> dict:
        """The measures over the stages done so far: after the last stage, over the whole sequence. `reference`: the
        stand-alone accuracy of some tasks (task -> accuracy), for the forward transfer (None without one)."""
        R = self.rows[:self.stages_done()]
        reference = reference or {}
        return {
            "average_accuracy": average_accuracy(R),
            "backward_transfer": backward_transfer(R),
            "average_forgetting": average_forgetting(R),
            "forward_transfer": forward_transfer(R, [reference.get(task) for task in self.tasks]),
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
#: the perplexity panel spans at least +-this many percent, so a small move looks small (and is labelled)
PPL_MIN_SPAN = 2.0
DEGENERATE_STYLE = {"linestyle": "none", "marker": "o", "markersize": 13, "markerfacecolor": "none",
                    "markeredgecolor": "red", "markeredgewidth": 1.5}
MAJORITY_STYLE = {"linestyle": ":", "linewidth": 1.5}


def plot_forgetting(path, tasks: list[str], R, perplexities: list[float | None] | None = None, title: str = "", *,
                    majority: list[float | None] | None = None, degenerate=None) -> None:
    """Writes `forgetting_figure(...)` to `path` (a PNG), atomically."""
    fig = forgetting_figure(tasks, R, perplexities, title=title, majority=majority, degenerate=degenerate)
    path = Path(path)
    # the temporary name keeps the .png suffix: matplotlib picks the format from it
    write_atomically(path, path.with_suffix(f".{os.getpid()}.tmp.png"), lambda tmp: fig.savefig(tmp, dpi=120))


def forgetting_figure(tasks: list[str], R, perplexities: list[float | None] | None = None, *, title: str = "",
                      majority: list[float | None] | None = None, degenerate=None):
    """The figure of a sequence, a matplotlib Figure (not attached to pyplot: nothing to close).

    Top panel: the accuracy of each task across the stages (one line per task from the stage that trains it, in
    the task's colour) on a fixed [0, 1] axis; `majority` (one value per task, None where unknown) its
    majority-class share as a dotted line in the same colour, from the stage that trains it on; `degenerate` (a
    matrix shaped like R of True/False/None) a red ring over each point where the classifier predicted one class.
    Bottom panel, when `perplexities` are given (one before the first stage at x = 0, "before", then one after each
    stage: up to len(tasks) + 1 values, None where not measured): the perplexity's relative change from its first
    measured value p0, 100 * (p / p0 - 1) percent, each point labelled with its value. Stages not done yet leave
    their x positions empty, so a figure drawn mid-sequence has the final figure's axes. The legend sits to the
    right of the axes, outside the data."""
    from matplotlib.figure import Figure

    n_stages = len(tasks)
    if perplexities is not None and len(perplexities) > n_stages + 1:
        raise LrbenchError(f"{len(perplexities)} perplexities for {n_stages} stages; give at most {n_stages + 1}: one "
                           "before the first stage, then one after each stage (None where not measured)")
    if majority is not None and len(majority) != n_stages:
        raise LrbenchError(f"{len(majority)} majority-class shares for {n_stages} tasks; give one per task, in "
                           "training order (None where unknown)")
    with_ppl = perplexities is not None and any(p is not None for p in perplexities)
    width = max(6.0, 1.6 * (n_stages + 1)) + 2.5  # room for the legend on the right
    fig = Figure(figsize=(width, 6.0 if with_ppl else 4.5), layout="constrained")
    if with_ppl:
        ax, low = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.4])
    else:
        ax, low = fig.subplots(), None
    handles = draw_accuracies(ax, tasks, R, majority, degenerate)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    labels = [f"after {i + 1}: {task}" for i, task in enumerate(tasks)]
    bottom = ax
    if with_ppl:
        draw_perplexity_change(low, perplexities)
        bottom = low
        ax.tick_params(axis="x", labelbottom=False)
        bottom.set_xticks(range(n_stages + 1), ["before", *labels])
        bottom.set_xlim(-0.4, n_stages + 0.4)
    else:
        bottom.set_xticks(range(1, n_stages + 1), labels)
        bottom.set_xlim(0.6, n_stages + 0.4)
    bottom.tick_params(axis="x", labelrotation=20)
    if handles:
        ax.legend(handles, [h.get_label() for h in handles], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, fontsize="small")
    return fig


def draw_accuracies(ax, tasks: list[str], R, majority, degenerate) -> list:
    """Each task's line (gid `task:<name>`), majority level (gid `majority:<name>`) and the degenerate points (gid
    `degenerate`) on `ax`; returns the legend's handles: the tasks, then one key each for the two kinds of mark."""
    from matplotlib.lines import Line2D

    n_stages = len(tasks)
    handles, flagged = [], []
    for j, task in enumerate(tasks):
        colour = f"C{j % 10}"
        points = [(i + 1, row[j]) for i, row in enumerate(R) if j < len(row) and row[j] is not None]
        if points:
            (line,) = ax.plot(*zip(*points), marker="o", color=colour, label=task, gid=f"task:{task}", clip_on=False)
            handles.append(line)
        flagged += [(x, value) for x, value in points if flag(degenerate, x - 1, j)]
        if majority is not None and majority[j] is not None:
            ax.plot([j + 1 - 0.25, n_stages + 0.25], [majority[j]] * 2, color=colour, label=f"_majority {task}",
                    gid=f"majority:{task}", **MAJORITY_STYLE)
    if majority is not None and any(m is not None for m in majority):
        handles.append(Line2D([], [], color="0.35", label="majority class (dotted)", **MAJORITY_STYLE))
    if flagged:
        ax.plot(*zip(*flagged), label="_degenerate", gid="degenerate", clip_on=False, zorder=3, **DEGENERATE_STYLE)
        handles.append(Line2D([], [], label="predicts one class", **DEGENERATE_STYLE))
    return handles


def flag(degenerate, i: int, j: int) -> bool:
    """Whether the classifier of task j predicted one class after stage i (False where not recorded)."""
    return bool(degenerate is not None and i < len(degenerate) and j < len(degenerate[i]) and degenerate[i][j])


def relative_change(perplexities: list[float | None]) -> list[tuple[int, float]]:
    """(x, 100 * (p / p0 - 1)) for each measured perplexity, p0 the first measured one (x its position)."""
    points = [(x, float(value)) for x, value in enumerate(perplexities) if value is not None]
    p0 = points[0][1]
    return [(x, 100.0 * (value / p0 - 1.0)) for x, value in points]


def draw_perplexity_change(ax, perplexities: list[float | None]) -> None:
    """The relative change panel: points labelled with their value, a zero line, at least +-PPL_MIN_SPAN percent."""
    points = relative_change(perplexities)
    p0 = next(value for value in perplexities if value is not None)
    ax.plot(*zip(*points), marker="s", linestyle="--", color="0.35", gid="perplexity")
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    for x, change in points:
        ax.annotate(f"{change:+.{2 if abs(change) < 10 else 0}f} %", (x, change), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize="x-small")
    values = [change for _, change in points]
    low, high = min(0.0, *values), max(0.0, *values)
    pad = 0.15 * (high - low)
    ax.set_ylim(min(low - pad, -PPL_MIN_SPAN), max(high + pad, PPL_MIN_SPAN))
    ax.set_ylabel("perplexity\nchange (%)")
    ax.set_title(f"perplexity relative to {p0:.2f} ({'before' if perplexities[0] is not None else 'first measured'})",
                 fontsize="small")
    ax.grid(alpha=0.3)
