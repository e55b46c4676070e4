"""The checks every adapter passes, shared by the per-method test modules."""
from __future__ import annotations

import torch

from lowrank_bench.methods import build
from lowrank_bench.methods.base import adapted_layers, load_adapter, save_adapter
from tests.conftest import base_model, batch_for, method_cfg

TARGET_SETS = {"default": ["query", "value"], "qkv": ["query", "key", "value"]}


def adapt(model, name="lora", targets=None, heads=("classifier",), **options):
    """Apply a method from its YAML (plus overrides); `targets` overrides the YAML's choice of modules."""
    if targets is not None:
        options["targets"] = list(targets)
    method = build(method_cfg(name, **options))
    groups = method.apply(model, list(heads), TARGET_SETS)
    return method, groups


def randomize(model, seed=1):
    """Move every adapter away from its (identity) initialisation, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for _, _, p in layer.role_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def identity_gap(model_name: str, name: str, **options) -> float:
    """max |adapted(x) - base(x)| right after the method is applied."""
    base, tok = base_model(model_name)
    model, _ = base_model(model_name)
    adapt(model, name=name, **options)
    batch = batch_for(tok)
    with torch.no_grad():
        return (model(**batch).logits - base(**batch).logits).abs().max().item()


def check_merge_unmerge(model_name: str, name: str, atol: float = 1e-5, **options) -> None:
    """Merged outputs equal unmerged ones, and unmerging restores outputs and base weights."""
    model, tok = base_model(model_name)
    method, _ = adapt(model, name=name, **options)
    randomize(model)
    model.eval()
    batch = batch_for(tok)
    weights = {n: layer.weight.clone() for n, layer in adapted_layers(model).items()}
    with torch.no_grad():
        before = model(**batch).logits
        method.merge(model)
        merged = model(**batch).logits
        method.unmerge(model)
        after = model(**batch).logits
    assert (merged - before).abs().max() < atol
    assert (after - before).abs().max() < atol
    assert (before - base_model(model_name)[0](**batch).logits).abs().max() > 1e-6  # the adapter matters
    for n, layer in adapted_layers(model).items():
        assert (layer.weight - weights[n]).abs().max() < atol


def check_save_load(tmp_path, model_name: str, name: str, atol: float = 1e-6, **options) -> None:
    """A fresh application (under another random seed) plus the saved file reproduces the trained function."""
    model, tok = base_model(model_name)
    torch.manual_seed(0)
    adapt(model, name=name, **options)
    randomize(model)
    save_adapter(model, tmp_path / "adapter.safetensors")
    fresh, _ = base_model(model_name)
    torch.manual_seed(1)
    adapt(fresh, name=name, **options)
    batch = batch_for(tok)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        load_adapter(fresh, tmp_path / "adapter.safetensors")
        assert (fresh(**batch).logits - expected).abs().max() < atol
