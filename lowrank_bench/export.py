"""`lrbench-export <run_dir> --format peft|merged --out <folder>`: hand a trained run to the tools people use.

The run is rebuilt from its folder (`load_run`: its config_resolved.yaml, then its adapter.safetensors), then
written in one of two formats, each with a model card (README.md: base model, method, rank, task, the run's
metrics, lrbench version and commit):

- `peft`: `adapter_config.json` + `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, out)`
  loads over the base model with the task's head class (`AutoModelForSequenceClassification`, ...). The trained
  head is in `modules_to_save`. Our lora is peft's LoRA (scaling lora_alpha / r, or / sqrt(r) with `use_rslora`);
  dora, and bidora in its standard orientation (DoRA at inference), are `use_dora=True` with our magnitudes as
  `lora_magnitude_vector`. A `peft/<name>` run keeps its own peft config. Other methods cannot be expressed.
- `merged`: the base model with the update merged into its weights, every adapted layer a plain `nn.Linear` or
  GPT-2 `Conv1D` again: `save_pretrained` (safetensors) plus the tokenizer, loadable by
  `transformers.AutoModelFor...from_pretrained(out)` alone. Every method.

A decoder classifier (heads.py `DecoderClassifier`: a causal LM and a linear `score` on the last real token)
becomes the architecture's `...ForSequenceClassification` (the LM's backbone, our `score`, `pad_token_id` in the
config; module names lose their `lm.` prefix). That class reads the last non-pad token and numbers positions from
the left, which equals our reading for right-padded input, so the exported tokenizer pads on the right and does
not return `token_type_ids` (which GPT-2 would add to its input embeddings; our classifier drops them).

`--dtype` (fp32, bf16, fp16) is the precision of a merged model's weights; an adapter is saved as the run holds it.
The exported model's config names the classes (`id2label`, `label2id`) as the task does (GLUE's, CoNLL's tags).

Nothing is half-written, and nothing that does not load: the export is built in a hidden folder beside `--out`,
loaded back from there as a user would (peft: `PeftModel.from_pretrained` over the run's own base weights, the head
emptied so that it must come from the adapter; merged: `AutoModelFor....from_pretrained` alone), and its logits on
a few of the task's training examples compared with the run's. Only then is it renamed into place; a load that
fails or a difference above `TOLERANCE` is one line and leaves `--out` as it was.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from lowrank_bench import assembly, curriculum
from lowrank_bench.assembly import Setup
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import DTYPES, head_kind

FORMATS = ("peft", "merged")
#: our methods that are peft's LoRA / DoRA at inference
AS_PEFT_LORA = {"lora": False, "dora": True, "bidora": True}  # method -> use_dora
#: peft initialisations that leave a residual in the base weights: the adapter alone does not reproduce the run
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")
PEFT_PREFIX = "base_model.model."  # what peft puts before a module's name in its saved state dicts
#: the largest |exported logits - run's logits| accepted, in units of max(1, max |run's logits|), by the coarser of
#: the export's and the run's precision. fp32: the rounding of a merge. bf16 and fp16: every weight rounded once,
#: then computed in that precision, through every layer. Observed (lrbench-export on the 2-core CPU): fp32 <= 6e-6;
#: bf16 0.021 (MiniLM-L6) and 0.025 (SmolLM2-135M, 30 layers); fp16 0.002 and 0.013. A head or update that did not
#: load moves the logits by their own size.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}
PROBE_EXAMPLES = 4  # the task's training examples an export is checked on


# -- rebuilding a run --------------------------------------------------------------------------------------------
def run_config(run_dir: Path) -> DictConfig:
    """The run's resolved config."""
    return assembly.saved_run(Path(run_dir))[0]


def load_run(run_dir) -> tuple[Setup, DictConfig]:
    """(the assembly.Setup of a finished run, with its adapter and head loaded; its resolved config). The model is
    built as the run built it (task tokenised, which needs its data; model with the task's head; method applied)."""
    run_cfg, adapter = assembly.saved_run(Path(run_dir).expanduser())
    return assembly.rebuild(run_cfg, adapter), run_cfg


