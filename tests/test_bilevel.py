"""The bi-level engine: hypergradient modes against a known answer, level separation, data split, retraining."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lowrank_bench.bilevel import BiLevel, hypergradient, split_indices, use_eager_attention
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
    exact, _ = hypergradient(upper, lower, [m], [V], "exact")
    first, _ = hypergradient(upper, lower, [m], [V], "first_order")
    assert rel_err(exact, [expected]) < 1e-12       # double backward is exact
    assert rel_err(darts, [expected]) < 1e-6        # the central difference is exact on a quadratic term in m
    assert cosine(darts, exact) > 0.99999
    assert torch.allclose(first[0], c)              # first order is the direct gradient only
    assert cosine(first, exact) < 0.9 and rel_err(first, exact) > 0.1


def test_darts_agrees_with_exact_on_bidora():
    """On a real (nonlinear) BiDoRA model the finite difference approximates the Hessian-vector product."""
    cfg = compose_cfg("method=bidora", "model=tiny-roberta", "method.r=4")
    s = prepare(cfg)
    model, task = s.model.eval().double(), s.task  # eval: no dropout; float64: no round-off in the difference
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
    stages = stages_for(s.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
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
