"""CURLoRA: identity, only U trains, the inverted-probability sampler (chi-square), counts, Conv1D, save/load."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from lowrank_bench.methods.base import adapted_layers, load_adapter, save_adapter
from lowrank_bench.methods.curlora import inverted_probabilities, sample_indices
from lowrank_bench.models import count_parameters
from tests.conftest import base_model, batch_for, meta_model
from tests.methods.common import adapt, check_merge_unmerge, randomize


@pytest.mark.parametrize("model_name,targets", [("minilm-l6", ("query", "key", "value")), ("tiny-gpt2", ("c_attn",))])
def test_identity_at_init_and_only_u_trains(model_name, targets):
    base, tok = base_model(model_name)
    model, _ = base_model(model_name)
    _, groups = adapt(model, name="curlora", targets=targets, r=8, heads=())
    batch = batch_for(tok)
    with torch.no_grad():
        assert (model(**batch).logits - base(**batch).logits).abs().max().item() < 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".U") for n in trainable)
    assert sum(p.numel() for p in groups["adapter"]) == len(adapted_layers(model)) * 64


def test_c_and_r_are_columns_and_rows_of_w():
    model, _ = base_model("tiny-gpt2")  # Conv1D: the (out, in) view is the transpose of the stored weight
    adapt(model, name="curlora", targets=("c_attn",), r=8)
    for layer in adapted_layers(model).values():
        w = layer.base.weight.T
        assert torch.equal(layer.C, w[:, layer.cols]) and torch.equal(layer.R, w[layer.rows, :])
        assert len(set(layer.cols.tolist())) == 8  # without replacement by default


def test_sampler_follows_the_inverted_probabilities():
    """Chi-square goodness of fit of 40,000 single draws against p~_j = (1/p_j) / sum(1/p_i)."""
    norms = torch.tensor([0.2, 0.5, 1.0, 1.5, 3.0, 4.0, 6.0, 9.0]) ** 2
    probs = inverted_probabilities(norms)
    p = norms.double() / norms.double().sum()
    assert torch.allclose(probs, (1 / p) / (1 / p).sum(), atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    draws = sample_indices(probs, 40_000, replacement=True, generator=gen)
    observed = torch.bincount(draws, minlength=8).numpy()
    expected = (probs * 40_000).numpy()
    assert chisquare(observed, expected).pvalue > 0.001
    wrong = (p * 40_000).numpy()  # the un-inverted distribution is clearly rejected
    assert chisquare(observed, wrong).pvalue < 1e-12


def test_official_smoothing_is_nearly_uniform_for_wide_matrices():
    norms = torch.rand(4096, generator=torch.Generator().manual_seed(0)) + 0.5
    smoothed = inverted_probabilities(norms, smoothing=0.001)
    assert (smoothed.max() / smoothed.min()).item() < 1.25
    assert (inverted_probabilities(norms).max() / inverted_probabilities(norms).min()).item() > 2.0


def test_seeded_and_reloads_to_the_same_function(tmp_path):
    model, tok = base_model("tiny-roberta")
    adapt(model, name="curlora", targets=("query", "key", "value"), r=8, seed=5)
    randomize(model)
    again, _ = base_model("tiny-roberta")
    adapt(again, name="curlora", targets=("query", "key", "value"), r=8, seed=5)
    assert all(torch.equal(a.cols, b.cols) for a, b in zip(adapted_layers(model).values(), adapted_layers(again).values()))
    save_adapter(model, tmp_path / "a.safetensors")
    other, _ = base_model("tiny-roberta")
    adapt(other, name="curlora", targets=("query", "key", "value"), r=8, seed=99)  # different C, R until loaded
    batch = batch_for(tok)
    with torch.no_grad():
        assert not torch.allclose(other(**batch).logits, model(**batch).logits)
        load_adapter(other, tmp_path / "a.safetensors")
        assert torch.equal(other(**batch).logits, model(**batch).logits)


def test_merge_unmerge():
    check_merge_unmerge("tiny-gpt2", "curlora", targets=("c_attn",), r=8)


def test_parameter_count_mistral_7b():
    """Paper Sec. 4.5: r=16 on q, k, v of Mistral-7B: 32 x 3 x 16^2 = 24,576."""
    model = meta_model("mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8)
    adapt(model, name="curlora", targets=("q_proj", "k_proj", "v_proj"), r=16, heads=())
    assert count_parameters(model)[0] == 24_576


def test_parameter_count_gpt2_large():
    """The official notebook: r=8 on the fused c_attn of GPT-2 large: 36 x 8^2 = 2,304."""
    model = meta_model("gpt2", n_embd=1280, n_layer=36, n_head=20)
    adapt(model, name="curlora", targets=("c_attn",), r=8, heads=())
    assert count_parameters(model)[0] == 2_304
