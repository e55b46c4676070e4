"""The bi-level engine: hypergradient modes against a known answer, level separation, data split, retraining."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lowrank_bench.bilevel import BiLevel, split_indices, use_eager_attention
from lowrank_bench.hypergradient import MODES, hypergradient
from lowrank_bench.errors import LrbenchError
from lowrank_bench.stages import stages_for
from lowrank_bench.trainer import Trainer
from lowrank_bench.train import prepare
from tests.conftest import compose_cfg


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return F.cosine_similarity(a, b, dim=0).item()


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def quadratic_problem(seed=0):
    """L_lower = 1/2 ||V - A m||^2 + 1/4 ||V||^4 / 10,  L_upper = 1/2 ||V - t||^2 + c.m.
    Known answer: direct = c, v = V - t, d2L_lower/dm dV = -A^T, so the hypergradient is c + A^T (V - t)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.randn(6, generator=g, dtype=torch.float64)
    c = torch.randn(3, generator=g, dtype=torch.float64)
    V = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    m = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    lower = lambda: 0.5 * ((V - A @ m) ** 2).sum() + (V.norm() ** 4) / 40
    upper = lambda: 0.5 * ((V - t) ** 2).sum() + c @ m
    expected = c + A.T @ (V.detach() - t)
    return lower, upper, V, m, c, expected


def test_hypergradient_modes_on_a_problem_with_a_known_answer():
    lower, upper, V, m, c, expected = quadratic_problem()
    darts, _ = hypergradient(upper, lower, [m], [V], "darts", alpha=0.01)
    exact, _ = hypergradient(upper, lower, [m], [V], "one_step_exact")
    alias, _ = hypergradient(upper, lower, [m], [V], "exact")
    first, _ = hypergradient(upper, lower, [m], [V], "first_order")
    assert rel_err(exact, [expected]) < 1e-12       # double backward is exact
    assert torch.equal(alias[0], exact[0])          # `exact` is the old name of one_step_exact
    assert rel_err(darts, [expected]) < 1e-6        # the central difference is exact on a quadratic term in m
    assert cosine(darts, exact) > 0.99999
    assert torch.allclose(first[0], c)              # first order is the direct gradient only
    assert cosine(first, exact) < 0.9 and rel_err(first, exact) > 0.1


def test_unrolled_modes_on_the_same_problem():
    """Through one virtual SGD step V' = V - xi dL_lower/dV, with dL_lower/dV = (V - A m) + ||V||^2 V / 10:
    dV'/dm = xi A, so d/dm L_upper(V'(m), m) = c + xi A^T (V' - t). The finite difference (darts_unrolled) is exact
    here too (the mixed derivative -A^T does not depend on V); `darts` is not this: it has no virtual step, no xi."""
    lower, upper, V, m, c, _ = quadratic_problem()
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.randn(6, generator=g, dtype=torch.float64)
    w = V.detach()
    for xi in (1e-3, 0.1, 0.7):
        w_virtual = w - xi * ((w - A @ m.detach()) + w.norm() ** 2 * w / 10)
        expected = c + xi * A.T @ (w_virtual - t)
        unrolled, loss = hypergradient(upper, lower, [m], [V], "unrolled", xi=xi)
        darts_unrolled, _ = hypergradient(upper, lower, [m], [V], "darts_unrolled", alpha=0.01, xi=xi)
        assert rel_err(unrolled, [expected]) < 1e-12
        assert rel_err(darts_unrolled, [expected]) < 1e-6
        assert torch.isclose(loss, 0.5 * ((w_virtual - t) ** 2).sum() + c @ m.detach())  # the loss at V'
        assert torch.equal(V.detach(), w)                                                 # V restored
    darts, _ = hypergradient(upper, lower, [m], [V], "darts")
    assert rel_err(darts, hypergradient(upper, lower, [m], [V], "unrolled", xi=0.1)[0]) > 0.1


