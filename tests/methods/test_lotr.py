"""LoTR: identity at init (both inits), merge/unmerge, save/load, shared factors, exact counts, the SVD init."""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, meta_model
from tests.methods.common import adapt, check_merge_unmerge, check_save_load, identity_gap


@pytest.mark.parametrize("init", ["normal", "svd"])
def test_identity_at_init(init):
    assert identity_gap("minilm-l6", "lotr", init=init) < 1e-5


@pytest.mark.parametrize("share", ["all_targets", "per_matrix_type"])
def test_factors_are_shared(share):
    model, _ = base_model("tiny-roberta")
    adapt(model, name="lotr", share=share)
    layers = adapted_layers(model)
    ls = {name.rsplit(".", 1)[-1]: set() for name in layers}
    for name, layer in layers.items():
        ls[name.rsplit(".", 1)[-1]].add(id(layer.L))
    distinct = {i for ids in ls.values() for i in ids}
    assert len(distinct) == (1 if share == "all_targets" else 2)
    assert len({id(layer.G) for layer in layers.values()}) == len(layers)  # one core per matrix


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16, 32])
def test_parameter_count_roberta_base_one_shared_pair(r):
    """One shared (L, R) on RoBERTa-base query,value: 1536 r + 24 r^2 (the official repo's table, minus its head)."""
    model = meta_model("roberta", **ROBERTA_BASE)
    adapt(model, name="lotr", heads=(), r=r)
    assert count_parameters(model)[0] == 1536 * r + 24 * r * r


def test_parameter_count_per_matrix_type():
    model = meta_model("roberta", **ROBERTA_BASE)
    adapt(model, name="lotr", heads=(), r=8, share="per_matrix_type")
    assert count_parameters(model)[0] == 2 * 1536 * 8 + 24 * 64


@pytest.mark.parametrize("init", ["normal", "svd"])
def test_merge_unmerge_and_save_load(tmp_path, init):
    check_merge_unmerge("tiny-roberta", "lotr", init=init)
    check_save_load(tmp_path, "tiny-roberta", "lotr", init=init)


def test_svd_init_is_a_tucker2_projection():
    model, _ = base_model("tiny-roberta")
    reference, _ = base_model("tiny-roberta")
    adapt(model, name="lotr", init="svd", r=4)
    layers = adapted_layers(model)
    first = next(iter(layers.values()))
    eye = torch.eye(4)
    assert torch.allclose(first.L.T @ first.L, eye, atol=1e-5) and torch.allclose(first.R.T @ first.R, eye, atol=1e-5)
    for name, layer in layers.items():
        w0 = reference.get_submodule(name).weight
        projected = first.L @ first.L.T @ w0 @ first.R @ first.R.T
        assert torch.allclose(layer.delta_weight(), projected, atol=1e-5)
        assert torch.allclose(layer.weight + layer.delta_weight(), w0, atol=1e-5)


def test_sharing_across_different_shapes_is_a_clear_error():
    from lowrank_bench.errors import LrbenchError

    model, _ = base_model("tiny-roberta")
    with pytest.raises(LrbenchError, match=r"shares \(L, R\) across 'all'.*64x32.*per_matrix_type"):
        adapt(model, name="lotr", targets=("query", "intermediate.dense"))
