"""Bi-level optimisation (BiDoRA, BiLoRA): two parameter groups trained at two levels on two disjoint parts of the
training data,

    lower:  w*(λ) = argmin_w  L_lower(w, λ)  on D_lower   (+ the method's regulariser)
    upper:  min_λ  L_upper(w*(λ), λ)          on D_upper

(w = V, the lower level's trainable parameters; λ = M, the upper level's), alternating T1 lower steps with T2 upper
steps, each level with its own optimizer and schedule. The upper gradient is the direct gradient plus an implicit
term. With  v = ∂L_upper/∂w  and  M·p = ∂/∂λ [ ∂L_lower/∂w · p ]  (the mixed second derivative times a vector):

    first_order     ∂λ L_upper(w)                                          (no implicit term)
    one_step_exact  ∂λ L_upper(w) - M·v                                    (alias: exact)
    darts           the same, M·v by a central finite difference (Betty's `darts`; the official BiDoRA runs):
                    M·v ~ ( ∂λ L_lower(w + ε v) - ∂λ L_lower(w - ε v) ) / (2 ε),   ε = alpha / ||v||
    unrolled        d/dλ L_upper(w'(λ), λ)  through one virtual SGD step  w' = w - ξ ∂w L_lower(w, λ):
                    = ∂λ L_upper(w') - ξ M(w)·v',   v' = ∂L_upper/∂w at w'       (DARTS second order, exactly)
    darts_unrolled  the same, M(w)·v' by the central finite difference at w ± ε v', ε = alpha / ||v'||
                    (DARTS' own approximation, Liu et al. 2019, eq. 8)
    neumann, cg     the implicit-function hypergradient  ∂λ L_upper - M·(H⁻¹ v),  H = ∂²L_lower/∂w²,
                    H⁻¹ v by a truncated Neumann series  η Σ_{k=0..K} (I - η H)^k v  (K Hessian-vector products)
                    or by K conjugate-gradient iterations on (H + δ I) x = v from x = 0

How they relate. `one_step_exact` is the implicit-function formula with H⁻¹ replaced by the identity (Betty's
reading of DARTS: no virtual step, no ξ); it is `neumann` with K = 0 and η = 1. `darts` is the finite difference of
`one_step_exact` (error O(ε²), zero when ∂λ L_lower is quadratic in w), NOT of `unrolled`: it has no virtual step
and no ξ factor. `darts_unrolled` is the finite difference of `unrolled` (the same O(ε²)). As ξ -> 0, `unrolled`
tends to `first_order`; when w solves the lower problem, `neumann` (η < 2 / λ_max(H), K -> ∞) and `cg` (K = dim w,
H positive definite, δ = 0) tend to the true hypergradient dL_upper(w*(λ), λ)/dλ.

What w is (`method.bilevel.perturb`). `trainable` (default): the lower level's trainable parameters, which is what
the papers' V = {Delta V} means; v is taken, and w +- eps v applied, over them only. `whole_model`: every parameter
of the model except the upper level's, the frozen backbone included. That is what Betty does (leopard-ai/betty
cb6221f: problems/implicit_problem.py:83-84 `trainable_parameters()` is all of `module.parameters()`, as is
problems/problem.py:850-854 `meta_trainable_parameters()`; hypergradient/__init__.py:24-31 takes v over them and
hypergradient/darts.py:37-38, 49-50 perturbs them), so what the official BiDoRA runs: its lower module is the whole
RoBERTa, never frozen (digest B2). Then v has the frozen weights' entries, ||v|| (so eps) is taken over all of them,
and M.v gains the mixed terms through the backbone (d2 L_lower / dm dW0). Nothing trains that did not: the frozen
parameters are only perturbed and restored by copy. Any mode accepts it (the unrolled modes' virtual step then moves
the whole model too); the official runs are `darts`. Cost: v and two copies of the model's parameters, and a
backward through every weight.

Every evaluation of the lower loss inside one hypergradient replays the same random stream (dropout masks); Betty
does not (its +eps and -eps passes draw fresh dropout masks in train mode), and restores w by adding eps v back,
where we copy w back.
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

MODES = ("darts", "one_step_exact", "unrolled", "darts_unrolled", "neumann", "cg", "first_order")
PERTURBATIONS = ("trainable", "whole_model")  # method.bilevel.perturb: see the module docstring
ALIASES = {"exact": "one_step_exact"}  # the old name of one_step_exact, still accepted
NEEDS_DOUBLE_BACKWARD = ("one_step_exact", "unrolled", "neumann", "cg")
IMPLICIT_DEFAULTS = {"neumann_iterations": 3, "neumann_eta": 1.0, "cg_iterations": 3, "cg_damping": 0.0}
Params = Sequence[torch.nn.Parameter]
Vectors = list[torch.Tensor]
Sum = Callable[[Vectors], None]


def canonical_mode(mode: str, setting: str = "hypergradient mode") -> str:
    """`mode` with the alias resolved; an LrbenchError naming the valid choices for anything else."""
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise LrbenchError(f"{setting}={mode!r}; valid: {choices((*MODES, *ALIASES))}")
    return mode


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


@contextmanager
def lower_values_at(lower: Params, values: Vectors):
    """The lower parameters temporarily set to `values`, restored by copy afterwards (w + εv - εv != w in floating
    point)."""
    original = [p.detach().clone() for p in lower]
    with torch.no_grad():
        for p, x in zip(lower, values):
            p.copy_(x.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, p0 in zip(lower, original):
                p.copy_(p0)


def grads_or_zeros(loss: torch.Tensor, params: Params, **kwargs) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def vector_jacobian(outputs: Vectors, params: Params, vectors: Vectors) -> Vectors:
    """Σ_i vectors_i · d outputs_i / d params, keeping the graph of `outputs` for further products."""
    pairs = [(o, u) for o, u in zip(outputs, vectors) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad([o for o, _ in pairs], list(params), grad_outputs=[u.to(o.dtype) for o, u in pairs],
                                retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def dot(a: Vectors, b: Vectors) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def axpy(a: float | torch.Tensor, x: Vectors, y: Vectors) -> Vectors:
    """a x + y"""
    return [a * xi + yi for xi, yi in zip(x, y)]


def no_sum(tensors: Vectors) -> None:
    """The one-process `sum_`: nothing to add."""


class ReplayRandomness:
    """Replays the same RNG stream (dropout masks) for every evaluation of the lower loss in a hypergradient."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __call__(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class LowerCurvature:
    """The lower loss's gradient g = ∂L_lower/∂w at the current parameters, with its graph, for exact products:

        hessian(p) = H p = ∂/∂w (g·p),     mixed(p) = M·p = ∂/∂λ (g·p)

    Under data parallel each rank holds its share of the loss; `sum_` adds the ranks' Hessian-vector products, so
    that every rank iterates on the global H."""

    def __init__(self, lower_loss: Callable[[], torch.Tensor], upper: Params, lower: Params, sum_: Sum):
        self.upper, self.lower, self.sum_ = upper, lower, sum_
        with requires_grad(lower, True):
            self.g = grads_or_zeros(lower_loss(), lower, create_graph=True)

    def hessian(self, p: Vectors) -> Vectors:
        hp = [h.detach() for h in vector_jacobian(self.g, self.lower, p)]
        self.sum_(hp)
        return hp

    def mixed(self, p: Vectors) -> Vectors:
        return [m.detach() for m in vector_jacobian(self.g, self.upper, p)]


