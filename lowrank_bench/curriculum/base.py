"""The protocol every run shape implements: the runner (assembly.py, train.py, evaluate.py) calls these and never
asks which shape it holds.

    tasks            the tasks to prepare (tokenise) before the model is built
    head             the head the model is built with (the first task's); `one_head`: whether it is the only one
    name, metric     the row's task and the metric that ranks the run
    attach_heads     the heads it trains (one, or one per task) -> (parameter groups, head parameters)
    plan             the stages, in order
    activate_head    what puts a stage's head in place (None: one head)
    attach           its stage-end hooks and checkpointed state on the trainer; the run folder to its tasks
    before_training  measurements before the first stage (a fresh run only; a resumed one has them)
    measures         the row's measures of a finished run; `partial_measures` of a diverged one
    tables           what goes into summary.json only (confusion matrices, NER's F1 per type)
    write_files      its own files in the run folder (rank 0, finished runs)
    before_save      the state the adapter file is saved in
    score            `mode=eval`: (main metric, every measure) of a rebuilt model
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

from lowrank_bench.models import Head
from lowrank_bench.stages import Stage
from lowrank_bench.tasks.base import Task

Params = list[torch.nn.Parameter]


class Curriculum(Protocol):
    tasks: list[Task]
    head: Head
    one_head: bool
    name: str
    metric: str
    activate_head: Callable[[str], None] | None

    def attach_heads(self, model: torch.nn.Module, head_modules: list[str], groups: dict[str, Params],
                     ) -> tuple[dict[str, Params], Params]: ...

    def plan(self, cfg, method, groups: dict[str, Params]) -> list[Stage]: ...

    def attach(self, trainer, run_dir: Path, tokenizer) -> None: ...

    def before_training(self) -> None: ...

    def measures(self, history) -> dict: ...

    def partial_measures(self, history) -> dict: ...

    def tables(self, history) -> dict: ...

    def write_files(self, run_dir: Path, logger) -> None: ...

    def before_save(self) -> None: ...

    def score(self, model: torch.nn.Module, **kwargs) -> tuple[str, dict]: ...
