"""What a run trains, in order: a list of stages.

A stage names its task, the parameter groups it trains (every other parameter is frozen while it runs), its
optimiser settings, its step budget and its step rule: single-level, or bi-level (T1 lower steps on one part of
the training data, then T2 upper steps by the hypergradient on the other). Single-level runs are one stage;
BiDoRA with retraining is two (the bi-level search, then the direction retrained with the magnitudes frozen); a
continual sequence is one (or two) per task. The trainer runs any list of them with one loop.

This module is where the config groups meet: `stages_for` reads the method's, the optimiser's and the trainer's
settings and hands each stage only what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from lowrank_bench.bilevel import BiLevel
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
               ) -> list[Stage]:
    """One task's stages: a single-level stage, or the bi-level search and, when enabled, the retraining."""
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
