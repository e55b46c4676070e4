"""Shared fixtures. Nothing here touches the network: Hub names resolve to an unroutable local endpoint."""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lowrank_bench.models import Head, load_model, load_tokenizer, quiet_transformers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "lowrank_bench" / "conf"
DATA = Path(os.environ["LRBENCH_DATA_DIR"]) if os.environ.get("LRBENCH_DATA_DIR") else None

needs_data = pytest.mark.skipif(
    DATA is None or not DATA.is_dir(),
    reason="real data absent: set LRBENCH_DATA_DIR to the shared data folder (CI sets it to ../shared/data)",
)


@pytest.fixture
def one_thread():
    """Tiny models: a second thread only adds synchronisation (and stalls on a shared machine). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_leftover_log_handlers():
    """A Hydra job run in process (the bad-input tables, the CLI tests) configures the root logger: a console handler
    bound to that test's captured output and the run's train.log. Left there, a later test's log line goes to a closed
    stream or a deleted folder and prints `--- Logging error ---` into that test's stderr."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def isolated_env(tmp_path_factory):
    """Results, outputs, caches and the HF home of the test session live in a temporary folder."""
    tmp = tmp_path_factory.mktemp("lrbench")
    os.environ.update({
        "LRBENCH_RESULTS_CSV": str(tmp / "results" / "runs.csv"),
        "LRBENCH_OUTPUT_DIR": str(tmp / "outputs"),
        "LRBENCH_CACHE_DIR": str(tmp / "cache"),
        "HF_HOME": str(tmp / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: any Hub call is refused at once, locally
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp / "wandb"),
    })
    os.environ.pop("HF_HUB_OFFLINE", None)
    quiet_transformers()
    yield tmp


def compose_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def model_cfg(name: str):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def method_cfg(name: str, **overrides):
    """A method's YAML under a root with `seed: 0`, so that interpolations such as `${seed}` resolve."""
    root = OmegaConf.create({"seed": 0})
    root.method = OmegaConf.merge(OmegaConf.load(CONF / "method" / f"{name}.yaml"), overrides)
    return root.method


_CACHE: dict = {}


def base_model(name: str, num_labels: int = 2, seed: int = 0):
    """A fresh copy of a (cached) model with a sequence-classification head: weights identical on every call."""
    key = (name, num_labels, seed)  # (the name alone let a 3-label copy reach a later 2-label test)
    if key not in _CACHE:
        torch.manual_seed(seed)
        cfg = model_cfg(name)
        tokenizer = load_tokenizer(cfg)
        _CACHE[key] = (load_model(cfg, Head("sequence_classification", num_labels), tokenizer.pad_token_id).eval(),
                       tokenizer)
    model, tokenizer = _CACHE[key]
    return copy.deepcopy(model), tokenizer


def batch_for(tokenizer, texts=("a gripping, beautiful film.", "the plot was dull and the acting weak."),
              pairs=None):
    return tokenizer(list(texts), list(pairs) if pairs else None, padding=True, return_tensors="pt")


def meta_model(model_type: str, **config):
    """A model of real size with no weights (meta device): for exact parameter counts."""
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(AutoConfig.for_model(model_type, **config))


ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)
