"""The shape of a run: what it trains, in which order, with which heads, and what its row measures.

`build(cfg)` is the one place that tells one task from a sequence of tasks (`task.family`). Both implement the
protocol of base.py; a new run shape (a sequence with replay, joint multi-task training) is one module here, a line
in SHAPES, its YAML and its test.
"""
from __future__ import annotations

import importlib

from omegaconf import DictConfig

from lowrank_bench.curriculum.base import Curriculum

#: task.family -> the run shape that trains it; every other family is one task (single.SingleTask)
SHAPES = {"continual": "lowrank_bench.curriculum.sequence:Sequence"}
SINGLE = "lowrank_bench.curriculum.single:SingleTask"


def shape(cfg: DictConfig) -> type:
    """The class of the run shape that trains `cfg.task`."""
    module, name = SHAPES.get(cfg.task.get("family"), SINGLE).split(":")
    return getattr(importlib.import_module(module), name)


def build(cfg: DictConfig) -> Curriculum:
    """The curriculum of a run's config (`cfg`: the whole config; a shape reads the groups it needs)."""
    return shape(cfg)(cfg)


def has_one_head(cfg: DictConfig) -> bool:
    """Whether the run trains one head (what export needs), from the config alone."""
    return shape(cfg).one_head
