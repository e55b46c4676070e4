"""The bi-level step rule (BiDoRA, BiLoRA): two parameter groups trained at two levels on two disjoint parts of the
training data, T1 lower steps (w on D_lower) then T2 upper steps (λ on D_upper, by the hypergradient of
hypergradient.py), each level with its own optimizer and schedule; the seeded lower/upper split.
"""
from __future__ import annotations

import json

import torch

from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.hypergradient import (IMPLICIT_DEFAULTS, NEEDS_DOUBLE_BACKWARD, Params, canonical_mode,
                                         hypergradient, requires_grad)
from lowrank_bench.optim import make_optimizer

PERTURBATIONS = ("trainable", "whole_model")  # method.bilevel.perturb: see hypergradient.py's docstring


def use_eager_attention(model: torch.nn.Module) -> None:
    """Fused attention kernels have no double backward; the exact Hessian-vector products need plain attention."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def perturbed_parameters(model: torch.nn.Module, lower: Params, upper: Params, perturb: str) -> list:
    """w of the implicit term (`method.bilevel.perturb`, see hypergradient.py's docstring): the lower level's
    parameters (`trainable`), or every parameter of `model` but the upper level's (`whole_model`, Betty's), lower ones
    included even if the model did not hold them."""
    if perturb == "trainable":
        return list(lower)
    if perturb != "whole_model":
        raise LrbenchError(f"method.bilevel.perturb={perturb!r}; valid: {choices(PERTURBATIONS)}")
    upper_ids = {id(p) for p in upper}
    params = [p for p in model.parameters() if id(p) not in upper_ids]
    held = {id(p) for p in params}
    return params + [p for p in lower if id(p) not in held]


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
def implicit_options(bilevel_cfg) -> dict:
    """The implicit modes' settings from the method config's `bilevel:` block (absent keys: the defaults)."""
    return {key: type(default)(bilevel_cfg.get(key, default)) for key, default in IMPLICIT_DEFAULTS.items()}


class BiLevel:
    """One round: T1 lower steps (V on D_lower), then T2 upper steps (M on D_upper, by the hypergradient). With
    `max_steps` the stage's budget counts rounds; with epochs, passes over D_lower (`Stage.total_steps`)."""

    def __init__(self, loop, stage):  # (the trainer and the stage: typed by their modules, which import this one)
        b = stage.bilevel
        self.mode = canonical_mode(b.hypergradient, "method.bilevel.hypergradient")
        if self.mode in NEEDS_DOUBLE_BACKWARD:
            use_eager_attention(loop.model)
        self.options = implicit_options(loop.method.cfg.get("bilevel") or {})
        self.loop, self.task, self.b = loop, stage.task, b
        self.lower, self.upper = b.lower, b.upper
        self.perturb = b.perturb
        self.perturbed = perturbed_parameters(loop.model, b.lower, b.upper, b.perturb)  # w of the implicit term
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
        self.total_steps = loop.steps_for(stage, len(lower_data))  # rounds; the budget rule: stages.steps_for
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
        loop, task = self.loop, self.task
        upper_batch = loop.next_batch(self.upper_batches)
        grads, loss = self.upper_gradient(upper_batch, self.last_lower_batch)
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

    def upper_gradient(self, upper_batch: dict, lower_batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The hypergradient on an upper batch; its lower-loss evaluations (finite differences, virtual step,
        Hessian-vector products) use `lower_batch`, the last micro-batch of the preceding lower step. ξ is the lower
        optimiser's current learning rate (after its scheduler's step)."""
        loop, task = self.loop, self.task

        def upper_loss():  # the ordinary upper pass: under the trainer's autocast
            with loop.autocast():
                loss = task.loss(loop.model, upper_batch)
                reg = loop.method.upper_regularizer(loop.model)
            return loss if reg is None else loss + reg

        def lower_loss():
            # The hypergradient's extra passes run in fp32, autocast off: a central difference of bf16 gradients
            # divided by 2ε loses most of its digits (darts vs exact on MiniLM: cosine 0.991 in bf16), and the
            # Hessian-vector products of the other modes are no better in bf16. The trainer keeps fp32 weights, so
            # turning autocast off is all it takes; the ordinary lower and upper passes keep the trainer's autocast.
            with torch.autocast(loop.device.type, enabled=False):
                loss = task.loss(loop.model, lower_batch)
                reg = loop.method.regularizer(loop.model)
            return loss if reg is None else loss + reg

        xi = self.optimizer.param_groups[0]["lr"]
        w = self.perturbed  # the lower level's parameters, or the whole model's (method.bilevel.perturb)
        if loop.dp.active:
            upper_share, lower_share = self.upper_batches.share, self.last_lower_share
            return hypergradient(lambda: upper_loss() * upper_share, lambda: lower_loss() * lower_share,
                                 self.upper, w, self.mode, self.b.darts_alpha, xi, loop.dp.sum_, **self.options)
        return hypergradient(upper_loss, lower_loss, self.upper, w, self.mode, self.b.darts_alpha, xi,
                             **self.options)

    def step(self) -> dict[str, torch.Tensor]:
        for _ in range(self.b.lower_steps):
            lower = self.lower_step()
        for _ in range(self.b.upper_steps):
            upper = self.upper_step()
        return {"lower_loss": lower, "upper_loss": upper}

    def lrs(self) -> dict[str, float]:
        return {"lr_lower": self.optimizer.param_groups[0]["lr"], "lr_upper": self.upper_optimizer.param_groups[0]["lr"]}

    def summary(self) -> dict:
        return {"hypergradient": self.mode, "perturb": self.perturb, "lower_size": self.sizes[0],
                "upper_size": self.sizes[1],
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