# -- what a method can be exported as ----------------------------------------------------------------------------
def is_peft_run(method_cfg) -> bool:
    return str(method_cfg.name).startswith("peft/")


def check_format(run_cfg: DictConfig, fmt: str, dtype: str = "fp32") -> None:
    """Refuse, from the config alone (before anything slow), a format the run's method cannot take."""
    if fmt not in FORMATS:
        raise LrbenchError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise LrbenchError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if fmt == "peft" and dtype != "fp32":
        raise LrbenchError(f"--dtype {dtype} applies to --format merged; an adapter is saved as the run trained it "
                           "(load the base model in the precision you want)")
    method = run_cfg.method
    if not curriculum.has_one_head(run_cfg):
        raise LrbenchError(f"task={run_cfg.task.name} is a continual sequence with one head per task; "
                           "lrbench-export exports single-task runs")
    if fmt == "merged":
        return
    if is_peft_run(method):
        init = str((method.get("config") or {}).get("init_lora_weights", "")).lower()
        if init.startswith(RESIDUAL_INITS):
            raise LrbenchError(f"method={method.name} (init_lora_weights={init}) trains over a residual of the base "
                               "weights, so its adapter does not apply to the original model; use --format merged")
        return
    if method.name not in AS_PEFT_LORA:
        raise LrbenchError(f"method={method.name} cannot be expressed as a peft adapter; use --format merged")
    if method.name == "bidora" and method.get("orientation", "standard") != "standard":
        raise LrbenchError(f"method=bidora with orientation={method.orientation} (column magnitudes, transposed "
                           "weight) cannot be expressed as a peft adapter; use --format merged")


# -- names -------------------------------------------------------------------------------------------------------
def backbone_model(model: nn.Module) -> nn.Module:
    """The model under a PeftModel wrapper (our DecoderClassifier or a transformers model)."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def exported_name(name: str, model: nn.Module) -> str:
    """A module's name in the exported transformers model: a decoder classifier's LM loses its `lm.` prefix."""
    from lowrank_bench.heads import DecoderClassifier

    if not isinstance(model, DecoderClassifier) or name == "score" or name.startswith("score."):
        return name
    if not name.startswith("lm.") or name.startswith("lm.lm_head"):
        raise LrbenchError(f"'{name}' has no counterpart in a ...ForSequenceClassification model (no LM head there)")
    return name.removeprefix("lm.")


def head_module_names(setup) -> list[str]:
    return assembly.head_modules(backbone_model(setup.model), setup.curriculum.head)


def check_head_not_adapted(names, heads: list[str]) -> None:
    """peft saves a `modules_to_save` module whole and cannot load an adapter inside it: refuse the run (one trained
    before adapters were kept out of the head) rather than write an adapter that does not load."""
    from lowrank_bench.methods.base import is_head

    inside = [name for name in names if is_head(name, heads)]
    if inside:
        raise LrbenchError(f"the run adapted '{inside[0]}' inside its task head ({', '.join(heads)}), which also "
                           "trains whole; peft cannot load such an adapter: use --format merged, or train again "
                           "(lrbench no longer adapts the head's layers)")


def head_tensors(model: nn.Module, heads: list[str]) -> dict[str, torch.Tensor]:
    """The head's parameters under peft's `modules_to_save` naming (`base_model.model.classifier.dense.weight`)."""
    from lowrank_bench.methods.base import is_head

    return {PEFT_PREFIX + exported_name(name, model): p for name, p in model.named_parameters() if is_head(name, heads)}


def target_modules(names: list[str], all_names: list[str]) -> list[str]:
    """peft's `target_modules`: the short names (`query`, `value`) when they select exactly the adapted modules
    (peft matches a target against a module name or its '.'-suffix), else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in all_names if n.rsplit(".", 1)[-1] in short}
    return short if selected == set(names) else sorted(names)


