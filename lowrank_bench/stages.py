"""What a run trains, in order: a list of stages.

A stage names its task, the parameter groups it trains (every other parameter is frozen while it runs), its
optimiser settings, its step budget and its step rule: single-level, or bi-level (T1 lower steps on one part of
the training data, then T2 upper steps by the hypergradient on the other). Single-level runs are one stage;
BiDoRA with retraining is two (the bi-level search, then the direction retrained with the magnitudes frozen); a
continual sequence is one (or two) per task. The trainer runs any list of them with one loop.

This module is where the config groups meet: `stages_for` reads the method's, the optimiser's and the trainer's
settings and hands each stage only what it needs. It also holds the budget rule (`steps_for`, trainer.py's
docstring): `stages_for` applies it as soon as the stages exist (after tokenisation: the rule needs the training
set's size), so an impossible budget is refused before the run folder is made; the trainer applies it again
before the first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from lowrank_bench.bilevel import BiLevel, split_data
from lowrank_bench.errors import LrbenchError
from lowrank_bench.single_level import SingleLevel
from lowrank_bench.tasks.base import Task

Params = list[torch.nn.Parameter]


@dataclass
class BiLevelSettings:
    """The bi-level step rule's settings: which parameters each level trains and how the levels alternate."""

    lower: Params
    upper: Params
    lower_fraction: float
    upper_set: str | None
    lower_steps: int  # T1
    upper_steps: int  # T2
    hypergradient: str
    darts_alpha: float
    upper_optimizer: DictConfig
    seed: int  # of the lower/upper split
    perturb: str = "trainable"  # what the implicit term differentiates and perturbs: trainable | whole_model


@dataclass
class Stage:
    name: str
    task: Task
    trainable: dict[str, Params]  # by role
    optimizer: DictConfig
    epochs: float
    max_steps: int | None = None  # wins over epochs; with a bi-level rule it counts rounds (T1 + T2 steps)
    rule: type = SingleLevel  # the step rule the trainer builds, rule(trainer, stage): SingleLevel or BiLevel
    bilevel: BiLevelSettings | None = None  # BiLevel's settings
    snapshot: Params = field(default_factory=list)  # parameters whose values at this stage's start are kept ...
    restore_from: str | None = None  # ... and copied back in when a later stage names this one here
    head: str | None = None  # the task head to put in place (continual runs keep one per task)

    @property
    def params(self) -> Params:
        return unique(p for group in self.trainable.values() for p in group)

    def budget_examples(self) -> int:
        """The examples one epoch of this stage passes over: the training split, or a bi-level stage's lower part
        (its seeded split, drawn here as the step rule draws it)."""
        if self.bilevel is None:
            return len(self.task.train_examples())
        return len(split_data(self.task, self.bilevel)[0])

    def total_steps(self, batch_size: int, grad_accum: int, n_examples: int | None = None) -> int:
        """The stage's loop steps under the budget rule (`steps_for`): optimiser steps, or for a bi-level stage
        rounds of T1 lower and T2 upper steps (epochs count passes over the lower part)."""
        n = self.budget_examples() if n_examples is None else n_examples
        epochs_key = "trainer.epochs" if self.name in ("train", "search") else "epochs"
        where = self.task.name if self.name in ("train", "search") else f"{self.task.name} (stage '{self.name}')"
        if self.bilevel is None:
            return steps_for(n, batch_size, grad_accum, self.epochs, self.max_steps, where, epochs_key)
        t1 = self.bilevel.lower_steps
        lower = steps_for(n, batch_size, grad_accum, self.epochs, self.max_steps and int(self.max_steps) * t1,
                          f"the lower level of {where}", epochs_key)
        return int(self.max_steps) if self.max_steps else max(1, math.ceil(lower / t1))


