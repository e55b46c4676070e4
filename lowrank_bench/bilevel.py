"""Bi-level optimisation (BiDoRA, BiLoRA): two parameter groups trained at two levels on two disjoint parts of the
training data,

    lower:  V*(M) = argmin_V  L_lower(V, M)  on D_lower   (+ the method's regulariser)
    upper:  min_M  L_upper(V*(M), M)          on D_upper

alternating T1 lower steps with T2 upper steps, each level with its own optimizer and schedule. The upper gradient
is the direct gradient plus an implicit term (Betty's `darts` reading of DARTS, inverse Hessian ~ identity, no inner
learning-rate factor):

    v        = dL_upper / dV
    implicit = -(d/dM) [ (dL_lower/dV) . v ]
             ~ -( dL_lower/dM (V + eps v) - dL_lower/dM (V - eps v) ) / (2 eps),   eps = alpha / ||v||

`darts` is the finite difference (two extra forward/backward passes), `exact` the same term by double backward
(a Hessian-vector product, for verification), `first_order` drops it. Unlike Betty, which perturbs every parameter
of the lower module (the whole frozen backbone included), we perturb only the lower level's trainable parameters,
which is what the papers' V = {Delta V} means.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf

from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.trainer import History, Trainer, endless, make_optimizer

MODES = ("darts", "exact", "first_order")
Params = Sequence[torch.nn.Parameter]


# -- the hypergradient, independent of models and data ---------------------------------------------------------
@contextmanager
def requires_grad(params: Params, flag: bool):
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, prev in zip(params, previous):
            p.requires_grad_(prev)


def grads_or_zeros(loss: torch.Tensor, params: Params, **kwargs) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class ReplayRandomness:
    """Replays the same RNG stream (dropout masks) for every evaluation of the lower loss in a finite difference."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __call__(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def implicit_term(lower_loss: Callable[[], torch.Tensor], upper: Params, lower: Params, v: list[torch.Tensor],
                  mode: str, alpha: float = 0.01) -> list[torch.Tensor]:
    """-(d^2 L_lower / dM dV) v for the upper parameters M, by finite difference (`darts`) or exactly."""
    if mode == "exact":
        with requires_grad(lower, True):
            g_lower = grads_or_zeros(lower_loss(), lower, create_graph=True)
            dot = sum((g * vi).sum() for g, vi in zip(g_lower, v))
            return [-h for h in grads_or_zeros(dot, upper)]
    norm = torch.sqrt(sum((vi.float() ** 2).sum() for vi in v))
    if norm == 0:
        return [torch.zeros_like(p) for p in upper]
    eps = alpha / norm
    replay = ReplayRandomness()
    original = [p.detach().clone() for p in lower]  # restored by copy: V + e v - e v != V in floating point

    def upper_grad_at(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, p0, vi in zip(lower, original, v):
                p.copy_(p0 + (sign * eps) * vi.to(p.dtype))
        replay()
        with requires_grad(lower, False):
            return grads_or_zeros(lower_loss(), upper)

    plus, minus = upper_grad_at(+1.0), upper_grad_at(-1.0)
    with torch.no_grad():
        for p, p0 in zip(lower, original):
            p.copy_(p0)
    return [-(gp - gm) / (2 * eps) for gp, gm in zip(plus, minus)]


def hypergradient(upper_loss: Callable[[], torch.Tensor], lower_loss: Callable[[], torch.Tensor], upper: Params,
                  lower: Params, mode: str = "darts", alpha: float = 0.01) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradient of the upper loss w.r.t. the upper parameters, with the implicit term of `mode`."""
    if mode not in MODES:
        raise LrbenchError(f"hypergradient mode {mode!r}; valid: {choices(MODES)}")
    loss = upper_loss()
    if mode == "first_order":
        return grads_or_zeros(loss, upper), loss.detach()
    grads = grads_or_zeros(loss, [*upper, *lower])
    direct, v = grads[: len(upper)], [g.detach() for g in grads[len(upper):]]
    implicit = implicit_term(lower_loss, upper, lower, v, mode, alpha)
    return [d + i for d, i in zip(direct, implicit)], loss.detach()


def use_eager_attention(model: torch.nn.Module) -> None:
    """Fused attention kernels have no double backward; the exact Hessian-vector product needs plain attention."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


# -- data split -------------------------------------------------------------------------------------------------
def split_indices(n: int, lower_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0.0 < lower_fraction < 1.0:
        raise LrbenchError(f"method.bilevel.lower_fraction={lower_fraction} must lie strictly between 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(lower_fraction * n))
    if cut == 0 or cut == n:
        raise LrbenchError(f"a training set of {n} examples cannot be split {lower_fraction:.2f}/{1 - lower_fraction:.2f}")
    return sorted(order[:cut]), sorted(order[cut:])


# -- the trainer ------------------------------------------------------------------------------------------------
class BilevelTrainer(Trainer):
    """Alternates T1 lower steps (V on D_lower) with T2 upper steps (M on D_upper); optionally retrains V."""

    def setup(self) -> None:
        bc = self.cfg.method.bilevel
        self.mode, self.alpha = bc.hypergradient, bc.darts_alpha
        if self.mode not in MODES:
            raise LrbenchError(f"method.bilevel.hypergradient={self.mode!r}; valid: {choices(MODES)}")
        self.T1, self.T2 = int(bc.lower_steps), int(bc.upper_steps)
        if self.mode == "exact":
            use_eager_attention(self.model)
        self.lower, self.upper = self.params_of("lower"), self.params_of("upper")
        lower_data, upper_data = self.split_data(bc)
        self.sizes = (len(lower_data), len(upper_data))
        self.lower_batches = endless(self.loader(lower_data))
        self.upper_batches = endless(self.loader(upper_data))
        if self.cfg.trainer.get("max_steps"):  # a step is one round: T1 lower steps, then T2 upper steps
            self.total_steps = int(self.cfg.trainer.max_steps)
        else:  # epochs count passes over the lower level's data
            self.total_steps = max(1, math.ceil(self.steps_for(len(lower_data)) / self.T1))
        self.optimizer, self.scheduler = make_optimizer(self.lower, self.cfg.optimizer, self.total_steps * self.T1)
        upper_cfg = OmegaConf.merge(self.cfg.optimizer, {k: v for k, v in bc.upper_optimizer.items() if v is not None})
        self.upper_optimizer, self.upper_scheduler = make_optimizer(self.upper, upper_cfg, self.total_steps * self.T2)
        self.initial_lower = [p.detach().clone() for p in self.lower]  # for the retraining phase
        self.phase = "search"
        self.counts = {"lower_steps": 0, "upper_steps": 0, "retrain_steps": 0}

    def split_data(self, bc) -> tuple[list[dict], list[dict]]:
        """D_lower and D_upper: a seeded split of the training set (indices saved with the run), or, with
        `upper_set`, the whole training set below and another split above."""
        train = self.task.splits[self.task.train_split]
        if bc.get("upper_set"):
            if bc.upper_set not in self.task.splits:
                raise LrbenchError(f"method.bilevel.upper_set={bc.upper_set!r}; splits: {choices(self.task.splits)}")
            split = {"lower": f"all of {self.task.train_split}", "upper": f"all of {bc.upper_set}"}
            lower, upper = train, self.task.splits[bc.upper_set]
        else:
            lower_idx, upper_idx = split_indices(len(train), bc.lower_fraction, self.cfg.seed)
            split = {"lower": lower_idx, "upper": upper_idx}
            lower, upper = [train[i] for i in lower_idx], [train[i] for i in upper_idx]
        (self.run_dir / "bilevel_split.json").write_text(json.dumps(split))
        return lower, upper

    def params_of(self, level: str) -> list[torch.nn.Parameter]:
        roles = self.method.levels[level]
        params = [p for role in roles for p in self.groups.get(role, [])]
        if not params:
            raise LrbenchError(f"{self.method.name}: no trainable parameters at the {level} level (roles {roles})")
        return params

    # -- one round: T1 lower steps, then T2 upper steps --------------------------------------------------------
    def lower_step(self) -> torch.Tensor:
        with requires_grad(self.upper, False):  # the lower level neither computes nor applies upper gradients
            loss, samples = self.accumulate(self.lower_batches, self.cfg.trainer.grad_accum)
        self.optimizer_step(self.optimizer, self.lower)
        self.scheduler.step()
        self.history.samples += samples
        self.counts["lower_steps"] += 1
        return loss

    def upper_step(self) -> torch.Tensor:
        upper_batch = self.next_batch(self.upper_batches)
        lower_batch = self.last_lower_batch

        def upper_loss():
            with self.autocast():
                loss = self.task.loss(self.model, upper_batch)
                reg = self.method.upper_regularizer(self.model)
            return loss if reg is None else loss + reg

        grads, loss = hypergradient(upper_loss, lambda: self.loss_on(lower_batch), self.upper, self.lower,
                                    self.mode, self.alpha)
        for p, g in zip(self.upper, grads):  # autograd.grad left every .grad untouched: set the upper ones
            p.grad = g.to(p.dtype)
        if self.cfg.trainer.max_grad_norm:  # the hypergradient is unscaled: no GradScaler on this level
            torch.nn.utils.clip_grad_norm_(self.upper, self.cfg.trainer.max_grad_norm)
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad(set_to_none=True)
        self.upper_scheduler.step()
        self.history.samples += upper_batch["input_ids"].shape[0]
        self.counts["upper_steps"] += 1
        return loss

    def next_batch(self, batches) -> dict:
        batch = super().next_batch(batches)
        if batches is self.lower_batches:
            self.last_lower_batch = batch
        return batch

    def train_step(self) -> dict[str, torch.Tensor]:
        if self.phase == "retrain":
            loss = self.lower_step()
            self.counts["retrain_steps"] += 1
            return {"loss": loss}
        for _ in range(self.T1):
            lower = self.lower_step()
        for _ in range(self.T2):
            upper = self.upper_step()
        return {"lower_loss": lower, "upper_loss": upper}

    def lrs(self) -> dict[str, float]:
        if self.phase == "retrain":
            return {"lr": self.optimizer.param_groups[0]["lr"]}
        return {"lr_lower": self.optimizer.param_groups[0]["lr"], "lr_upper": self.upper_optimizer.param_groups[0]["lr"]}

    # -- phases ---------------------------------------------------------------------------------------------
    def fit(self) -> History:
        search = super().fit()
        rc = self.cfg.method.get("retrain")
        if not (rc and rc.enabled):
            return search
        self.start_retraining(rc)
        search_memory = self.memory
        retrain = super().fit()
        self.memory.peak_bytes = max(self.memory.peak_bytes, search_memory.peak_bytes)
        retrain.train_steps += search.train_steps
        retrain.train_seconds += search.train_seconds
        retrain.samples += search.samples
        return retrain

    def start_retraining(self, rc) -> None:
        """Direction and head restart from their pre-search state and train on the full training set; the
        learned upper-level parameters (magnitudes) stay frozen."""
        with torch.no_grad():
            for p, p0 in zip(self.lower, self.initial_lower):
                p.copy_(p0)
        for p in self.upper:
            p.requires_grad_(False)
        self.phase = "retrain"
        train = self.task.splits[self.task.train_split]
        self.lower_batches = endless(self.loader(train))
        steps = int(rc.max_steps) if rc.get("max_steps") else self.steps_for_epochs(len(train), rc.epochs)
        self.total_steps = steps
        opt_cfg = OmegaConf.merge(self.cfg.optimizer, {k: v for k, v in (("lr", rc.lr), ("weight_decay", rc.weight_decay))
                                                       if v is not None})
        self.optimizer, self.scheduler = make_optimizer(self.lower, opt_cfg, steps)

    def steps_for_epochs(self, n: int, epochs) -> int:
        tc = self.cfg.trainer
        return max(1, math.ceil(n / (tc.batch_size * tc.grad_accum)) * int(epochs or tc.epochs))

    def record_extras(self) -> dict:
        return {"phase": self.phase}

    def extra_summary(self) -> dict:
        return {"hypergradient": self.mode, "lower_size": self.sizes[0], "upper_size": self.sizes[1],
                "T1": self.T1, "T2": self.T2, **self.counts}
