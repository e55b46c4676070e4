"""Evaluations of a run's model apart from its task's: after training, and before it when asked. One protocol,

    before(model, trainer_cfg) -> dict      the model as loaded, before the method is applied ({} unless asked)
    after(model, device, autocast) -> dict  the trained model: the row's columns
    write(run_dir)                          its own file in the run folder

so that the runner holds a list of them and never asks which. Today one kind: `eval=mc/<benchmark>`, 0-shot
multiple choice (multiple_choice.py). A new kind is a module here, a line in `build` and its config group.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from lowrank_bench.evaluations import multiple_choice


class PostTrainingEval(Protocol):
    def before(self, model, trainer_cfg) -> dict: ...

    def after(self, model, device, autocast) -> dict: ...

    def write(self, run_dir: Path) -> Path: ...


def build(cfg, tokenizer, head) -> list[PostTrainingEval]:
    """The evaluations a run's config asks for; each reads its items here, so a bad one fails before training."""
    evaluator = multiple_choice.build(cfg, tokenizer, head)
    return [evaluator] if evaluator else []
