"""The composition root: every run is assembled here, for training (train.py), `mode=eval` (evaluate.py), the
multiple-choice command (mc_eval.py) and export (export.py); no entry point imports another.

    prepare(cfg)               the curriculum's tasks tokenised, the model built with its head(s), the method
                               applied, the post-training evaluations read (and scored before training)
    rebuild(run_cfg, adapter)  a saved run prepared again from its resolved config, its adapter loaded
    saved_run(folder)          (resolved config, adapter file) of a run folder
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lowrank_bench import curriculum, evaluations, methods, models
from lowrank_bench.configs import CONF_DIR
from lowrank_bench.curriculum import Curriculum
from lowrank_bench.errors import LrbenchError
from lowrank_bench.heads import DecoderClassifier, decoder_head
from lowrank_bench.methods.base import Method, load_adapter
from lowrank_bench.models import Head
from lowrank_bench.stages import unique

__all__ = ["CONF_DIR", "Setup", "prepare", "rebuild", "saved_run"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisation is done once, before any worker forks


@dataclass
class Setup:
    curriculum: Curriculum  # one task or a sequence: its tasks, heads, stages, hooks and measures
    method: Method
    model: torch.nn.Module  # what the trainer calls (PEFT baselines: their PeftModel)
    groups: dict[str, list[torch.nn.Parameter]]
    params: dict[str, int]  # trainable (adapter + head), total, and the head apart
    tokenizer: object
    load_info: dict  # where the weights came from and how long they took (GGUF dequantisation, cache)
    evaluations: list = field(default_factory=list)  # post-training evaluations (eval=mc/<benchmark>)
    before: dict = field(default_factory=dict)  # ... their scores before training (eval.before)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_model(model_cfg: DictConfig, head: Head, pad_token_id: int | None) -> torch.nn.Module:
    """The model with the task's head. A decoder classifies from its last real token and keeps its LM head."""
    if head.kind == "sequence_classification" and models.is_decoder(model_cfg):
        lm = models.load_model(model_cfg, Head("causal_lm"), pad_token_id)
        model = DecoderClassifier(lm, decoder_head(lm.config, 1 if head.regression else head.num_labels))
        model.lrbench_load_info = lm.lrbench_load_info
        return model
    return models.load_model(model_cfg, head, pad_token_id)


def head_modules(model: torch.nn.Module, head: Head) -> list[str]:
    """The task's head: the modules its head kind uses, plus any module the checkpoint did not provide (freshly
    initialised weights, such as DeBERTa's classification pooler, must train)."""
    names = [n for n in models.head_kind(head).modules if hasattr(model, n)]
    fresh = sorted({name.split(".")[0] for name in getattr(model, "lrbench_new_parameters", ())})
    return names + [n for n in fresh if n not in names]


def parameter_counts(model: torch.nn.Module, head: list[torch.nn.Parameter]) -> dict[str, int]:
    trainable, total = models.count_parameters(model)
    head_params = sum(p.numel() for p in unique(head))
    return {"trainable_params": trainable, "total_params": total, "head_params": head_params,
            "adapter_params": trainable - head_params}


def prepare(cfg: DictConfig) -> Setup:
    """Everything before training: data tokenised, model built with the curriculum's head, method applied."""
    tokenizer = models.load_tokenizer(cfg.model)  # first: an unreachable Hub model fails before anything slow
    shape = curriculum.build(cfg)
    method = methods.build(cfg.method)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    for task in shape.tasks:
        task.prepare(tokenizer, task.cfg.get("max_length") or cfg.model.max_length)
    torch.manual_seed(cfg.seed)  # the head's and adapters' initialisation must not depend on the data loading
    model = build_model(cfg.model, shape.head, tokenizer.pad_token_id)
    load_info = {f"model_{k}": v for k, v in model.lrbench_load_info.items() if k in ("load_from", "load_s")}
    post = evaluations.build(cfg, tokenizer, shape.head)  # reads its items: a bad one fails before anything slow
    before = {k: v for evaluation in post for k, v in evaluation.before(model, cfg.trainer).items()}
    head_names = head_modules(model, shape.head)
    groups = method.apply(model, head_names, models.target_sets(cfg.model))
    groups, heads = shape.attach_heads(model, head_names, groups)
    wrapped = method.wrap(model)
    return Setup(shape, method, wrapped, groups, parameter_counts(model, heads), tokenizer, load_info, post, before)


# -- a saved run -------------------------------------------------------------------------------------------------
def run_folder(folder: Path, setting: str) -> tuple[Path, Path]:
    """(config_resolved.yaml, adapter.safetensors) of a run folder; `setting` says where the folder was named."""
    if not folder.is_dir():
        raise LrbenchError(f"{setting}: no such run folder")
    config, adapter = folder / "config_resolved.yaml", folder / "adapter.safetensors"
    for path in (config, adapter):
        if not path.is_file():
            raise LrbenchError(f"{setting}: no {path.name} there (a run folder holds config_resolved.yaml and, "
                               f"unless the run had save_adapter=false, adapter.safetensors)")
    return config, adapter


def saved_run(folder: Path, setting: str | None = None) -> tuple[DictConfig, Path]:
    """(the run's resolved config, its adapter file)."""
    config, adapter = run_folder(Path(folder), setting or str(folder))
    return OmegaConf.load(config), adapter


def rebuild(run_cfg: DictConfig, adapter: Path) -> Setup:
    """The trained model: built as the run built it (its tasks tokenised, which needs their data), then its adapter
    and head loaded. Post-training evaluations are not rebuilt (lrbench-mc scores a run's adapter alone)."""
    run_cfg.eval = None
    setup = prepare(run_cfg)
    try:
        load_adapter(setup.model, adapter)
    except RuntimeError as err:  # a tensor of another shape: another model, rank or head
        first = str(err).strip().splitlines()[-1].strip()
        raise LrbenchError(f"adapter {adapter} does not fit the model of {run_cfg.model.name} with "
                           f"method={run_cfg.method.name} and task {run_cfg.task.name}: {first}") from None
    return setup