def plain_module_names(model: nn.Module) -> list[str]:
    """Module names as the exported model has them (inside an adapted layer: not modules of their own there)."""
    from lowrank_bench.methods.base import adapted_layers

    inner = tuple(f"{name}." for name in adapted_layers(model))
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    return [exported_name(n, model) for n in names if n != "lm" and not n.startswith("lm.lm_head")]


# -- the base model ----------------------------------------------------------------------------------------------
def base_model_reference(model_cfg) -> str | None:
    """Where the base weights come from, as `from_pretrained` takes it; None for a model built from its config."""
    from lowrank_bench import models

    if model_cfg.source == "hub":  # (a model.path is this machine's copy of it: the Hub id is what others can load)
        return str(model_cfg.id)
    if model_cfg.get("path"):
        return str(Path(str(model_cfg.path)).expanduser().resolve())
    if model_cfg.get("gguf_file"):
        return str(models.gguf_cache_folder(model_cfg))
    if model_cfg.source == "package":
        return models.package_folder(str(model_cfg.id))
    return None


def describe_base(model_cfg, seed: int) -> str:
    where = base_model_reference(model_cfg)
    if model_cfg.source == "package":
        return f"{model_cfg.name} (package `{model_cfg.id}`, {where})"
    if model_cfg.source == "hub" and model_cfg.get("path"):
        return f"{model_cfg.name} (Hub `{where}`, read by the run from `{model_cfg.path}`)"
    if where:
        return f"{model_cfg.name} (`{where}`)"
    return f"{model_cfg.name} (built from its config with random weights under seed {seed}: no checkpoint exists)"


# -- peft format -------------------------------------------------------------------------------------------------
def peft_config_of_lora_run(setup, run_cfg: DictConfig, heads: list[str], conv1d: bool):
    from peft import LoraConfig

    from lowrank_bench.methods.base import adapted_layers

    c = run_cfg.method
    names = [exported_name(n, setup.model) for n in adapted_layers(setup.model)]
    unit_scale = c.get("scale") == "one"  # BiDoRA's official scale s = 1: peft's lora_alpha / r with alpha = r
    return LoraConfig(r=c.r, lora_alpha=c.r if unit_scale else c.alpha, lora_dropout=c.get("dropout", 0.0),
                      use_rslora=False if unit_scale else c.get("rslora", False),
                      use_dora=AS_PEFT_LORA[c.name], fan_in_fan_out=conv1d,
                      target_modules=target_modules(names, plain_module_names(setup.model)),
                      modules_to_save=heads or None, task_type=head_kind(setup.curriculum.head).peft_task_type,
                      base_model_name_or_path=base_model_reference(run_cfg.model), inference_mode=True)


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our LoRA/DoRA factors under peft's saved names (the adapter name left out, as peft saves them)."""
    from lowrank_bench.methods.base import adapted_layers

    tensors = {}
    for name, layer in adapted_layers(model).items():
        key = PEFT_PREFIX + exported_name(name, model)
        tensors[f"{key}.lora_A.weight"] = layer.lora_A
        tensors[f"{key}.lora_B.weight"] = layer.lora_B
        if hasattr(layer, "magnitude"):  # DoRA: m per output row, as peft's DoraLinearLayer.weight
            tensors[f"{key}.lora_magnitude_vector"] = layer.magnitude
    return tensors


def peft_adapter_of_lora_run(setup, run_cfg: DictConfig):
    from lowrank_bench.methods.base import adapted_layers

    layers = adapted_layers(setup.model)
    heads = head_module_names(setup)
    check_head_not_adapted(layers, heads)
    config = peft_config_of_lora_run(setup, run_cfg, heads, any(layer.fan_in_fan_out for layer in layers.values()))
    return config, {**lora_tensors(setup.model), **head_tensors(setup.model, heads)}


