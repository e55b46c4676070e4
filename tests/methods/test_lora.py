"""LoRA: identity at init, merge/unmerge, save/load, exact counts, Conv1D, and numerical equality with peft."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, batch_for, meta_model
from tests.methods.common import adapt, check_merge_unmerge, check_save_load, identity_gap, randomize


@pytest.mark.parametrize("model_name", ["tiny-roberta", "minilm-l6", "tiny-gpt2"])
def test_identity_at_init(model_name):
    targets = ("c_attn",) if "gpt2" in model_name else ("query", "value")
    assert identity_gap(model_name, "lora", targets=targets) < 1e-6


@pytest.mark.parametrize("model_name,targets", [("tiny-roberta", ("query", "value")), ("tiny-gpt2", ("c_attn",))])
def test_merge_unmerge_equality(model_name, targets):
    check_merge_unmerge(model_name, "lora", targets=targets)


def test_save_load_round_trip(tmp_path):
    check_save_load(tmp_path, "tiny-roberta", "lora", atol=1e-7)


def test_parameter_count_roberta_base():
    """LoRA r=8 on query and value of RoBERTa-base: 12 layers x 2 x 8 x (768 + 768) = 294,912."""
    model = meta_model("roberta", **ROBERTA_BASE)
    adapt(model, heads=())
    assert count_parameters(model)[0] == 294_912


def test_trainable_groups_and_frozen_backbone():
    model, _ = base_model("tiny-roberta")
    _, groups = adapt(model)
    assert set(groups) == {"adapter", "head"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or n.startswith("classifier.") for n in trainable)
    assert len(groups["adapter"]) == 2 * 2 * 2  # 2 layers x {query, value} x {A, B}


def test_impossible_rank_is_a_clear_error():
    model, _ = base_model("tiny-roberta")
    with pytest.raises(LrbenchError, match=r"rank r=33 is impossible .*1 <= r <= 32"):
        adapt(model, r=33)
    with pytest.raises(LrbenchError, match="rank r=0"):
        adapt(base_model("tiny-roberta")[0], r=0)


def test_unknown_target_lists_the_valid_names():
    model, _ = base_model("tiny-roberta")
    with pytest.raises(LrbenchError, match="no layer matches targets.*query"):
        adapt(model, targets=("q_proj",))


def peft_twin(model, r, alpha, use_dora=False):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"], lora_dropout=0.0, use_dora=use_dora)
    return get_peft_model(model, config)


def copy_into_peft(ours, theirs):
    for name, layer in adapted_layers(ours).items():
        target = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            if hasattr(layer, "magnitude"):
                target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def peft_grad(theirs, name, kind):
    module = theirs.base_model.model.get_submodule(name)
    if kind == "magnitude":
        return module.lora_magnitude_vector["default"].weight.grad
    return getattr(module, kind)["default"].weight.grad


@pytest.mark.parametrize("model_name", ["minilm-l6", "tiny-roberta"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_matches_peft_outputs_and_gradients(model_name, method):
    """Same initial weights -> same logits and same gradients as peft (LoraConfig, use_dora) within 1e-5."""
    ours, tok = base_model(model_name)
    theirs = peft_twin(copy.deepcopy(ours), 8, 16, use_dora=method == "dora")
    adapt(ours, name=method, heads=())
    randomize(ours)
    copy_into_peft(ours, theirs)
    batch = batch_for(tok)
    labels = torch.tensor([1, 0])
    for model in (ours, theirs):
        model.eval()  # the backbone's own dropout would draw different masks; gradients flow in eval mode too
    out_ours = ours(**batch, labels=labels)
    out_theirs = theirs(**batch, labels=labels)
    assert (out_ours.logits - out_theirs.logits).abs().max().item() < 1e-5
    out_ours.loss.backward()
    out_theirs.loss.backward()
    checked = 0
    for name, layer in adapted_layers(ours).items():
        for attr, kind in (("lora_A", "lora_A"), ("lora_B", "lora_B"), ("magnitude", "magnitude")):
            if hasattr(layer, attr):
                ref = peft_grad(theirs, name, kind)
                assert (getattr(layer, attr).grad - ref).abs().max().item() < 1e-5, (name, attr)
                assert ref.abs().max() > 0  # a real, non-vanishing gradient was compared
                checked += 1
    assert checked == len(adapted_layers(ours)) * (3 if method == "dora" else 2)