def lower_solved_quadratic(seed=0):
    """L_lower = 1/2 V^T P V - V^T A m (P symmetric positive definite), L_upper = 1/2 ||V - t||^2 + c.m, and V at the
    lower optimum V*(m) = P^-1 A m. Then H = P, d2L_lower/dm dV = -A^T, and the true hypergradient
    d/dm L_upper(V*(m), m) = c + A^T P^-1 (V* - t) is what the implicit function theorem gives."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    P = torch.eye(6, dtype=torch.float64) + B @ B.T / 6
    A, t, c, m0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (6,), (3,), (3,)))
    m = torch.nn.Parameter(m0)
    V = torch.nn.Parameter(torch.linalg.solve(P, A @ m0))
    lower = lambda: 0.5 * V @ P @ V - V @ (A @ m)
    upper = lambda: 0.5 * ((V - t) ** 2).sum() + c @ m
    true = c + A.T @ torch.linalg.solve(P, V.detach() - t)
    return lower, upper, V, m, P, A, t, c, true


def test_true_hypergradient_by_finite_differences_of_the_solved_problem():
    _, _, _, m, P, A, t, c, true = lower_solved_quadratic()
    F = lambda m_: 0.5 * ((torch.linalg.solve(P, A @ m_) - t) ** 2).sum() + c @ m_
    numeric = torch.autograd.functional.jacobian(F, m.detach())
    assert rel_err([numeric], [true]) < 1e-12


def test_conjugate_gradient_reaches_the_implicit_function_answer():
    lower, upper, V, m, P, A, t, c, true = lower_solved_quadratic()
    cg, _ = hypergradient(upper, lower, [m], [V], "cg", cg_iterations=6)  # dim V = 6: exact in exact arithmetic
    assert rel_err(cg, [true]) < 1e-6
    damped, _ = hypergradient(upper, lower, [m], [V], "cg", cg_iterations=6, cg_damping=0.5)
    expected = c + A.T @ torch.linalg.solve(P + 0.5 * torch.eye(6, dtype=P.dtype), V.detach() - t)
    assert rel_err(damped, [expected]) < 1e-6
    few, _ = hypergradient(upper, lower, [m], [V], "cg", cg_iterations=2)
    assert rel_err(few, [true]) > 1e-6


def test_neumann_series_matches_its_truncation_and_converges():
    """K Hessian-vector products give eta sum_{k=0..K} (I - eta H)^k v = H^-1 (I - (I - eta H)^{K+1}) v exactly;
    its error against H^-1 v shrinks like rho^{K+1}, rho = max |1 - eta lambda_i(H)|."""
    lower, upper, V, m, P, A, t, c, true = lower_solved_quadratic()
    eigenvalues = torch.linalg.eigvalsh(P)
    eta = 1.0 / eigenvalues.max().item()
    rho = (1 - eta * eigenvalues).abs().max().item()
    I = torch.eye(6, dtype=P.dtype)
    for K in (0, 2, 5):
        got, _ = hypergradient(upper, lower, [m], [V], "neumann", neumann_iterations=K, neumann_eta=eta)
        truncated = c + A.T @ torch.linalg.solve(P, (I - torch.linalg.matrix_power(I - eta * P, K + 1))
                                                 @ (V.detach() - t))
        assert rel_err(got, [truncated]) < 1e-12
    K = 400
    converged, _ = hypergradient(upper, lower, [m], [V], "neumann", neumann_iterations=K, neumann_eta=eta)
    assert rho ** (K + 1) < 1e-7 and rel_err(converged, [true]) < 1e-6
    one_term, _ = hypergradient(upper, lower, [m], [V], "neumann", neumann_iterations=0, neumann_eta=1.0)
    exact, _ = hypergradient(upper, lower, [m], [V], "one_step_exact")
    assert rel_err(one_term, exact) < 1e-12  # K = 0, eta = 1: the identity for H^-1


@pytest.mark.parametrize("mode,reference", [("darts", "one_step_exact"), ("darts_unrolled", "unrolled")])
def test_finite_differences_err_by_order_alpha_squared(mode, reference):
    """Where the mixed derivative depends on V (here L_lower = sum sin(V) * (A m) + ||V||^2 / 2, whose mixed
    derivative is A^T diag(cos V)), the central difference errs by O(eps^2): halving alpha quarters the error."""
    g = torch.Generator().manual_seed(1)
    A, t = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    V = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    m = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    lower = lambda: (torch.sin(V) * (A @ m)).sum() + 0.5 * (V ** 2).sum()
    upper = lambda: 0.5 * ((V - t) ** 2).sum() + (m ** 2).sum()
    exact, _ = hypergradient(upper, lower, [m], [V], reference, xi=0.1)
    errors = [rel_err(hypergradient(upper, lower, [m], [V], mode, alpha=a, xi=0.1)[0], exact) for a in (0.02, 0.01)]
    assert 1e-9 < errors[1] < errors[0] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.5


def test_unknown_modes_and_missing_settings_are_refused():
    lower, upper, V, m, *_ = quadratic_problem()
    with pytest.raises(LrbenchError, match="valid: .*neumann.*exact"):
        hypergradient(upper, lower, [m], [V], "implicit")
    with pytest.raises(LrbenchError, match="xi"):
        hypergradient(upper, lower, [m], [V], "unrolled")
    with pytest.raises(LrbenchError, match="neumann_iterations"):
        hypergradient(upper, lower, [m], [V], "neumann", neumann_terms=3)


def test_darts_agrees_with_exact_on_bidora():
    """On a real (nonlinear) BiDoRA model the finite difference approximates the Hessian-vector product."""
    cfg = compose_cfg("method=bidora", "model=tiny-roberta", "method.r=4")
    s = prepare(cfg)
    model, task = s.model.eval().double(), s.curriculum.task  # eval: no dropout; float64: no round-off in the difference
    use_eager_attention(model)
    randomize = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in s.groups["adapter"]:
            p.add_(torch.randn(p.shape, generator=randomize) * 0.3)
    batches = task.loader("train", 16)
    it = iter(batches)
    b_lower, b_upper = next(it), next(it)
    upper, lower = s.groups["magnitude"], s.groups["adapter"] + s.groups["head"]
    upper_loss = lambda: task.loss(model, b_upper)
    lower_loss = lambda: task.loss(model, b_lower) + s.method.regularizer(model)
    darts, _ = hypergradient(upper_loss, lower_loss, upper, lower, "darts", alpha=0.01)
    exact, _ = hypergradient(upper_loss, lower_loss, upper, lower, "exact")
    first, _ = hypergradient(upper_loss, lower_loss, upper, lower, "first_order")
    implicit_darts = [d - f for d, f in zip(darts, first)]
    implicit_exact = [e - f for e, f in zip(exact, first)]
    assert cosine(implicit_darts, implicit_exact) > 0.99
    assert rel_err(implicit_darts, implicit_exact) < 0.05
    assert rel_err(first, exact) > 1e-3  # the implicit term is not negligible here


def test_split_is_seeded_disjoint_and_complete():
    lower, upper = split_indices(1000, 0.8, seed=0)
    assert (len(lower), len(upper)) == (800, 200)
    assert set(lower).isdisjoint(upper) and set(lower) | set(upper) == set(range(1000))
    assert split_indices(1000, 0.8, seed=0) == (lower, upper)
    assert split_indices(1000, 0.8, seed=1) != (lower, upper)


def make_run(tmp_path, *overrides):
    """A bi-level run's trainer and stages, as `run` builds them, without running them."""
    cfg = compose_cfg("model=tiny-roberta", "trainer.progress=false", *overrides)
    s = prepare(cfg)
    trainer = Trainer(cfg.trainer, s.model, s.method, tmp_path, cfg.seed)
    stages = stages_for(s.curriculum.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                        cfg.trainer.max_steps, cfg.seed)
    return trainer, stages, s


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return [not torch.equal(b, p) for b, p in zip(before, params)]


