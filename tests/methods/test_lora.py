"""LoRA: identity at init, merge/unmerge, save/load, exact counts, Conv1D, and numerical equality with peft."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods import build
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.methods.lora import LoRALayer
from lowrank_bench.models import count_parameters
from tests.conftest import ROBERTA_BASE, base_model, batch_for, meta_model, method_cfg
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


# --- method.init_a: which fan Kaiming-uniform divides by (issue 23 point 2) -------------------------------------


def first_layer(name="lora", model_name="minilm-l6", seed=7, **options):
    """The first adapted layer (query of layer 0: 384 -> 384 on minilm-l6) after applying under `seed`."""
    model, _ = base_model(model_name)
    torch.manual_seed(seed)
    adapt(model, name=name, heads=(), **options)
    return next(iter(adapted_layers(model).values()))


def test_init_a_kaiming_fan_rank_is_their_in_by_r_draw_transposed():
    """A is the (in, r) tensor their lora.py draws, U(+-1/sqrt(r)), transposed: under the same seed it is
    (2u - 1) / sqrt(r) with u = torch.rand(in, r), computed here without kaiming_uniform_."""
    r = 8
    layer = first_layer(r=r, init_a="kaiming_fan_rank")
    torch.manual_seed(7)
    expected = ((2 * torch.rand(layer.in_features, r) - 1) / r ** 0.5).T
    assert layer.lora_A.shape == (r, 384)
    assert (layer.lora_A - expected).abs().max().item() < 1e-7
    bound = layer.lora_A.abs().max().item()
    assert 0.9 / r ** 0.5 < bound <= 1 / r ** 0.5  # 3,072 draws: the max is within 0.1 % of the bound
    assert (layer.lora_B == 0).all()


def test_init_a_default_is_kaiming_fan_in_with_unchanged_draws():
    """The default draws the (r, in) tensor as before: (2u - 1) / sqrt(in) with u = torch.rand(r, in), so default
    runs consume the RNG as they always did and keep their numbers."""
    r = 8
    for options in ({}, {"init_a": "kaiming_fan_in"}):
        layer = first_layer(r=r, **options)
        torch.manual_seed(7)
        expected = (2 * torch.rand(r, layer.in_features) - 1) / layer.in_features ** 0.5
        assert (layer.lora_A - expected).abs().max().item() < 1e-7
        assert 0.9 / 384 ** 0.5 < layer.lora_A.abs().max().item() <= 1 / 384 ** 0.5


@pytest.mark.parametrize("r,in_features", [(16, 4096), (8, 1280), (1, 768), (32, 768)])
def test_init_a_kaiming_fan_rank_is_sqrt_in_over_r_wider(r, in_features):
    """The issue's ratios (Mistral-7B r=16: 16x; GPT-2 L c_attn r=8: 12.6x; RoBERTa-base r=1..32: 27.7x..4.9x),
    measured on real layers of those input widths."""
    wide = LoRALayer(nn.Linear(in_features, 64), r, 1.0, init_a="kaiming_fan_rank").lora_A.abs().max().item()
    narrow = LoRALayer(nn.Linear(in_features, 64), r, 1.0).lora_A.abs().max().item()
    assert wide <= 1 / r ** 0.5 and narrow <= 1 / in_features ** 0.5
    assert wide / narrow == pytest.approx((in_features / r) ** 0.5, rel=0.02)


@pytest.mark.parametrize("model_name", ["minilm-l6", "tiny-gpt2"])
def test_identity_at_init_with_kaiming_fan_rank(model_name):
    targets = ("c_attn",) if "gpt2" in model_name else ("query", "value")
    assert identity_gap(model_name, "lora", targets=targets, init_a="kaiming_fan_rank") < 1e-6


def test_kaiming_fan_rank_follows_the_base_weights_dtype_and_device():
    layer = LoRALayer(nn.Linear(64, 32).to(torch.float64), 4, 1.0, init_a="kaiming_fan_rank")
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.is_contiguous()
    meta = LoRALayer(nn.Linear(64, 32, device="meta"), 4, 1.0, init_a="kaiming_fan_rank")
    assert meta.lora_A.device.type == "meta" and meta.lora_A.shape == (4, 64)


def test_unknown_init_a_is_one_clear_error_naming_the_choices():
    with pytest.raises(LrbenchError, match=r"method.init_a='kaiming'.*valid: kaiming_fan_in, kaiming_fan_rank"):
        build(method_cfg("lora", init_a="kaiming"))


@pytest.mark.parametrize("name", ["dora", "bidora"])
def test_subclasses_refuse_loras_init_a_rather_than_ignore_it(name):
    with pytest.raises(LrbenchError, match=rf"method.init_a=kaiming_fan_rank is LoRA's option; method '{name}'"):
        build(method_cfg(name, init_a="kaiming_fan_rank"))


def test_subclasses_keep_their_own_initialisation():
    """DoRA draws A as LoRA's default; BiDoRA's own init_a (kaiming | normal) still works."""
    torch.manual_seed(7)
    expected = (2 * torch.rand(8, 384) - 1) / 384 ** 0.5
    assert (first_layer("dora", r=8).lora_A - expected).abs().max().item() < 1e-7
    assert (first_layer("bidora", r=8, init_a="kaiming").lora_A.abs().max().item()) <= 1 / 384 ** 0.5
    assert first_layer("bidora", r=8, init_a="normal").lora_A.abs().max().item() > 1.0  # N(0, 1): 3,072 draws