def finite_difference_mixed(lower_loss: Callable[[], torch.Tensor], upper: Params, lower: Params, v: Vectors,
                            alpha: float, replay: ReplayRandomness) -> Vectors:
    """M·v ~ ( ∂λ L_lower(w + ε v) - ∂λ L_lower(w - ε v) ) / (2 ε),  ε = alpha / ||v||: two forward/backward passes
    instead of a double backward."""
    norm = torch.sqrt(sum((vi.float() ** 2).sum() for vi in v))
    if norm == 0:
        return [torch.zeros_like(p) for p in upper]
    eps = alpha / norm

    def upper_grad_at(sign: float) -> Vectors:
        with lower_values_at(lower, [p.detach() + (sign * eps) * vi.to(p.dtype) for p, vi in zip(lower, v)]):
            replay()
            with requires_grad(lower, False):
                return grads_or_zeros(lower_loss(), upper)

    plus, minus = upper_grad_at(+1.0), upper_grad_at(-1.0)
    return [(gp - gm) / (2 * eps) for gp, gm in zip(plus, minus)]


def neumann_inverse(hessian: Callable[[Vectors], Vectors], v: Vectors, iterations: int, eta: float) -> Vectors:
    """H⁻¹ v ~ η Σ_{k=0..K} (I - η H)^k v  = H⁻¹ (I - (I - η H)^{K+1}) v; converges when 0 < η < 2 / λ_max(H) and H
    is positive definite, the error shrinking like max_i |1 - η λ_i|^{K+1}. K = `iterations` products with H."""
    term, total = v, list(v)
    for _ in range(iterations):
        term = axpy(-eta, hessian(term), term)
        total = [t + x for t, x in zip(total, term)]
    return [eta * t for t in total]


