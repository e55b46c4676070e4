"""BiDoRA: identity at init, merge/unmerge, save/load, exact counts, the regulariser, the official orientation."""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, meta_model
from tests.methods.common import adapt, check_merge_unmerge, check_save_load, identity_gap, randomize


@pytest.mark.parametrize("model_name", ["minilm-l6", "tiny-roberta"])
def test_identity_at_init(model_name):
    assert identity_gap(model_name, "bidora") < 1e-5


def test_parameter_counts_roberta_base_match_the_paper():
    """r=4 on query,value of RoBERTa-base: 147,456 direction + 18,432 magnitude = 0.17M (BiDoRA Table 1)."""
    model = meta_model("roberta", **ROBERTA_BASE)
    _, groups = adapt(model, name="bidora", heads=(), r=4)
    assert sum(p.numel() for p in groups["adapter"]) == 147_456
    assert sum(p.numel() for p in groups["magnitude"]) == 18_432
    assert count_parameters(model)[0] == 165_888


def test_levels_split_roles():
    from lowrank_bench.methods.bidora import BiDoRA

    assert BiDoRA.levels == {"lower": ("adapter", "head"), "upper": ("magnitude",)}


@pytest.mark.parametrize("orientation", ["standard", "official"])
def test_merge_unmerge_and_save_load(tmp_path, orientation):
    check_merge_unmerge("tiny-roberta", "bidora", orientation=orientation)
    check_save_load(tmp_path, "tiny-roberta", "bidora", orientation=orientation)


def test_direction_regulariser_is_the_mean_frobenius_distance_of_unit_rows():
    model, _ = base_model("tiny-roberta")
    method, _ = adapt(model, name="bidora", direction_reg=1e-5)
    randomize(model)
    expected = []
    for layer in adapted_layers(model).values():
        v = layer.weight + layer.lora_B @ layer.lora_A * layer.scaling
        d = v / v.norm(dim=1, keepdim=True)
        expected.append(torch.linalg.norm(d @ d.T - torch.eye(d.shape[0]), "fro"))
    assert torch.allclose(method.regularizer(model), 1e-5 * torch.stack(expected).mean())
    assert adapt(base_model("tiny-roberta")[0], name="bidora", direction_reg=0.0)[0].regularizer(model) is None


def test_official_orientation_reproduces_the_transposed_layer():
    """Digest B1: at init the official layer computes x @ W0 (not W0 x); magnitudes are per column."""
    model, tok = base_model("tiny-roberta")
    adapt(model, name="bidora", orientation="official")
    layer = next(iter(adapted_layers(model).values()))
    assert torch.allclose(layer.magnitude, layer.weight.norm(dim=0))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ layer.weight + layer.base.bias, atol=1e-5)
        assert not torch.allclose(layer(x), layer.base(x), atol=1e-3)


def test_official_orientation_refuses_non_square_weights():
    model, _ = base_model("tiny-roberta")
    with pytest.raises(LrbenchError, match="needs square weights.*intermediate.dense"):
        adapt(model, name="bidora", orientation="official", targets=("intermediate.dense",))
