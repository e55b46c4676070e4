"""LoTR: identity at init (both inits), merge/unmerge, save/load, shared factors, exact counts, the SVD init."""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.methods.base import adapted_layers, load_adapter, save_adapter
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, batch_for, meta_model
from tests.methods.test_lora import adapt, randomize


@pytest.mark.parametrize("init", ["normal", "svd"])
def test_identity_at_init(init):
    base, tok = base_model("minilm-l6")
    model, _ = base_model("minilm-l6")
    adapt(model, name="lotr", init=init)
    batch = batch_for(tok)
    with torch.no_grad():
        assert (model(**batch).logits - base(**batch).logits).abs().max().item() < 1e-5


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
    model, tok = base_model("tiny-roberta")
    torch.manual_seed(0)
    method, _ = adapt(model, name="lotr", init=init)
    randomize(model)
    batch = batch_for(tok)
    with torch.no_grad():
        before = model(**batch).logits
        method.merge(model)
        assert (model(**batch).logits - before).abs().max() < 1e-5
        method.unmerge(model)
        assert (model(**batch).logits - before).abs().max() < 1e-5
    save_adapter(model, tmp_path / "a.safetensors")
    fresh, _ = base_model("tiny-roberta")
    torch.manual_seed(1)  # a different random init: the file must carry everything
    adapt(fresh, name="lotr", init=init)
    load_adapter(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert (fresh(**batch).logits - before).abs().max() < 1e-6


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
