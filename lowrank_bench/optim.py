"""Optimisers and schedules: AdamW (decay on matrices only) with linear warmup, then linear, cosine or constant.

Where eps enters (`optimizer.eps_on`): torch's AdamW divides the bias-corrected moments, m_hat / (sqrt(v_hat) + eps)
(`v_hat`, the default); the AdamW of transformers < 5 (`correct_bias=True`), which microsoft/LoRA's, BiDoRA's and
CURLoRA's code use, adds eps to the raw sqrt(v) and corrects the step size instead,
lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps) (`v`). That is torch's update with eps_t = eps / sqrt(1 - b2^t):
30x eps at step 1 for b2 = 0.999, eps itself after a few thousand steps.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from lowrank_bench.errors import LrbenchError, choices

SCHEDULES = ("linear", "cosine", "constant")
EPS_ON = ("v_hat", "v")


class RawEpsAdamW(torch.optim.AdamW):
    """torch's AdamW with eps added to sqrt(v) before the bias correction, as transformers' old AdamW (see above).
    Exact for weight_decay 0; with decay, torch shrinks the weights before the update where transformers shrinks
    them after it (a difference of order lr^2 * weight_decay)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("raw_eps", group["eps"])  # kept in the state dict, so a resumed run continues it

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            steps = [self.state[p]["step"] for p in group["params"] if p.grad is not None and "step" in self.state[p]]
            t = (float(steps[0]) if steps else 0.0) + 1.0  # the step about to be taken
            group["eps"] = group["raw_eps"] / math.sqrt(1.0 - group["betas"][1] ** t)
        return super().step(closure)


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
    if cfg.eps_on not in EPS_ON:
        raise LrbenchError(f"optimizer.eps_on={cfg.eps_on!r}; valid: {choices(EPS_ON)}")
    adamw = RawEpsAdamW if cfg.eps_on == "v" else torch.optim.AdamW
    optimizer = adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    total = int(cfg.get("schedule_steps") or total_steps)
    warmup = cfg.warmup_steps if cfg.get("warmup_steps") is not None else int(cfg.warmup_ratio * total)
    schedule = cfg.schedule
    if schedule not in SCHEDULES:
        raise LrbenchError(f"optimizer.schedule={schedule!r}; valid: {choices(SCHEDULES)}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=warmup, total=total, schedule=schedule))
    return optimizer, scheduler