def peft_adapter_of_peft_run(setup, run_cfg: DictConfig):
    """A peft/<name> run: peft's own state dict and config, renamed for the exported model, the head added."""
    from peft.utils import get_peft_model_state_dict

    peft_model = setup.model
    inner = backbone_model(peft_model)
    heads = head_module_names(setup)
    config = copy.deepcopy(peft_model.peft_config["default"])
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    check_head_not_adapted([k.removeprefix(PEFT_PREFIX) for k in state], heads)
    tensors = {PEFT_PREFIX + exported_name(k.removeprefix(PEFT_PREFIX), inner): v for k, v in state.items()}
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(heads)) or None
    config.task_type = head_kind(setup.curriculum.head).peft_task_type
    config.base_model_name_or_path = base_model_reference(run_cfg.model)
    config.inference_mode = True
    return config, {**tensors, **head_tensors(inner, heads)}


def write_peft(setup, run_cfg: DictConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    build = peft_adapter_of_peft_run if is_peft_run(run_cfg.method) else peft_adapter_of_lora_run
    config, tensors = build(setup, run_cfg)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# -- merged format -----------------------------------------------------------------------------------------------
def replace_adapted_layers(model: nn.Module) -> None:
    """Put each (merged) adapted layer's base module back in its place."""
    from lowrank_bench.methods.base import adapted_layers

    for name, layer in adapted_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.base)


def merged_backbone(setup) -> nn.Module:
    """The trained model with every update merged in and no adapter module left."""
    from peft import PeftModel

    if isinstance(setup.model, PeftModel):
        return setup.model.merge_and_unload()
    setup.method.merge(setup.model)
    replace_adapted_layers(setup.model)
    return setup.model


def skeleton(auto_class_name: str, config):
    """An empty (meta-device) model of a transformers Auto class: its module and parameter names, no memory."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_class_name).from_config(config)


def as_sequence_classifier(decoder, pad_token_id: int, regression: bool):
    """A DecoderClassifier as the architecture's ...ForSequenceClassification: the LM's backbone and our score,
    moved (not copied) into an empty model of that class."""
    score = decoder.score
    if not isinstance(score, nn.Linear) or score.bias is not None:
        raise LrbenchError("this decoder classifier's head has a bias (head_protocol=curlora); transformers' "
                           "...ForSequenceClassification has a bias-free `score`, so it cannot be expressed")
    config = copy.deepcopy(decoder.lm.config)
    config.num_labels = score.out_features
    config.pad_token_id = pad_token_id
    config.problem_type = "regression" if regression else "single_label_classification"
    model = skeleton("AutoModelForSequenceClassification", config)
    prefix = model.base_model_prefix
    if prefix != decoder.lm.base_model_prefix:
        raise LrbenchError(f"{type(model).__name__} keeps its backbone under '{prefix}', {type(decoder.lm).__name__} "
                           f"under '{decoder.lm.base_model_prefix}': one cannot be mapped onto the other")
    setattr(model, prefix, decoder.lm.base_model)
    model.score = score
    left_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_empty:
        raise LrbenchError(f"{type(model).__name__} has modules beyond its backbone and score ({left_empty[0]}); "
                           "this decoder classifier cannot be expressed as one")
    return model


def drop_foreign_modules(model: nn.Module, auto_class_name: str) -> None:
    """Remove what a method registered on the model beside transformers' modules (LoTR's shared factors), then
    check that the model has exactly the parameters of its transformers class."""
    expected = skeleton(auto_class_name, model.config)
    for name in [n for n, _ in model.named_children() if not hasattr(expected, n)]:
        delattr(model, name)
    extra = set(model.state_dict()) - set(expected.state_dict())
    missing = set(expected.state_dict()) - set(model.state_dict())
    if extra or missing:
        raise LrbenchError(f"the merged model is not a plain {type(expected).__name__}: unexpected "
                           f"{sorted(extra)[:3]}, missing {sorted(missing)[:3]}")


def exported_tokenizer(tokenizer, decoder_classifier: bool):
    """The run's tokenizer; for a decoder classifier, padding on the right and without token_type_ids (see the
    module docstring)."""
    if decoder_classifier:
        tokenizer.padding_side = "right"
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
        tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # so that it is saved
    return tokenizer


def write_merged(setup, run_cfg: DictConfig, folder: Path, dtype: str = "fp32") -> None:
    from lowrank_bench.heads import DecoderClassifier

    model = merged_backbone(setup)
    decoder_classifier = isinstance(model, DecoderClassifier)
    if decoder_classifier:
        model = as_sequence_classifier(model, setup.tokenizer.pad_token_id, setup.curriculum.head.regression)
    auto = head_kind(setup.curriculum.head).auto_class
    drop_foreign_modules(model, auto)
    name_labels(model.config, label_names(setup))
    model.to(DTYPES[dtype]).save_pretrained(str(folder))
    exported_tokenizer(setup.tokenizer, decoder_classifier).save_pretrained(str(folder))


# -- labels ------------------------------------------------------------------------------------------------------
def label_names(setup) -> list[str] | None:
    """The task's class names in id order, when it names them and they fit its head (None for a causal LM)."""
    head = setup.curriculum.head
    if not head_kind(head).labelled or head.regression:
        return None
    names = setup.curriculum.task.label_names()
    return names if names and len(names) == head.num_labels else None


