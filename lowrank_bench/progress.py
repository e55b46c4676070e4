"""Progress of the long loops besides training's: evaluation, generation, multiple-choice scoring, perplexity.

One transient rich bar per loop on the run's console (stderr; gone when the loop ends), shown under training's bar
while that one is live (rich >= 14.1 nests live displays; with an older rich the inner bar is left out). Where the
console is not a terminal (a log file, a pipe, a SLURM job) a bar is a few plain lines instead (`LineProgress`). The switch
is training's, `trainer.progress`: each command that reads a config calls `configure(cfg.trainer)` before any work
(evaluate.py for `mode=eval`); `enabled` then also decides the Hub's download bars (models.quiet_transformers).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from rich.errors import LiveError
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from lowrank_bench.console import console

T = TypeVar("T")
enabled = True


def configure(trainer_cfg) -> None:
    """Follow the command's `trainer.progress` (true when unset)."""
    global enabled
    enabled = bool(trainer_cfg.get("progress", True))


class LineProgress(Progress):
    """Progress for a console that is not a terminal: no live bar, a plain line when a task ends and, while it runs,
    at each further tenth of its total once `every_s` seconds have passed since the last line
    (`lora · train: 120/600 (20%) 00:00:41 loss=0.6931 ...`)."""

    every_s = 30.0

    def __init__(self, *columns, **kwargs):
        super().__init__(*columns, **{**kwargs, "disable": True})  # tasks are still counted; nothing is drawn
        self.shown: dict[TaskID, tuple[int, float]] = {}  # per task: the last tenth reported, and when

    def update(self, task_id: TaskID, *args, **kwargs) -> None:
        super().update(task_id, *args, **kwargs)
        self.report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self.report(task_id)

    def report(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if not task.total:
            return
        tenth, now = int(10 * task.completed / task.total), time.monotonic()
        last_tenth, last_time = self.shown.get(task_id, (0, now))
        self.shown.setdefault(task_id, (0, now))
        if tenth <= last_tenth or (task.completed < task.total and now - last_time < self.every_s):
            return
        self.shown[task_id] = (tenth, now)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0))
        console.print(f"{task.description}: {task.completed:g}/{task.total:g} ({task.percentage:.0f}%) {elapsed} "
                      f"{task.fields.get('info', '')}".rstrip(), markup=False, highlight=False)


def display(*columns, transient: bool = False, disable: bool = False) -> Progress:
    """A rich Progress on a terminal, `LineProgress` elsewhere; nothing at all where `disable`."""
    kind = Progress if console.is_terminal or disable else LineProgress
    return kind(*columns, console=console, transient=transient, disable=disable)


def started(description: str, total: int | None) -> Progress:
    progress = display(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), transient=True, disable=not enabled)
    try:
        progress.start()
    except LiveError:  # rich < 14.1 while training's bar is live
        progress = Progress(console=console, disable=True)
    progress.add_task(description, total=total)
    return progress


@contextmanager
def bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """`with bar("generating e2e", len(prompts)) as advance: ... advance(len(batch))` (total None: no end known)."""
    progress = started(description, total)
    try:
        yield lambda n=1: progress.advance(progress.task_ids[0], n)
    finally:
        progress.stop()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """`items` one by one under a bar (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(description, total) as advance:
        for item in items:
            yield item
            advance()
