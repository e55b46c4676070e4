"""The single-level step rule: one optimiser step of every trainable parameter of the stage (bilevel.py holds the
bi-level one). A rule is built by the trainer from the stage that names it, `rule(loop, stage)`, and answers `step`,
`lrs`, `summary`, `state` and `load_state`; `loop` is the trainer, whose accumulation, optimiser step and data
streams it uses.
"""
from __future__ import annotations

import torch

from lowrank_bench.optim import make_optimizer
from lowrank_bench.checkpoint import within


class SingleLevel:
    """One optimiser step of every trainable parameter of the stage over `grad_accum` micro-batches."""

    def __init__(self, loop, stage):
        self.loop, self.task, self.params = loop, stage.task, stage.params
        train = stage.task.train_examples()
        self.total_steps = loop.steps_for(stage, len(train))  # the budget rule: stages.steps_for
        self.batches = loop.stream(train, stage.task)
        self.optimizer, self.scheduler = make_optimizer(self.params, stage.optimizer, self.total_steps)

    def step(self) -> dict[str, torch.Tensor]:
        loss, samples, _ = self.loop.accumulate(self.batches, self.task, params=self.params)
        self.loop.optimizer_step(self.optimizer, self.params)
        self.scheduler.step()
        self.loop.history.samples += samples
        return {"loss": loss}

    def lrs(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def summary(self) -> dict:
        return {}

    def state(self) -> tuple[dict, dict[str, torch.Tensor], dict]:
        """JSON scalars, tensors and optimiser states: what a checkpoint keeps of this rule."""
        scalars, tensors = self.batches.state()
        return ({"train": scalars, "scheduler": self.scheduler.state_dict()},
                {f"train/{k}": v for k, v in tensors.items()}, {"optimizer": self.optimizer.state_dict()})

    def load_state(self, scalars: dict, tensors: dict[str, torch.Tensor], optimizers: dict) -> None:
        self.batches.load_state(scalars["train"], within(tensors, "train/"))
        self.scheduler.load_state_dict(scalars["scheduler"])
        self.optimizer.load_state_dict(optimizers["optimizer"])
