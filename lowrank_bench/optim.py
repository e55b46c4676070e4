"""Optimisers and schedules: AdamW (decay on matrices only) with linear warmup, then linear, cosine or constant."""
from __future__ import annotations

import math
from functools import partial

import torch

from lowrank_bench.errors import LrbenchError, choices

SCHEDULES = ("linear", "cosine", "constant")


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)  # linear decay to zero


def make_optimizer(params: list[torch.nn.Parameter], cfg, total_steps: int):
    """AdamW over `params` and its LambdaLR schedule, sized for `total_steps` optimiser steps.

    `warmup_steps` wins over `warmup_ratio`; `schedule_steps` (when set) sizes the schedule instead of the real
    budget: CURLoRA's released notebooks size it for the full dataset while training on 1,000 rows, so their
    warmup never ends (`task=continual/curlora task.protocol=notebook`)."""
    if not params:
        raise LrbenchError("no trainable parameters for an optimizer: check method.targets and the task's head")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    wd_1d = cfg.weight_decay if cfg.decay_vectors else 0.0
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": wd_1d}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    total = int(cfg.get("schedule_steps") or total_steps)
    warmup = cfg.warmup_steps if cfg.get("warmup_steps") is not None else int(cfg.warmup_ratio * total)
    schedule = cfg.schedule
    if schedule not in SCHEDULES:
        raise LrbenchError(f"optimizer.schedule={schedule!r}; valid: {choices(SCHEDULES)}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=warmup, total=total, schedule=schedule))
    return optimizer, scheduler