def steps_for(n_examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None,
              where: str, epochs_key: str = "trainer.epochs") -> int:
    """The budget rule: a stage's optimiser steps over `n_examples` training examples (trainer.py's docstring).

    An optimiser step averages `grad_accum` batches of `batch_size`; an epoch is ceil(n / batch_size) batches, so
    ceil(batches / grad_accum) optimiser steps. `grad_accum` larger than an epoch's batches is refused (one step
    would count examples more than once, and an "epoch" would be many passes over the data), with or without
    `max_steps`. `max_steps` wins over epochs. Otherwise the stage takes round(epochs x steps per epoch) steps,
    halves rounded up: fractional epochs are honoured, the last epoch partial (2.7 epochs of 10 steps: 27 steps);
    integer epochs give what they always gave. A budget that rounds to no step at all is refused, naming the least
    number of epochs that makes one."""
    if n_examples == 0:
        raise LrbenchError(f"task {where} has an empty training split")
    batches = math.ceil(n_examples / batch_size)
    if grad_accum > batches:
        raise LrbenchError(f"trainer.grad_accum={grad_accum} is more than the {batches} batch(es) of one epoch of "
                           f"{where} ({n_examples} training examples, trainer.batch_size={batch_size}): one optimiser "
                           f"step would count examples more than once; valid: trainer.grad_accum <= {batches}, or a "
                           f"smaller trainer.batch_size")
    if max_steps:
        return int(max_steps)
    per_epoch = math.ceil(batches / grad_accum)
    exact = round(float(epochs) * per_epoch, 9)  # (2.7 x 10 is 27.000000000000004)
    steps = math.floor(exact + 0.5)
    if steps < 1:
        least = math.ceil(0.5 / per_epoch * 1e4) / 1e4
        raise LrbenchError(f"{epochs_key}={epochs} is {exact:.3g} of an optimiser step of {where} ({per_epoch} "
                           f"step(s) per epoch: {n_examples} examples, trainer.batch_size={batch_size}, "
                           f"trainer.grad_accum={grad_accum}); valid: epochs >= {least:g} (half a step rounds up to "
                           f"one), or trainer.max_steps")
    return steps


def check_budgets(stages: list[Stage], trainer: DictConfig | None) -> None:
    """Refuse an impossible budget now, before the run folder is made (a no-op without the trainer's settings:
    the trainer checks again before the first step)."""
    if trainer is None or trainer.get("batch_size") is None:
        return
    for stage in stages:
        stage.total_steps(int(trainer.batch_size), int(trainer.get("grad_accum") or 1))


def unique(params) -> Params:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def params_of(method, groups: dict[str, Params], level: str) -> Params:
    roles = method.levels[level]
    params = [p for role in roles for p in groups.get(role, [])]
    if not params:
        raise LrbenchError(f"{method.name}: no trainable parameters at the {level} level (roles {roles})")
    return params


def overridden(base: DictConfig, **values) -> DictConfig:
    """`base` with the values that are not None put over it."""
    return OmegaConf.merge(base, {k: v for k, v in values.items() if v is not None})


def stages_for(task: Task, method, groups: dict[str, Params], method_cfg: DictConfig, optimizer: DictConfig,
               epochs: float, max_steps: int | None, seed: int, name: str = "train", head: str | None = None,
               trainer: DictConfig | None = None) -> list[Stage]:
    """One task's stages: a single-level stage, or the bi-level search and, when enabled, the retraining. Their
    budgets are checked against the trainer's batch size and accumulation (`trainer`: the config's trainer group;
    without it the trainer checks before its first step)."""
    stages = plan_stages(task, method, groups, method_cfg, optimizer, epochs, max_steps, seed, name, head)
    check_budgets(stages, trainer)
    return stages


def plan_stages(task: Task, method, groups: dict[str, Params], method_cfg: DictConfig, optimizer: DictConfig,
                epochs: float, max_steps: int | None, seed: int, name: str, head: str | None) -> list[Stage]:
    if not method.levels:
        return [Stage(name, task, groups, optimizer, epochs, max_steps, head=head)]
    bc = method_cfg.bilevel
    lower, upper = params_of(method, groups, "lower"), params_of(method, groups, "upper")
    rule = BiLevelSettings(lower, upper, bc.lower_fraction, bc.get("upper_set"), int(bc.lower_steps),
                           int(bc.upper_steps), bc.hypergradient, bc.darts_alpha,
                           overridden(optimizer, **bc.upper_optimizer), seed, bc.get("perturb") or "trainable")
    search = Stage("search" if name == "train" else name, task, groups, optimizer, epochs, max_steps, BiLevel, rule,
                   head=head)
    rc = method_cfg.get("retrain")
    if not (rc and rc.enabled):
        return [search]
    # retraining: direction and head restart from their values before the search, magnitudes frozen
    search.snapshot = lower
    lower_roles = {role: groups[role] for role in method.levels["lower"] if role in groups}
    retrain = Stage("retrain" if name == "train" else f"{name}/retrain", task, lower_roles,
                    overridden(optimizer, lr=rc.lr, weight_decay=rc.weight_decay), rc.epochs or epochs, rc.max_steps,
                    restore_from=search.name, head=head)
    return [search, retrain]