def name_labels(config, names: list[str] | None) -> None:
    """id2label / label2id of a transformers config (LABEL_0, ... stay where the task has no names)."""
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


# -- checking the export ----------------------------------------------------------------------------------------
def probe_inputs(setup, decoder: bool) -> dict[str, torch.Tensor]:
    """A few of the task's training examples (what every task collates as model input; E2E's evaluation split holds
    prompts to generate from), as the exported model takes them: a decoder's without token_type_ids, which
    transformers' GPT-2 would add to its embeddings (our decoder classifier drops them)."""
    task = setup.curriculum.task
    batch = task.collate(task.train_examples()[:PROBE_EXAMPLES])
    keys = ("input_ids", "attention_mask") if decoder else ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k] for k in keys if k in batch}


def precision(dtype: str, model: nn.Module) -> torch.dtype:
    """The coarser of the export's precision and the run's (a run trained in bf16 is checked as bf16)."""
    held = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max({DTYPES[dtype], *held}, key=lambda d: torch.finfo(d).eps)


def reloaded_peft(setup, folder: Path) -> nn.Module:
    """The adapter in `folder` loaded by peft over the run's own base weights (its adapters taken out) with the head
    zeroed, so that the head too must come from the adapter."""
    from peft import PeftModel

    from lowrank_bench.heads import DecoderClassifier
    from lowrank_bench.methods.base import is_head

    heads = head_module_names(setup)
    base = setup.model.unload() if isinstance(setup.model, PeftModel) else setup.model
    replace_adapted_layers(base)
    if isinstance(base, DecoderClassifier):
        base = as_sequence_classifier(base, setup.tokenizer.pad_token_id, setup.curriculum.head.regression)
    for name, param in base.named_parameters():
        if is_head(name, heads):
            param.zero_()
    return PeftModel.from_pretrained(base, str(folder)).eval()


def reloaded_merged(setup, folder: Path) -> nn.Module:
    """The merged model in `folder` loaded by transformers alone, as the model card says."""
    import transformers

    auto = getattr(transformers, head_kind(setup.curriculum.head).auto_class)
    return auto.from_pretrained(str(folder)).eval()


def check_reproduces(fmt: str, setup, folder: Path, inputs: dict, ours: torch.Tensor, dtype: torch.dtype) -> float:
    """Load the export back and compare its logits with the run's; returns the largest difference."""
    from lowrank_bench import models

    loader = reloaded_peft if fmt == "peft" else reloaded_merged
    library = "peft" if fmt == "peft" else "transformers"
    try:
        theirs = loader(setup, folder)
    except LrbenchError:
        raise
    except Exception as err:  # noqa: BLE001 (whatever the library raises: the export does not load)
        raise LrbenchError(f"the {fmt} export does not load with {library} ({type(err).__name__}: "
                           f"{models.first_line(err)}); nothing was written") from None
    logits = theirs(**inputs).logits.float()
    if logits.shape != ours.shape:
        raise LrbenchError(f"the {fmt} export, loaded with {library}, gives logits of shape {tuple(logits.shape)}, "
                           f"the run {tuple(ours.shape)}; nothing was written")
    difference = (logits - ours).abs().max().item()
    limit = TOLERANCE[dtype] * max(1.0, ours.abs().max().item())
    if not difference <= limit:  # (NaN included)
        raise LrbenchError(f"the {fmt} export, loaded with {library}, gives logits that differ from the run's by "
                           f"{difference:.2e} (tolerance {limit:.1e} in {str(dtype).removeprefix('torch.')}); "
                           "nothing was written")
    return difference


