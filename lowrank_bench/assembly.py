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

from lowrank_bench import curriculum, devices, distributed, evaluations, methods, models, validate
from lowrank_bench.configs import CONF_DIR
from lowrank_bench.curriculum import Curriculum
from lowrank_bench.errors import LrbenchError, input_text
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


def build_model(model_cfg: DictConfig, head: Head, pad_token_id: int | None,
                base: models.BasePrecision = models.FP32, device: str | None = None) -> torch.nn.Module:
    """The model with the task's head, its frozen base stored as `base` says. A decoder classifies from its last
    real token and keeps its LM head."""
    if head.kind == "sequence_classification" and models.is_decoder(model_cfg):
        lm = models.load_model(model_cfg, Head("causal_lm"), pad_token_id, base, device)
        model = DecoderClassifier(lm, decoder_head(lm.config, 1 if head.regression else head.num_labels))
        model.lrbench_load_info = lm.lrbench_load_info
        return model
    return models.load_model(model_cfg, head, pad_token_id, base, device)


def run_device(cfg: DictConfig) -> torch.device:
    return devices.pick_device(cfg.trainer.device, distributed.current())


def base_precision(cfg: DictConfig, method: Method) -> models.BasePrecision:
    """How the run's frozen base is stored (model.dtype, model.quantization, model.attn_implementation) on the
    device the run computes on, refused in one line when the method cannot train on it."""
    base = models.base_precision(cfg.model, run_device(cfg).type, method.half_base_on_auto)
    method.check_base(base)
    return base


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


def declared_head(shape: Curriculum) -> Head | None:
    """The head the run's task needs, where it is known before the data is read (NER's labels come from its data)."""
    try:
        return shape.head
    except RuntimeError:
        return None


def configured_head(cfg: DictConfig) -> Head | None:
    """The head kind a run's task declares, from the config alone (nothing built, no data read): its task class's
    `head` (E2E's and SFT's causal LM, a classifier's default); None where the data decides (NER) and for a sequence
    (classification tasks only: any model kind)."""
    import importlib

    from lowrank_bench import tasks

    family = cfg.task.get("family")
    if family in curriculum.SHAPES or family not in tasks.REGISTRY:
        return None
    module, name = tasks.REGISTRY[family].split(":")
    head = getattr(getattr(importlib.import_module(module), name), "head", None)
    return head if isinstance(head, Head) else None


def check_model_kind(cfg: DictConfig) -> None:
    """An encoder for a task that trains a causal LM (e2e, sft/*) is refused from the config alone, before anything
    is read or built (reproduce plans with this too). NER's head is checked once its data is read (`prepare`)."""
    head = configured_head(cfg)
    if head is not None:
        models.check_fits(cfg.model, head, f"task {cfg.task.get('name')}")


def prepare(cfg: DictConfig) -> Setup:
    """Everything before training: data tokenised, model built with the curriculum's head, method applied."""
    check_model_kind(cfg)  # from the config alone: an encoder for a causal LM's task, before any file is read
    method = methods.build(cfg.method)
    base = base_precision(cfg, method)  # a base the method or the machine cannot have: before anything is read
    tokenizer = models.load_tokenizer(cfg.model)  # first: an unreachable Hub model fails before anything slow
    shape = curriculum.build(cfg)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    for task in shape.tasks:
        task.prepare(tokenizer, task.cfg.get("max_length") or cfg.model.max_length)
    torch.manual_seed(cfg.seed)  # the head's and adapters' initialisation must not depend on the data loading
    models.check_fits(cfg.model, shape.head, f"task {shape.name}")  # (NER knows its head only now)
    model = build_model(cfg.model, shape.head, tokenizer.pad_token_id, base, str(run_device(cfg)))
    load_info = {f"model_{k}": v for k, v in model.lrbench_load_info.items()
                 if k in ("load_from", "load_s", "base_dtype", "attn_implementation")}
    post = evaluations.build(cfg, tokenizer, shape.head)  # reads its items: a bad one fails before anything slow
    before = {k: v for evaluation in post for k, v in evaluation.before(model, cfg.trainer).items()}
    head_names = head_modules(model, shape.head)
    groups = method.apply(model, head_names, models.target_sets(cfg.model))
    groups, heads = shape.attach_heads(model, head_names, groups)
    wrapped = method.wrap(model)
    return Setup(shape, method, wrapped, groups, parameter_counts(model, heads), tokenizer, load_info, post, before)


# -- a saved run -------------------------------------------------------------------------------------------------
RUN_GROUPS = ("model", "method", "task", "trainer", "optimizer")  # what a resolved config holds and rebuild reads
NOT_FINISHED = {  # the `status` of a run folder without an adapter -> why
    "diverged": "the run diverged{where}; a diverged run saves no adapter (its weights are not worth keeping)",
    "running": "the run has not finished (status: running); its adapter is written at the end",
    "interrupted": "the run was interrupted (status: interrupted) before it saved an adapter; continue it with "
                   "trainer.resume=<its folder>",
    "failed": "the run failed (status: failed) before it saved an adapter",
}


def run_status(folder: Path) -> str:
    """The run's status as its folder records it (`status`, else summary.json's), or '' when neither says."""
    try:
        status = (folder / "status").read_text(errors="replace").strip()
    except OSError:
        status = ""
    return status or str(read_summary(folder, str(folder), strict=False).get("status", ""))


