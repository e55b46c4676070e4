"""BiLoRA: identity at init, merge/unmerge, counts, the Lambda parameterisations, both regularisers and both inits."""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.hypergradient import hypergradient
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, batch_for, meta_model
from tests.methods.common import adapt, check_merge_unmerge, check_save_load, identity_gap, randomize


@pytest.mark.parametrize("param", ["softmax", "real", "binary"])
def test_identity_at_init(param):
    assert identity_gap("minilm-l6", "bilora", lambda_param=param) < 1e-5


def test_parameter_counts_roberta_base():
    """r=4 on query,value: P, Q = 24 x 4 x (768 + 768) = 147,456; Lambda = 24 x 4 = 96."""
    model = meta_model("roberta", **ROBERTA_BASE)
    _, groups = adapt(model, name="bilora", heads=(), r=4)
    assert sum(p.numel() for p in groups["adapter"]) == 147_456
    assert sum(p.numel() for p in groups["singular_values"]) == 96
    assert count_parameters(model)[0] == 147_552


@pytest.mark.parametrize("param", ["softmax", "real", "binary"])
def test_merge_unmerge_and_save_load(tmp_path, param):
    check_merge_unmerge("tiny-roberta", "bilora", lambda_param=param)
    check_save_load(tmp_path, "tiny-roberta", "bilora", lambda_param=param)


def test_delta_is_p_lambda_q():
    model, _ = base_model("tiny-roberta")
    adapt(model, name="bilora", lambda_param="softmax", r=4, alpha=8)
    randomize(model)
    layer = next(iter(adapted_layers(model).values()))
    lam = torch.softmax(layer.theta, 0)
    assert torch.allclose(lam.sum(), torch.tensor(1.0))
    expected = layer.P @ torch.diag(lam) @ layer.Q * (8 / 4)
    assert torch.allclose(layer.delta_weight(), expected, atol=1e-6)
    x = torch.randn(5, layer.in_features)
    assert torch.allclose(layer.delta(x), x @ expected.T, atol=1e-5)


def test_regularisers():
    model, _ = base_model("tiny-roberta")
    method, _ = adapt(model, name="bilora", lambda_param="binary", orth_reg=0.5, binary_reg=0.2, r=4)
    randomize(model)
    layers = list(adapted_layers(model).values())
    eye = torch.eye(4)
    orth = torch.stack([((l.P.T @ l.P - eye) ** 2).sum() + ((l.Q @ l.Q.T - eye) ** 2).sum() for l in layers]).mean()
    assert torch.allclose(method.regularizer(model), 0.5 * orth)
    lam = torch.cat([torch.sigmoid(l.theta) for l in layers])
    assert torch.allclose(method.upper_regularizer(model), 0.2 * (lam * (1 - lam)).mean())
    softmax_method, _ = adapt(base_model("tiny-roberta")[0], name="bilora", lambda_param="softmax")
    assert softmax_method.upper_regularizer(model) is None


@pytest.mark.parametrize("param", ["softmax", "real", "binary"])
@pytest.mark.parametrize("init", ["lora", "adalora"])
def test_identity_at_init_for_both_inits(param, init):
    assert identity_gap("tiny-roberta", "bilora", lambda_param=param, init=init) < 1e-5


@pytest.mark.parametrize("param", ["softmax", "real"])
def test_adalora_init_merge_unmerge_and_save_load(tmp_path, param):
    check_merge_unmerge("tiny-roberta", "bilora", lambda_param=param, init="adalora")
    check_save_load(tmp_path, "tiny-roberta", "bilora", lambda_param=param, init="adalora")


def test_adalora_init_is_gaussian_p_and_q_with_lambda_zero_and_keeps_the_parameter_count():
    model, _ = base_model("tiny-roberta")
    adapt(model, name="bilora", lambda_param="real", init="adalora", r=4)
    layer = next(iter(adapted_layers(model).values()))
    assert torch.equal(layer.theta, torch.zeros(4))
    for factor in (layer.P, layer.Q):
        assert 0.015 < factor.std().item() < 0.025
    meta = meta_model("roberta", **ROBERTA_BASE)
    adapt(meta, name="bilora", heads=(), r=4, init="adalora")
    assert count_parameters(meta)[0] == 147_552


def first_lambda_hypergradient(init: str, mode: str) -> torch.Tensor:
    """The hypergradient for theta at initialisation, on a tiny model (lower = P, Q; upper = theta)."""
    model, tok = base_model("tiny-roberta")
    torch.manual_seed(0)
    _, groups = adapt(model, name="bilora", heads=(), init=init, r=4)
    upper_batch = batch_for(tok)
    lower_batch = batch_for(tok, texts=("a dull film.", "a beautiful plot."))
    labels = torch.tensor([1, 0])
    upper_loss = lambda: model(**upper_batch, labels=labels).loss
    lower_loss = lambda: model(**lower_batch, labels=labels.flip(0)).loss
    grads, _ = hypergradient(upper_loss, lower_loss, groups["singular_values"], groups["adapter"], mode)
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("mode", ["first_order", "darts"])
def test_adalora_init_gives_lambda_a_first_hypergradient(mode):
    assert first_lambda_hypergradient("adalora", mode).abs().max() > 1e-8


def test_lora_init_gives_lambda_no_first_order_hypergradient():
    """P = 0: dL/dlambda_i = s p_i^T G q_i = 0 exactly."""
    assert torch.equal(first_lambda_hypergradient("lora", "first_order"), torch.zeros(2 * 2 * 4))
