"""The hypergradient of a bi-level problem, independent of models, data and training loops: pure functions of two
loss closures and two parameter lists, tested against closed forms (the bi-level step rule is bilevel.py).
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

What w is (`method.bilevel.perturb`, chosen by the bi-level rule: bilevel.perturbed_parameters). `trainable`
(default): the lower level's trainable parameters, which is what the papers' V = {Delta V} means; v is taken, and
w +- eps v applied, over them only. `whole_model`: every parameter of the model except the upper level's, the frozen
backbone included. That is what Betty does (leopard-ai/betty cb6221f: problems/implicit_problem.py:83-84
`trainable_parameters()` is all of `module.parameters()`, as is problems/problem.py:850-854
`meta_trainable_parameters()`; hypergradient/__init__.py:24-31 takes v over them and hypergradient/darts.py:37-38,
49-50 perturbs them), so what the official BiDoRA runs: its lower module is the whole RoBERTa, never frozen (digest
B2). Then v has the frozen weights' entries, ||v|| (so eps) is taken over all of them, and M.v gains the mixed terms
through the backbone (d2 L_lower / dm dW0). Nothing trains that did not: the frozen parameters are only perturbed
and restored by copy. Any mode accepts it (the unrolled modes' virtual step then moves the whole model too); the
official runs are `darts`. Cost: v and two copies of the model's parameters, and a backward through every weight.

Every evaluation of the lower loss inside one hypergradient replays the same random stream (dropout masks); Betty
does not (its +eps and -eps passes draw fresh dropout masks in train mode), and restores w by adding eps v back,
where we copy w back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from lowrank_bench.errors import LrbenchError, choices

MODES = ("darts", "one_step_exact", "unrolled", "darts_unrolled", "neumann", "cg", "first_order")
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
    1.0), cg_iterations (K, 3), cg_damping (δ, 0.0).

    Data parallel: each rank's closures compute its share of the global batches, weighted so that their sum over the
    ranks is the global loss, and `sum_` sums tensors over the ranks in place (the default adds nothing). Whatever
    sets where the parameters are evaluated is summed before it is used, so that every rank evaluates at the same
    points: v with the direct gradient (before the finite difference's w ± εv), the lower gradient before the
    virtual step (unrolled), each Hessian-vector product (neumann, cg). The final mixed term, linear in the lower
    loss, is summed last. Calls to `sum_`: 1 (first_order), 2 (darts, one_step_exact), 3 (unrolled,
    darts_unrolled), 2 + K (neumann, cg with K iterations; cg stops early at a zero residual or a non-positive
    curvature)."""
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