def conjugate_gradient(hessian: Callable[[Vectors], Vectors], v: Vectors, iterations: int, damping: float) -> Vectors:
    """x ~ (H + δ I)⁻¹ v by `iterations` steps of conjugate gradient from x = 0 (exact after dim w steps in exact
    arithmetic when H + δ I is positive definite; a damping δ > 0 keeps it so on a non-convex lower loss). As
    truncated CG does, it stops early at a direction of non-positive curvature, returning the iterate so far."""
    x = [torch.zeros_like(vi) for vi in v]
    r, p = list(v), list(v)
    rr = dot(r, r)
    for _ in range(iterations):
        if rr == 0:
            break
        hp = axpy(damping, p, hessian(p))
        curvature = dot(p, hp)
        if curvature <= 0:
            break
        step = rr / curvature
        x = axpy(step, p, x)
        r = axpy(-step, hp, r)
        rr_next = dot(r, r)
        p = axpy(rr_next / rr, p, r)
        rr = rr_next
    return x


def direct_and_v(upper_loss: Callable[[], torch.Tensor], upper: Params, lower: Params,
                 sum_: Sum) -> tuple[Vectors, Vectors, torch.Tensor]:
    """∂λ L_upper and v = ∂w L_upper (summed over ranks with the loss), and the loss. w may hold frozen parameters
    (`perturb: whole_model`): they require grad for this pass only."""
    with requires_grad(lower, True):
        loss = upper_loss()
        total = loss.detach().reshape(1).clone()
        grads = grads_or_zeros(loss, [*upper, *lower])
    sum_([*grads, total])
    return grads[: len(upper)], [g.detach() for g in grads[len(upper):]], total[0]


def one_step_implicit(mode: str, lower_loss, upper: Params, lower: Params, v: Vectors, alpha: float,
                      replay: ReplayRandomness, sum_: Sum, options: dict) -> Vectors:
    """-M·(H⁻¹ v), with H⁻¹ ~ identity (one_step_exact, darts), Neumann (neumann) or conjugate gradient (cg)."""
    if mode == "darts":
        mixed = finite_difference_mixed(lower_loss, upper, lower, v, alpha, replay)
    else:
        replay()
        curvature = LowerCurvature(lower_loss, upper, lower, sum_)
        if mode == "neumann":
            v = neumann_inverse(curvature.hessian, v, options["neumann_iterations"], options["neumann_eta"])
        elif mode == "cg":
            v = conjugate_gradient(curvature.hessian, v, options["cg_iterations"], options["cg_damping"])
        mixed = curvature.mixed(v)
    return [-m for m in mixed]


def unrolled_hypergradient(mode: str, upper_loss, lower_loss, upper: Params, lower: Params, alpha: float, xi: float,
                           replay: ReplayRandomness, sum_: Sum) -> tuple[Vectors, torch.Tensor]:
    """d/dλ L_upper(w'(λ), λ),  w' = w - ξ ∂w L_lower(w, λ).  Since ∂w'/∂λ = -ξ M(w), the chain rule gives
    ∂λ L_upper(w') - ξ M(w)·v' with v' = ∂w L_upper(w'): the exact derivative through the virtual step (`unrolled`,
    M·v' by double backward at w) or its finite difference (`darts_unrolled`)."""
    if xi is None:
        raise LrbenchError(f"hypergradient mode {mode!r} needs xi, the lower level's learning rate")
    replay()
    with requires_grad(lower, True):
        g = [x.detach() for x in grads_or_zeros(lower_loss(), lower)]
    sum_(g)
    with lower_values_at(lower, [p.detach() - xi * gi for p, gi in zip(lower, g)]):
        direct, v, loss = direct_and_v(upper_loss, upper, lower, sum_)
    if mode == "darts_unrolled":
        mixed = finite_difference_mixed(lower_loss, upper, lower, v, alpha, replay)
    else:
        replay()
        mixed = LowerCurvature(lower_loss, upper, lower, sum_).mixed(v)
    sum_(mixed)
    return [d - xi * m for d, m in zip(direct, mixed)], loss