def read_summary(folder: Path, setting: str, strict: bool = True) -> dict:
    """summary.json of a run folder ({} when there is none). Damaged (not UTF-8, not JSON, not an object): one line
    naming it, or {} when not `strict`."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return {}
    try:
        value = models.read_json_file(path, f"{setting}: the run's summary")
        if not isinstance(value, dict):
            raise LrbenchError(f"{setting}: the run's summary {path} is a JSON {type(value).__name__}, not an "
                               "object; restore it or delete it")
    except LrbenchError:
        if strict:
            raise
        return {}
    return value


def missing_adapter(folder: Path, setting: str) -> LrbenchError:
    status = run_status(folder)
    if status in NOT_FINISHED:
        summary = read_summary(folder, setting, strict=False)
        stage, step = summary.get("diverged_stage"), summary.get("diverged_at_step")
        where = (f" (stage {stage}, step {step})" if stage else f" (step {step})") if step is not None else ""
        return LrbenchError(f"{setting}: no adapter.safetensors: {NOT_FINISHED[status].format(where=where)}")
    return LrbenchError(f"{setting}: no adapter.safetensors there (a run folder holds config_resolved.yaml and, "
                        f"unless the run had save_adapter=false, adapter.safetensors)")


def run_folder(folder: Path, setting: str) -> tuple[Path, Path]:
    """(config_resolved.yaml, adapter.safetensors) of a run folder, both there and the adapter whole; `setting` says
    where the folder was named. A folder without an adapter says why: diverged, unfinished, save_adapter=false."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LrbenchError(f"{setting}: no such run folder" if not folder.exists()
                           else f"{setting}: {folder} is a file; give a run folder")
    config, adapter = folder / "config_resolved.yaml", folder / "adapter.safetensors"
    if not config.is_file():
        raise LrbenchError(f"{setting}: no config_resolved.yaml there (a run folder holds config_resolved.yaml and, "
                           f"unless the run had save_adapter=false, adapter.safetensors)")
    if not adapter.is_file():
        raise missing_adapter(folder, setting)
    models.check_safetensors(adapter, f"{setting}: the adapter")
    return config, adapter


def read_run_config(path: Path, setting: str) -> DictConfig:
    """A run's config_resolved.yaml: YAML, a mapping, with the groups a rebuild reads; else one line naming it."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    what = f"{setting}: the run's config"
    text = input_text(path, what)
    try:
        cfg = OmegaConf.create(text)
    except (YAMLError, OmegaConfBaseException, ValueError) as err:
        # the line where the broken construct opened (an unclosed bracket), else where the parser stopped
        mark = getattr(err, "context_mark", None) or getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        context, problem = getattr(err, "context", None), getattr(err, "problem", None)
        reason = f"{context}: {problem}" if context and problem else problem or first_line(err)
        raise LrbenchError(f"{what} {where}: not valid YAML ({reason}); restore it from the run, or run again") \
            from None
    if not isinstance(cfg, DictConfig):
        raise LrbenchError(f"{what} {path}: a YAML {type(OmegaConf.to_container(cfg)).__name__}, not the mapping "
                           "lrbench writes (model, method, task, trainer, ...)")
    missing = [key for key in RUN_GROUPS if not isinstance(cfg.get(key), DictConfig)] + \
              [key for key in ("seed",) if key not in cfg]
    if missing:
        raise LrbenchError(f"{what} {path} lacks {', '.join(missing)}: not a resolved run config (a run writes "
                           f"{', '.join(RUN_GROUPS)}, seed, ...)")
    try:
        OmegaConf.to_container(cfg, resolve=True)  # a resolved config has no interpolation left; a hand-edited one may
        validate.check(cfg)
    except OmegaConfBaseException as err:
        raise LrbenchError(f"{what} {path}: {first_line(err)} (a run writes its config resolved; restore it)") \
            from None
    except LrbenchError as err:
        raise LrbenchError(f"{what} {path}: {err}") from None
    return cfg


def saved_run(folder: Path, setting: str | None = None) -> tuple[DictConfig, Path]:
    """(the run's resolved config, its adapter file)."""
    setting = setting or str(folder)
    config, adapter = run_folder(Path(folder), setting)
    return read_run_config(config, setting), adapter


def first_line(err: BaseException) -> str:
    return models.first_line(err)


def rebuild(run_cfg: DictConfig, adapter: Path) -> Setup:
    """The trained model: built as the run built it (its tasks tokenised, which needs their data), then its adapter
    and head loaded. Post-training evaluations are not rebuilt (lrbench-mc scores a run's adapter alone)."""
    from omegaconf.errors import OmegaConfBaseException

    models.check_safetensors(adapter, "adapter")  # before anything slow
    from lowrank_bench.tasks.base import recorded_data_dir

    run_cfg.eval = None
    try:
        with recorded_data_dir(run_cfg.get("data_dir")):  # the data the run read (LRBENCH_DATA_DIR, if set, wins)
            setup = prepare(run_cfg)
    except OmegaConfBaseException as err:  # a key the run's config lacks deeper down (a hand-edited file)
        raise LrbenchError(f"the config of the run of {adapter} is not a whole resolved config: "
                           f"{first_line(err)}") from None
    try:
        load_adapter(setup.model, adapter)
    except RuntimeError as err:  # a tensor of another shape: another model, rank or head
        first = str(err).strip().splitlines()[-1].strip()
        raise LrbenchError(f"adapter {adapter} does not fit the model of {run_cfg.model.name} with "
                           f"method={run_cfg.method.name} and task {run_cfg.task.name}: {first}") from None
    return setup
