"""CoLA: PiSSA split init, the three strategies at step 0, merge/unmerge, save/load, the parameter formula."""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.methods.cola import heuristic_pairs
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, meta_model
from tests.methods.common import adapt, check_merge_unmerge, check_save_load, identity_gap, randomize


def principal(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def test_full_strategy_is_identity_at_init():
    assert identity_gap("minilm-l6", "cola") < 1e-5


@pytest.mark.parametrize("strategy,share", [("full", 1.0), ("random", 1 / 3), ("heuristic", 1 / 2)])
def test_step_zero_behaviour_of_each_strategy(strategy, share):
    """(#A, #B) = (2, 3), r = 8: the adapter contributes U_r S_r V_r^T times 1, 1/#B, 1/#A; base keeps the residual."""
    reference, _ = base_model("tiny-roberta")
    model, _ = base_model("tiny-roberta")
    adapt(model, name="cola", strategy=strategy)
    for name, layer in adapted_layers(model).items():
        w0 = reference.get_submodule(name).weight
        top = principal(w0, 8)
        assert torch.allclose(layer.weight, w0 - top, atol=1e-5)
        x = torch.randn(4, layer.in_features)
        for mode in (layer.train, layer.eval):  # random pairs in training, the expectation in evaluation
            mode()
            with torch.no_grad():
                assert torch.allclose(layer.delta(x), x @ (share * top).T, atol=1e-5)


def test_heuristic_pairs():
    assert heuristic_pairs(2, 3) == [(0, 0), (1, 1), (0, 2)]
    assert heuristic_pairs(2, 4) == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert heuristic_pairs(3, 7) == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5), (0, 6)]


def test_random_strategy_draws_pairs_in_training_only():
    model, _ = base_model("tiny-roberta")
    adapt(model, name="cola", strategy="random")
    randomize(model)
    layer = next(iter(adapted_layers(model).values()))
    x = torch.randn(4, layer.in_features)
    layer.train()
    with torch.no_grad():
        torch.manual_seed(0)
        outs = {tuple(layer.delta(x).flatten()[:3].tolist()) for _ in range(12)}
        assert len(outs) > 1  # B is drawn anew at each forward pass
        layer.eval()
        expected = x @ (layer.lora_B.mean(0) @ layer.lora_A.sum(0) * layer.scaling).T
        assert torch.allclose(layer.delta(x), expected, atol=1e-6)


@pytest.mark.parametrize("strategy", ["full", "random", "heuristic"])
def test_merge_unmerge_and_save_load(tmp_path, strategy):
    """Merging uses the evaluation-time update (for `random`, the expectation over the draw)."""
    check_merge_unmerge("tiny-roberta", "cola", strategy=strategy)
    check_save_load(tmp_path, "tiny-roberta", "cola", strategy=strategy)


@pytest.mark.parametrize("num_a,num_b,r", [(2, 3, 8), (1, 3, 4), (3, 3, 2)])
def test_parameter_formula(num_a, num_b, r):
    """Per matrix r (#A in + #B out); RoBERTa-base query,value: 24 r (#A + #B) 768."""
    model = meta_model("roberta", **ROBERTA_BASE)
    adapt(model, name="cola", heads=(), num_a=num_a, num_b=num_b, r=r)
    assert count_parameters(model)[0] == 24 * r * (num_a * 768 + num_b * 768)
    if (num_a, num_b, r) == (2, 3, 8):
        assert count_parameters(model)[0] == 737_280


def test_invalid_combinations_are_clear_errors():
    with pytest.raises(LrbenchError, match="strategy='best'.*full, random, heuristic"):
        adapt(base_model("tiny-roberta")[0], name="cola", strategy="best")
    with pytest.raises(LrbenchError, match="num_a <= num_b"):
        adapt(base_model("tiny-roberta")[0], name="cola", strategy="heuristic", num_a=3, num_b=2)