def hypergradient(upper_loss: Callable[[], torch.Tensor], lower_loss: Callable[[], torch.Tensor], upper: Params,
                  lower: Params, mode: str = "darts", alpha: float = 0.01, xi: float | None = None,
                  sum_: Sum = no_sum, **options) -> tuple[Vectors, torch.Tensor]:
    """The gradient of the upper loss w.r.t. the upper parameters λ with the implicit term of `mode` (see the module
    docstring), and the upper loss. `alpha`: the finite differences' step (darts, darts_unrolled); `xi`: the virtual
    step's learning rate (unrolled, darts_unrolled); `options`: neumann_iterations (K, default 3), neumann_eta (η,
    1.0), cg_iterations (K, 3), cg_damping (δ, 0.0). `sum_` sums tensors over data-parallel ranks in place (see
    `data_parallel_hypergradient`); the default adds nothing."""
    mode = canonical_mode(mode)
    unknown = set(options) - set(IMPLICIT_DEFAULTS)
    if unknown:
        raise LrbenchError(f"hypergradient options {sorted(unknown)}; valid: {choices(IMPLICIT_DEFAULTS)}")
    options = {**IMPLICIT_DEFAULTS, **options}
    if mode == "first_order":
        loss = upper_loss()
        total = loss.detach().reshape(1).clone()
        grads = grads_or_zeros(loss, upper)
        sum_([*grads, total])
        return grads, total[0]
    if mode in ("unrolled", "darts_unrolled"):
        return unrolled_hypergradient(mode, upper_loss, lower_loss, upper, lower, alpha, xi, ReplayRandomness(), sum_)
    direct, v, loss = direct_and_v(upper_loss, upper, lower, sum_)
    implicit = one_step_implicit(mode, lower_loss, upper, lower, v, alpha, ReplayRandomness(), sum_, options)
    sum_(implicit)
    return [d + i for d, i in zip(direct, implicit)], loss


def data_parallel_hypergradient(upper_loss: Callable[[], torch.Tensor], lower_loss: Callable[[], torch.Tensor],
                                upper: Params, lower: Params, mode: str, alpha: float, sum_: Sum,
                                xi: float | None = None, **options) -> tuple[Vectors, torch.Tensor]:
    """`hypergradient` over data-parallel ranks. Each rank's closures compute its share of the global batches,
    weighted so that their sum over the ranks is the global loss; `sum_` sums tensors over the ranks in place.
    Whatever sets where the parameters are evaluated is summed before it is used, so that every rank evaluates at the
    same points: v with the direct gradient (before the finite difference's w ± εv), the lower gradient before the
    virtual step (unrolled), each Hessian-vector product (neumann, cg). The final mixed term, linear in the lower
    loss, is summed last. Calls to `sum_`: 1 (first_order), 2 (darts, one_step_exact), 3 (unrolled,
    darts_unrolled), 2 + K (neumann, cg with K iterations; cg stops early at a zero residual or a non-positive
    curvature). With one rank (`sum_` a no-op) this is `hypergradient`, operation for operation."""
    return hypergradient(upper_loss, lower_loss, upper, lower, mode, alpha, xi, sum_, **options)


def use_eager_attention(model: torch.nn.Module) -> None:
    """Fused attention kernels have no double backward; the exact Hessian-vector products need plain attention."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def perturbed_parameters(model: torch.nn.Module, lower: Params, upper: Params, perturb: str) -> list:
    """w of the implicit term (`method.bilevel.perturb`, see the module docstring): the lower level's parameters
    (`trainable`), or every parameter of `model` but the upper level's (`whole_model`, Betty's), lower ones included
    even if the model did not hold them."""
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
    `max_steps` the stage's budget counts rounds; with epochs, passes over D_lower."""

    def __init__(self, loop: "Trainer", stage: "Stage"):
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
            return data_parallel_hypergradient(lambda: upper_loss() * upper_share, lambda: lower_loss() * lower_share,
                                               self.upper, w, self.mode, self.b.darts_alpha, loop.dp.sum_,
                                               xi, **self.options)
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
