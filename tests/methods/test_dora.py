"""DoRA: magnitude initialisation, identity, merge/unmerge, counts, and the detached-norm property.
(Equality with peft's `use_dora=True` is tested with LoRA's in test_lora.py.)"""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, batch_for, meta_model
from tests.methods.common import adapt, check_merge_unmerge, check_save_load, randomize


def test_magnitude_starts_at_row_norms_and_output_is_identity():
    base, tok = base_model("minilm-l6")
    model, _ = base_model("minilm-l6")
    adapt(model, name="dora")
    for layer in adapted_layers(model).values():
        assert torch.allclose(layer.magnitude, layer.weight.norm(dim=1))
        assert layer.magnitude.shape == (layer.out_features,)
    batch = batch_for(tok)
    with torch.no_grad():
        assert (model(**batch).logits - base(**batch).logits).abs().max() < 1e-5


@pytest.mark.parametrize("model_name,targets", [("tiny-roberta", ("query", "value")), ("tiny-gpt2", ("c_attn",))])
def test_merge_unmerge_equality(model_name, targets):
    check_merge_unmerge(model_name, "dora", targets=targets)


def test_save_load_round_trip(tmp_path):
    check_save_load(tmp_path, "tiny-roberta", "dora")


def test_merged_weight_has_the_magnitude_as_row_norms():
    model, _ = base_model("tiny-roberta")
    method, _ = adapt(model, name="dora")
    randomize(model)
    layer = next(iter(adapted_layers(model).values()))
    method.merge(model)
    assert torch.allclose(layer.weight.norm(dim=1), layer.magnitude.detach().abs(), atol=1e-5)


def test_parameter_count_roberta_base():
    """DoRA r=8 on query and value: 294,912 (A, B) + 24 x 768 = 18,432 (magnitudes) = 313,344."""
    model = meta_model("roberta", **ROBERTA_BASE)
    adapt(model, name="dora", heads=())
    assert count_parameters(model)[0] == 313_344


def test_detached_norm_changes_direction_gradients_only():
    """With the norm detached (DoRA Sec. 4.3) the direction's gradient lacks the norm's term; the magnitude's
    gradient is identical either way."""
    grads = {}
    for detach in (True, False):
        model, tok = base_model("tiny-roberta")
        torch.manual_seed(0)  # the same A for both variants
        adapt(model, name="dora", detach_norm=detach)
        randomize(model)
        model(**batch_for(tok), labels=torch.tensor([1, 0])).loss.backward()
        layer = next(iter(adapted_layers(model).values()))
        grads[detach] = (layer.lora_B.grad.clone(), layer.magnitude.grad.clone())
    def rel(a, b):
        return ((a - b).norm() / a.norm()).item()

    assert rel(grads[True][1], grads[False][1]) < 1e-5
    assert rel(grads[True][0], grads[False][0]) > 1e-2
