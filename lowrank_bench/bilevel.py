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
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.optim import make_optimizer

if TYPE_CHECKING:
    from lowrank_bench.stages import Stage
    from lowrank_bench.trainer import Trainer

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


def data_parallel_hypergradient(upper_loss: Callable[[], torch.Tensor], lower_loss: Callable[[], torch.Tensor],
                                upper: Params, lower: Params, mode: str, alpha: float,
                                sum_: Callable[[list[torch.Tensor]], None]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`hypergradient` over data-parallel ranks. Each rank's closures compute its share of the global batches,
    weighted so that their sum over the ranks is the global loss; `sum_` sums tensors over the ranks in place.
    The direct gradient and v are summed before the implicit term, so that every rank perturbs the lower level by
    the same eps v; the finite difference (or the exact Hessian-vector product), linear in the lower loss, is summed
    after it. With one rank (`sum_` a no-op) this is `hypergradient`, operation for operation."""
    if mode not in MODES:
        raise LrbenchError(f"hypergradient mode {mode!r}; valid: {choices(MODES)}")
    loss = upper_loss()
    total = loss.detach().reshape(1).clone()
    if mode == "first_order":
        grads = grads_or_zeros(loss, upper)
        sum_([*grads, total])
        return grads, total[0]
    grads = grads_or_zeros(loss, [*upper, *lower])
    sum_([*grads, total])
    direct, v = grads[: len(upper)], [g.detach() for g in grads[len(upper):]]
    implicit = implicit_term(lower_loss, upper, lower, v, mode, alpha)
    sum_(implicit)
    return [d + i for d, i in zip(direct, implicit)], total[0]


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


def split_data(task, bilevel) -> tuple[list[dict], list[dict], dict]:
    """D_lower and D_upper: a seeded split of the training set, or, with `upper_set`, the whole training set below
    and another split above. Also returns what was chosen (indices, or split names), to save with the run."""
    train = task.train_examples()
    if bilevel.upper_set:
        if bilevel.upper_set not in task.splits:
            raise LrbenchError(f"method.bilevel.upper_set={bilevel.upper_set!r}; splits: {choices(task.splits)}")
        split = {"lower": f"all of {task.train_split}", "upper": f"all of {bilevel.upper_set}"}
        return train, task.splits[bilevel.upper_set], split
    lower_idx, upper_idx = split_indices(len(train), bilevel.lower_fraction, bilevel.seed)
    return [train[i] for i in lower_idx], [train[i] for i in upper_idx], {"lower": lower_idx, "upper": upper_idx}


# -- the step rule ----------------------------------------------------------------------------------------------
class BiLevel:
    """One round: T1 lower steps (V on D_lower), then T2 upper steps (M on D_upper, by the hypergradient). With
    `max_steps` the stage's budget counts rounds; with epochs, passes over D_lower."""

    def __init__(self, loop: "Trainer", stage: "Stage"):
        b = stage.bilevel
        if b.hypergradient not in MODES:
            raise LrbenchError(f"method.bilevel.hypergradient={b.hypergradient!r}; valid: {choices(MODES)}")
        if b.hypergradient == "exact":
            use_eager_attention(loop.model)
        self.loop, self.task, self.b = loop, stage.task, b
        self.lower, self.upper = b.lower, b.upper
        lower_data, upper_data, split = split_data(stage.task, b)  # seeded: the same on every data-parallel rank
        if len(set(loop.dp.gather(json.dumps(split)))) > 1:
            raise LrbenchError("the data-parallel ranks drew different lower/upper splits: their training data "
                               "differ (check that every rank reads the same files)")
        suffix = "" if stage.name == "search" else "_" + stage.name.replace("/", "_")
        if loop.dp.is_main:
            (loop.run_dir / f"bilevel_split{suffix}.json").write_text(json.dumps(split))
        self.sizes = (len(lower_data), len(upper_data))
        self.lower_batches = loop.stream(lower_data, stage.task)
        self.upper_batches = loop.stream(upper_data, stage.task)
        if stage.max_steps:
            self.total_steps = int(stage.max_steps)
        else:
            lower_steps = loop.steps_for(len(lower_data), stage.task, stage.epochs, None)
            self.total_steps = max(1, math.ceil(lower_steps / b.lower_steps))
        self.optimizer, self.scheduler = make_optimizer(self.lower, stage.optimizer, self.total_steps * b.lower_steps)
        self.upper_optimizer, self.upper_scheduler = make_optimizer(self.upper, b.upper_optimizer,
                                                                    self.total_steps * b.upper_steps)
        self.counts = {"lower_steps": 0, "upper_steps": 0}
        self.last_lower_batch: dict | None = None
        self.last_lower_share = 1.0  # under data parallel: this rank's share of that micro-batch

    def lower_step(self) -> torch.Tensor:
        with requires_grad(self.upper, False):  # the lower level neither computes nor applies upper gradients
            loss, samples, self.last_lower_batch = self.loop.accumulate(self.lower_batches, self.task,
                                                                        params=self.lower)
        self.last_lower_share = self.lower_batches.share
        self.loop.optimizer_step(self.optimizer, self.lower)
        self.scheduler.step()
        self.loop.history.samples += samples
        self.counts["lower_steps"] += 1
        return loss

    def upper_step(self) -> torch.Tensor:
        """The finite difference re-evaluates the lower loss on the last micro-batch of the preceding lower step."""
        loop, task = self.loop, self.task
        upper_batch = loop.next_batch(self.upper_batches)
        lower_batch = self.last_lower_batch

        def upper_loss():
            with loop.autocast():
                loss = task.loss(loop.model, upper_batch)
                reg = loop.method.upper_regularizer(loop.model)
            return loss if reg is None else loss + reg

        if loop.dp.active:
            upper_share, lower_share = self.upper_batches.share, self.last_lower_share
            grads, loss = data_parallel_hypergradient(lambda: upper_loss() * upper_share,
                                                      lambda: loop.loss_on(task, lower_batch) * lower_share,
                                                      self.upper, self.lower, self.b.hypergradient,
                                                      self.b.darts_alpha, loop.dp.sum_)
        else:
            grads, loss = hypergradient(upper_loss, lambda: loop.loss_on(task, lower_batch), self.upper, self.lower,
                                        self.b.hypergradient, self.b.darts_alpha)
        for p, g in zip(self.upper, grads):  # autograd.grad left every .grad untouched: set the upper ones
            p.grad = g.to(p.dtype)
        if loop.tc.max_grad_norm:  # the hypergradient is unscaled: no GradScaler on this level
            torch.nn.utils.clip_grad_norm_(self.upper, loop.tc.max_grad_norm)
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad(set_to_none=True)
        self.upper_scheduler.step()
        loop.history.samples += self.upper_batches.last_size if loop.dp.active else task.batch_size_of(upper_batch)
        self.counts["upper_steps"] += 1
        return loss

    def step(self) -> dict[str, torch.Tensor]:
        for _ in range(self.b.lower_steps):
            lower = self.lower_step()
        for _ in range(self.b.upper_steps):
            upper = self.upper_step()
        return {"lower_loss": lower, "upper_loss": upper}

    def lrs(self) -> dict[str, float]:
        return {"lr_lower": self.optimizer.param_groups[0]["lr"], "lr_upper": self.upper_optimizer.param_groups[0]["lr"]}

    def summary(self) -> dict:
        return {"hypergradient": self.b.hypergradient, "lower_size": self.sizes[0], "upper_size": self.sizes[1],
                "T1": self.b.lower_steps, "T2": self.b.upper_steps, **self.counts}

    def state(self) -> tuple[dict, dict[str, torch.Tensor], dict]:
        """What a checkpoint keeps, at a round's boundary (the next round's lower steps set the finite
        difference's micro-batch again): both streams, both schedules, both optimisers, the step counts."""
        lower, lower_t = self.lower_batches.state()
        upper, upper_t = self.upper_batches.state()
        scalars = {"lower": lower, "upper": upper, "counts": dict(self.counts),
                   "scheduler": self.scheduler.state_dict(), "upper_scheduler": self.upper_scheduler.state_dict()}
        tensors = {**{f"lower/{k}": v for k, v in lower_t.items()}, **{f"upper/{k}": v for k, v in upper_t.items()}}
        return scalars, tensors, {"lower": self.optimizer.state_dict(), "upper": self.upper_optimizer.state_dict()}

    def load_state(self, scalars: dict, tensors: dict[str, torch.Tensor], optimizers: dict) -> None:
        for name, stream in (("lower", self.lower_batches), ("upper", self.upper_batches)):
            stream.load_state(scalars[name], {k[len(name) + 1:]: v for k, v in tensors.items()
                                              if k.startswith(name + "/")})
        self.counts = dict(scalars["counts"])
        self.scheduler.load_state_dict(scalars["scheduler"])
        self.upper_scheduler.load_state_dict(scalars["upper_scheduler"])
        self.optimizer.load_state_dict(optimizers["lower"])
        self.upper_optimizer.load_state_dict(optimizers["upper"])
