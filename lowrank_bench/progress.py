"""Progress of the long loops besides training's: evaluation, generation, multiple-choice scoring, perplexity.

One transient rich bar per loop on the run's console (stderr; gone when the loop ends), shown under training's bar
while that one is live (rich >= 14.1 nests live displays; with an older rich the inner bar is left out). The switch
is training's, `trainer.progress`: each command that reads a config calls `configure(cfg.trainer)` before any work
(evaluate.py for `mode=eval`); `enabled` then also decides the Hub's download bars (models.quiet_transformers).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowrank_bench.console import console

T = TypeVar("T")
enabled = True


def configure(trainer_cfg) -> None:
    """Follow the command's `trainer.progress` (true when unset)."""
    global enabled
    enabled = bool(trainer_cfg.get("progress", True))


def started(description: str, total: int | None) -> Progress:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                        disable=not enabled)
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