# -- model card --------------------------------------------------------------------------------------------------
def run_summary(run_dir: Path) -> dict:
    """The run's summary.json ({} without one); a damaged one is one line naming it."""
    return assembly.read_summary(Path(run_dir), str(run_dir))


def metric_lines(summary: dict) -> list[str]:
    """The run's measures: every number recorded for its best and last evaluation (and a continual run's finals)."""
    keys = [k for k, v in summary.items() if k.startswith(("best_", "last_", "final_"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [f"| {k} | {summary[k]:.4f} |" if isinstance(summary[k], float) else f"| {k} | {summary[k]} |"
            for k in keys]


def lrbench_version() -> str:
    from lowrank_bench import __version__

    return __version__


def usage(fmt: str, auto: str, base: str | None, base_kwargs: str) -> str:
    if fmt == "merged":
        return (f"```python\nfrom transformers import {auto}, AutoTokenizer\n"
                f"model = {auto}.from_pretrained(\"<this folder>\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")\n```")
    return (f"```python\nfrom peft import PeftModel\nfrom transformers import {auto}\n"
            f"base = {auto}.from_pretrained(\"{base or '<the base weights>'}\"{base_kwargs})\n"
            f"model = PeftModel.from_pretrained(base, \"<this folder>\")\n```")


def base_kwargs(head, pad_token_id: int | None, decoder: bool, labels: list[str] | None = None) -> str:
    """The keyword arguments that give the base model the trained head's shape and class names (and a decoder its
    pad token)."""
    if head.kind == "causal_lm":
        return ""
    if labels:
        out = f", id2label={dict(enumerate(labels))!r}"
    else:
        out = f", num_labels={1 if head.regression else head.num_labels}"
    return out + (f", pad_token_id={pad_token_id}" if decoder and head.kind == "sequence_classification" else "")


def model_card(run_cfg: DictConfig, summary: dict, fmt: str, head, pad_token_id: int | None,
               labels: list[str] | None = None, dtype: str = "fp32") -> str:
    """README.md of an export: what was trained, how well, with which code, and how to load it."""
    method = run_cfg.method
    rank = summary.get("rank", method.get("r", ""))
    base = base_model_reference(run_cfg.model)
    decoder = str(run_cfg.model.kind) == "decoder"
    lines = [
        "---", f"library_name: {'peft' if fmt == 'peft' else 'transformers'}",
        *([f"base_model: {base}"] if base else []), f"tags: [lrbench, {method.name}]", "---", "",
        f"# {method.name} · {run_cfg.model.name} · {run_cfg.task.name}", "",
        f"Exported by `lrbench-export --format {fmt}` from the run in `{summary.get('run_dir', '?')}`.", "",
        f"- base model: {describe_base(run_cfg.model, run_cfg.seed)}",
        f"- method: {method.name}" + (f", rank {rank}" if rank not in ("", None) else ""),
        f"- task: {run_cfg.task.name} (metric: {summary.get('metric', '?')}), seed {run_cfg.seed}",
        *([f"- labels: {', '.join(labels)}"] if labels else []),
        *([f"- weights in {dtype}"] if fmt == "merged" else []),
        (f"- lrbench version {summary.get('lrbench', lrbench_version())}, "
         f"commit of the run: {summary.get('git_commit', 'unknown')}"),
        *(["- the run's last evaluation predicted a single class (`degenerate` in its summary)"]
          if summary.get("degenerate") else []),
        "", "## Metrics of the run", "", "| measure | value |", "|---|---|", *metric_lines(summary),
        "", "## Loading", "",
        usage(fmt, head_kind(head).auto_class, base, base_kwargs(head, pad_token_id, decoder, labels)), "",
    ]
    if decoder and head.kind == "sequence_classification":
        lines += [("The classifier reads the last non-pad token: pad on the right and pass no token_type_ids "
                   "(the tokenizer of a merged export does both)."), ""]
    return "\n".join(lines)


# -- writing the folder ------------------------------------------------------------------------------------------
def check_destination(out: Path, overwrite: bool) -> None:
    """`--out` can be written: checked by writing beside it (a folder made and removed), before the run is rebuilt."""
    if out.exists() and not out.is_dir():
        raise LrbenchError(f"--out {out}: a file is in the way")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LrbenchError(f"--out {out} exists and is not empty; remove it or pass --overwrite")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing.is_dir():
        raise LrbenchError(f"--out {out}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=existing))
    except OSError as err:
        raise LrbenchError(f"--out {out}: cannot write in {existing} ({err.strerror}); give a writable folder") \
            from None


@contextmanager
def staged_folder(out: Path, overwrite: bool):
    """A hidden folder beside `out` to write into; renamed to `out` when the block succeeds, removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    try:
        yield staging
    except BaseException:  # Ctrl-C included
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = None
    if out.is_dir() and (overwrite or not any(out.iterdir())):
        replaced = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.old")
        os.rename(out, replaced)
    os.rename(staging, out)
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)


def export(run_dir, fmt: str, out, overwrite: bool = False, dtype: str = "fp32") -> Path:
    """Export the run in `run_dir` as `fmt` (merged weights in `dtype`) into the folder `out`, once it loads back and
    reproduces the run's logits (see the module docstring); returns `out`."""
    from lowrank_bench import models

    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    check_destination(out, overwrite)
    run_cfg = run_config(run_dir)
    check_format(run_cfg, fmt, dtype)
    summary = run_summary(run_dir)  # (read before the slow rebuild: a damaged one is refused at once)
    setup, run_cfg = load_run(run_dir)
    with torch.no_grad(), staged_folder(out, overwrite) as folder:
        setup.model.eval()
        inputs = probe_inputs(setup, models.is_decoder(run_cfg.model))
        ours = setup.model(**inputs).logits.float()  # (before the writers merge and move the model's modules)
        checked_in = precision(dtype, setup.model)
        if fmt == "peft":
            write_peft(setup, run_cfg, folder)
        else:
            write_merged(setup, run_cfg, folder, dtype)
        card = model_card(run_cfg, summary, fmt, setup.curriculum.head, setup.tokenizer.pad_token_id,
                          label_names(setup), dtype)
        (folder / "README.md").write_text(card)
        check_reproduces(fmt, setup, folder, inputs, ours, checked_in)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lrbench-export", description="Export a finished run as a peft adapter "
                                     "or as a merged transformers model, with a model card (README.md).")
    parser.add_argument("run_dir", help="a run folder (config_resolved.yaml, adapter.safetensors, summary.json)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="peft: adapter_config.json + adapter_model.safetensors; merged: a full transformers model")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="precision of a merged model's weights (default fp32); checked against the run's logits "
                             "within " + ", ".join(f"{k} {TOLERANCE[v]:g}" for k, v in DTYPES.items())
                             + " (times max(1, max |logit|))")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from lowrank_bench.console import console, print_refusal

    args = parse_args(argv)
    try:
        out = export(args.run_dir, args.fmt, args.out, args.overwrite, args.dtype)
    except LrbenchError as err:
        print_refusal(err)
        sys.exit(2)
    console.print(f"exported {args.run_dir} as {args.fmt} to {out} (reloaded and checked against the run's logits)")


if __name__ == "__main__":
    main()