@pytest.mark.parametrize("method,upper_role", [("bidora", "magnitude"), ("bilora", "singular_values")])
def test_each_level_updates_only_its_own_parameters(tmp_path, method, upper_role):
    trainer, stages, s = make_run(tmp_path, f"method={method}")
    rule = BiLevel(trainer, stages[0])
    lower, upper = rule.lower, rule.upper
    assert {id(p) for p in upper} == {id(p) for p in s.groups[upper_role]}
    assert {id(p) for p in lower} == {id(p) for p in s.groups["adapter"] + s.groups["head"]}
    frozen = [p for p in s.model.parameters() if not p.requires_grad]
    frozen_before = snapshot(frozen)
    lo, up = snapshot(lower), snapshot(upper)
    rule.lower_step()
    assert not any(changed(up, upper))
    assert any(changed(lo, lower))
    lo, up = snapshot(lower), snapshot(upper)
    rule.upper_step()
    assert not any(changed(lo, lower))
    assert any(changed(up, upper))
    assert not any(changed(frozen_before, frozen))


def test_split_sizes_are_saved_and_reported(tmp_path):
    trainer, stages, s = make_run(tmp_path, "method=bidora", "trainer.max_steps=2")
    trainer.run(stages)
    saved = json.loads((tmp_path / "bilevel_split.json").read_text())
    assert len(saved["lower"]) == 640 and len(saved["upper"]) == 160  # 80/20 of the toy task's 800
    extra = trainer.extras
    assert extra["lower_size"] == 640 and extra["upper_size"] == 160 and extra["hypergradient"] == "darts"
    assert extra["lower_steps"] == 2 and extra["upper_steps"] == 2


def test_t1_t2_alternation_counts(tmp_path):
    trainer, stages, _ = make_run(tmp_path, "method=bilora", "trainer.max_steps=3", "method.bilevel.lower_steps=2",
                                  "method.bilevel.upper_steps=1")
    trainer.run(stages)
    assert trainer.extras["lower_steps"] == 6 and trainer.extras["upper_steps"] == 3


def test_retraining_restarts_direction_and_freezes_magnitudes(tmp_path):
    trainer, stages, s = make_run(tmp_path, "method=bidora", "trainer.max_steps=2", "method.retrain.enabled=true",
                                  "method.retrain.max_steps=3")
    assert [stage.name for stage in stages] == ["search", "retrain"]
    lower, upper = stages[0].bilevel.lower, stages[0].bilevel.upper
    assert {id(p) for p in stages[1].params} == {id(p) for p in lower}  # magnitudes are not retrained
    initial = snapshot(lower)
    seen = {}
    trainer.stage_end_hooks.append(lambda i, stage, record: seen.setdefault(stage.name, snapshot(upper)))
    original_start = trainer.start

    def spy(stage, trained):
        original_start(stage, trained)
        if stage.name == "retrain":
            seen["lower_at_retrain_start"] = snapshot(lower)
            seen["upper_frozen"] = [not p.requires_grad for p in upper]

    trainer.start = spy
    history = trainer.run(stages)
    assert all(torch.equal(a, b) for a, b in zip(seen["lower_at_retrain_start"], initial))
    assert all(seen["upper_frozen"])
    assert all(torch.equal(a, b) for a, b in zip(seen["search"], upper))  # unchanged by retraining
    assert history.steps_per_stage == {"search": 2, "retrain": 3} and history.train_steps == 5
    stage_names = [json.loads(l)["stage"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert stage_names == ["search", "retrain"]


def test_saved_adapter_keeps_the_frozen_magnitudes_after_retraining(tmp_path):
    from lowrank_bench.methods.base import adapter_state_dict

    trainer, stages, s = make_run(tmp_path, "method=bidora", "trainer.max_steps=1", "method.retrain.enabled=true",
                                  "method.retrain.max_steps=1")
    trainer.run(stages)
    state = adapter_state_dict(s.model)
    assert sum(k.endswith(".magnitude") for k in state) == len(s.groups["magnitude"])


@pytest.mark.parametrize("mode", [*MODES, "exact"])
def test_every_mode_takes_an_upper_step_through_the_step_rule(tmp_path, mode):
    trainer, stages, _ = make_run(tmp_path, "method=bidora", f"method.bilevel.hypergradient={mode}",
                                  "method.bilevel.neumann_iterations=2", "method.bilevel.cg_damping=0.1")
    rule = BiLevel(trainer, stages[0])
    assert rule.options == {"neumann_iterations": 2, "neumann_eta": 1.0, "cg_iterations": 3, "cg_damping": 0.1}
    rule.lower_step()
    before = snapshot(rule.upper)
    loss = rule.upper_step()
    assert torch.isfinite(loss) and any(changed(before, rule.upper))
    assert rule.summary()["hypergradient"] == ("one_step_exact" if mode == "exact" else mode)


def test_an_unknown_mode_is_refused_by_the_step_rule(tmp_path):
    trainer, stages, _ = make_run(tmp_path, "method=bilora", "method.bilevel.hypergradient=implicit")
    with pytest.raises(LrbenchError, match="method.bilevel.hypergradient='implicit'; valid: .*unrolled"):
        BiLevel(trainer, stages[0])


def bidora_upper_gradient(tmp_path, precision: str, mode: str) -> list[torch.Tensor]:
    """The step rule's hypergradient on fixed batches of tiny BiDoRA (eval mode, perturbed adapters)."""
    tmp_path.mkdir()
    trainer, stages, s = make_run(tmp_path, "method=bidora", f"trainer.precision={precision}",
                                  f"method.bilevel.hypergradient={mode}")
    rule = BiLevel(trainer, stages[0])
    s.model.eval()
    randomize = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in s.groups["adapter"]:
            p.add_(torch.randn(p.shape, generator=randomize) * 0.3)
    it = iter(s.curriculum.task.loader("train", 16))
    lower_batch, upper_batch = next(it), next(it)
    return rule.upper_gradient(upper_batch, lower_batch)[0]


def test_darts_under_bf16_autocast_keeps_its_extra_passes_in_fp32(tmp_path):
    """Under bf16 autocast (on the CPU here) the hypergradient's extra passes run with autocast off. Measured on
    this case: darts vs one_step_exact, both under bf16, cosine 0.999998 / relative error 0.2 % (with the extra
    passes in bf16, as before: 0.9846 / 20 %); darts under bf16 vs the fp32 one_step_exact reference, cosine 0.99987
    (before: 0.9846), the rest being the ordinary bf16 upper pass (v and the direct term), which keeps autocast."""
    reference = bidora_upper_gradient(tmp_path / "fp32", "fp32", "one_step_exact")
    darts = bidora_upper_gradient(tmp_path / "bf16", "bf16", "darts")
    exact = bidora_upper_gradient(tmp_path / "bf16-exact", "bf16", "one_step_exact")
    assert cosine(darts, exact) > 0.9999 and rel_err(darts, exact) < 0.01
    assert cosine(darts, reference) > 0.999 and rel_err(darts, reference) < 0.05


# -- method.bilevel.perturb: whole_model (Betty's darts over every parameter of the lower module) ----------------
class FrozenBackboneToy(torch.nn.Module):
    """A frozen 'backbone' W0, a trainable lower V and an upper m, with

        L_lower = 1/2 ||V - A m||^2 + 1/2 ||W0 - B m||^2 + 1/4 ||V||^4 / 10,   L_upper = 1/2 ||V - t||^2 + 1/2 ||W0 - s||^2 + c.m

    By hand: v = (V - t, W0 - s) and d2L_lower/dm dV = -A^T, d2L_lower/dm dW0 = -B^T, so Betty's one-step
    hypergradient (H^-1 ~ I) is  c + A^T (V - t)  over V only (`trainable`) and  c + A^T (V - t) + B^T (W0 - s)
    over every parameter of the module but m (`whole_model`). The central difference is exact here (the m-gradient of
    L_lower is linear in w)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
        self.A, self.B, self.t, self.s, self.c = r(6, 3), r(4, 3), r(6), r(4), r(3)
        self.W0 = torch.nn.Parameter(r(4), requires_grad=False)
        self.V = torch.nn.Parameter(r(6))
        self.m = torch.nn.Parameter(r(3))

    def lower(self):
        return (0.5 * ((self.V - self.A @ self.m) ** 2).sum() + 0.5 * ((self.W0 - self.B @ self.m) ** 2).sum()
                + self.V.norm() ** 4 / 40)

    def upper(self):
        return 0.5 * ((self.V - self.t) ** 2).sum() + 0.5 * ((self.W0 - self.s) ** 2).sum() + self.c @ self.m


def test_whole_model_perturbation_matches_the_hand_computation():
    from lowrank_bench.bilevel import perturbed_parameters

    toy = FrozenBackboneToy()
    V, W0, m = toy.V.detach().clone(), toy.W0.detach().clone(), toy.m
    trainable_expected = toy.c + toy.A.T @ (V - toy.t)
    whole_expected = trainable_expected + toy.B.T @ (W0 - toy.s)
    assert [id(p) for p in perturbed_parameters(toy, [toy.V], [m], "trainable")] == [id(toy.V)]
    whole = perturbed_parameters(toy, [toy.V], [m], "whole_model")
    assert {id(p) for p in whole} == {id(toy.W0), id(toy.V)}  # every parameter but the upper level's
    for mode, tolerance in (("darts", 1e-6), ("one_step_exact", 1e-12)):
        got, _ = hypergradient(toy.upper, toy.lower, [m], whole, mode, alpha=0.01)
        assert rel_err(got, [whole_expected]) < tolerance, mode
        got, _ = hypergradient(toy.upper, toy.lower, [m], [toy.V], mode, alpha=0.01)
        assert rel_err(got, [trainable_expected]) < tolerance, mode
    assert rel_err([whole_expected], [trainable_expected]) > 0.1  # the backbone's term is not small here
    assert torch.equal(toy.W0, W0) and torch.equal(toy.V.detach(), V)  # restored exactly
    assert not toy.W0.requires_grad and toy.V.requires_grad               # and still frozen / still trainable
    with pytest.raises(LrbenchError, match="method.bilevel.perturb='all'; valid: trainable, whole_model"):
        perturbed_parameters(toy, [toy.V], [m], "all")


def exact_one_step(model, upper_loss, lower_loss, upper, w):
    """direct - M.v with v = dL_upper/dw and M.v = d/dm (dL_lower/dw . v), by double backward: computed here, apart
    from bilevel.py."""
    flags = [p.requires_grad for p in w]
    for p in w:
        p.requires_grad_(True)
    try:
        grads = torch.autograd.grad(upper_loss(), [*upper, *w], allow_unused=True)
        direct = grads[: len(upper)]
        v = [torch.zeros_like(p) if g is None else g for p, g in zip(w, grads[len(upper):])]
        g = torch.autograd.grad(lower_loss(), w, create_graph=True, allow_unused=True)
        gv = sum((gi * vi).sum() for gi, vi in zip(g, v) if gi is not None)
        mixed = torch.autograd.grad(gv, upper, allow_unused=True)
    finally:
        for p, flag in zip(w, flags):
            p.requires_grad_(flag)
    return [d - (torch.zeros_like(d) if mx is None else mx) for d, mx in zip(direct, mixed)]


def test_step_rule_perturbs_the_whole_model_with_perturb_whole_model(tmp_path):
    """Tiny BiDoRA through the step rule: with `whole_model` the darts hypergradient is the one-step formula over
    every parameter but the magnitudes (the frozen RoBERTa included), as Betty computes it for the official code;
    with `trainable` (default) over A, B and the head only. The two differ, and the frozen weights are left as they
    were."""
    rules = {}
    for perturb in ("trainable", "whole_model"):
        folder = tmp_path / perturb
        folder.mkdir()
        trainer, stages, s = make_run(folder, "method=bidora", f"method.bilevel.perturb={perturb}")
        rules[perturb] = (BiLevel(trainer, stages[0]), s)
    sizes = {}
    for perturb, (rule, s) in rules.items():
        model, task = s.model.eval().double(), s.curriculum.task
        use_eager_attention(model)
        randomize = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in s.groups["adapter"]:
                p.add_(torch.randn(p.shape, generator=randomize, dtype=p.dtype) * 0.3)
        it = iter(task.loader("train", 16))
        lower_batch, upper_batch = next(it), next(it)
        upper = s.groups["magnitude"]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        frozen_before = snapshot(frozen)
        got, _ = rule.upper_gradient(upper_batch, lower_batch)
        assert not any(changed(frozen_before, frozen)) and not any(p.requires_grad for p in frozen)
        upper_ids = {id(p) for p in upper}
        w = {"trainable": s.groups["adapter"] + s.groups["head"],
             "whole_model": [p for p in model.parameters() if id(p) not in upper_ids]}
        upper_loss = lambda: task.loss(model, upper_batch)
        lower_loss = lambda: task.loss(model, lower_batch) + s.method.regularizer(model)
        expected = exact_one_step(model, upper_loss, lower_loss, upper, w[perturb])
        other = exact_one_step(model, upper_loss, lower_loss, upper,
                               w["trainable" if perturb == "whole_model" else "whole_model"])
        first = [g.detach() for g in torch.autograd.grad(upper_loss(), upper)]
        implicit = [g - f for g, f in zip(got, first)]
        # measured: implicit-term cosine 0.999999996 / 0.999996, relative error 8.6e-5 / 6.6e-3 (trainable /
        # whole_model: the finite difference through the nonlinear backbone is the rougher); between the readings
        # 0.81 / 1.08, and the direct term alone 0.93 / 1.11 from the exact answer
        assert cosine(implicit, [e - f for e, f in zip(expected, first)]) > 0.9999
        assert rel_err(got, expected) < 0.02
        assert rel_err(got, other) > 0.5  # the other reading is a different number
        sizes[perturb] = len(w[perturb])
    for perturb, (rule, _) in rules.items():
        assert len(rule.perturbed) == sizes[perturb] and rule.summary()["perturb"] == perturb
    assert sizes["whole_model"] > sizes["trainable"]


# -- with retraining, "best" is the retraining's ---------------------------------------------------------------
def test_a_run_with_retraining_reports_the_retrainings_best_not_the_searchs(tmp_path, monkeypatch):
    """The search scores 0.90 then 0.80, the retraining 0.60 then 0.70 (scripted evaluations of a real tiny run):
    the row's best is the retrained model's 0.70 at its step; the search's 0.90 is `search_best_accuracy` only. The
    official code keeps the two stages' evaluations in separate lists (run_glue_bilevel.py:412, 553)."""
    from lowrank_bench.results import read_rows
    from lowrank_bench.tasks.toy import ToySentiment
    from lowrank_bench.train import run

    scores = iter([0.90, 0.80, 0.60, 0.70])

    def scripted(self, model, **kwargs):
        return {"accuracy": next(scores), "confusion": [[1, 0], [0, 1]]}

    monkeypatch.setattr(ToySentiment, "evaluate_all", scripted)
    csv_path = tmp_path / "runs.csv"
    cfg = compose_cfg("method=bidora", "model=tiny-roberta", "trainer.progress=false", "trainer.max_steps=2",
                      "trainer.eval_every=1", "method.retrain.enabled=true", "method.retrain.max_steps=2",
                      "save_adapter=false", f"results_csv={csv_path}")
    row = run(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["accuracy"]) for r in records] == [
        ("search", 1, 0.90), ("search", 2, 0.80), ("retrain", 3, 0.60), ("retrain", 4, 0.70)]
    assert row["best_accuracy"] == 0.70 and row["best_step"] == 4          # before: 0.90 at step 1 (the search's)
    assert row["search_best_accuracy"] == 0.90
    assert row["last_accuracy"] == 0.70 and row["last_step"] == 4
    saved = read_rows(csv_path)[0]
    assert float(saved["best_accuracy"]) == 0.70 and float(saved["search_best_accuracy"]) == 0.90
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_accuracy"] == 0.70 and summary["best_confusion"] == [[1, 0], [0, 1]]


def test_best_of_a_one_stage_run_is_over_all_its_evaluations():
    from lowrank_bench.results import best_and_last, tables_of

    evals = [{"step": 1, "stage": "search", "accuracy": 0.5, "confusion": [[1]]},
             {"step": 2, "stage": "search", "accuracy": 0.9, "confusion": [[2]]},
             {"step": 3, "stage": "search", "accuracy": 0.7, "confusion": [[3]]}]
    scores = best_and_last(evals, "accuracy")
    assert (scores["best_accuracy"], scores["best_step"], scores["last_accuracy"]) == (0.9, 2, 0.7)
    assert not any(k.startswith("search_best") for k in scores)  # no earlier stage, no extra column
    assert tables_of(evals, "accuracy")["best_confusion"] == [[2]]
    retrained = evals + [{"step": 4, "stage": "retrain", "accuracy": 0.6, "confusion": [[4]]},
                         {"step": 5, "stage": "retrain", "accuracy": 0.4, "confusion": [[5]]}]
    scores = best_and_last(retrained, "accuracy")
    assert (scores["best_accuracy"], scores["best_step"], scores["search_best_accuracy"]) == (0.6, 4, 0.9)
    assert tables_of(retrained, "accuracy")["best_confusion"] == [[4]]
