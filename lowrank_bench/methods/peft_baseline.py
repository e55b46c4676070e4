"""Any PEFT tuner as a baseline: `method=peft/<name>` with a YAML whose `config` block becomes the PEFT config.

    # lowrank_bench/conf/method/peft/vera.yaml
    name: peft/vera
    peft_type: VERA
    config: {r: 256, vera_dropout: 0.0}

`target_modules` defaults to the model's target set (`method.targets`, as for our own methods). The task head is
trained and saved by the runner as for every other method (we do not use PEFT's `modules_to_save`), so trainable
parameter counts are comparable across methods. The runner calls the PeftModel, so tuners that add a loss term in
their forward (AdaLoRA's orthogonality regulariser) keep it, and AdaLoRA's rank allocator runs after each
optimiser step, as PEFT's docs prescribe.

On a half-precision base PEFT keeps its adapter weights fp32 (`autocast_adapter_dtype`) and casts inputs itself.
On a 4-bit base only the tuners with a bitsandbytes layer in PEFT run (NF4_TUNERS); the others would read the
packed bytes of `Linear4bit.weight` as if they were W, so they are refused.
"""
from __future__ import annotations

import re

import torch
from omegaconf import OmegaConf
from torch import nn

from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.methods.base import ADAPTABLE, Method, is_head, keep_trainable_fp32

NF4_TUNERS = ("LORA", "ADALORA", "IA3")  # PEFT tuners with a bnb.nn.Linear4bit layer (peft/tuners/<name>/bnb.py)


def peft_config(peft_type: str, options: dict):
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type.upper())
    if config_cls is None:
        raise LrbenchError(f"unknown PEFT type {peft_type!r}; valid: {choices(PEFT_TYPE_TO_CONFIG_MAPPING)}")
    try:
        return config_cls(**options)
    except (TypeError, ValueError) as err:
        raise LrbenchError(f"invalid options for PEFT {peft_type}: {err}") from err


def targeted(config, name: str, module: nn.Module) -> bool:
    """Whether peft would adapt this module under `config`."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        return isinstance(module, ADAPTABLE)
    return bool(check_target_module_exists(config, name))


def excluding_heads(config, model: nn.Module, heads: list[str]):
    """`config` with the head's modules in its `exclude_modules`: the runner trains the head whole, and peft never
    adapts a module it saves whole (`modules_to_save`), so an exported adapter keeps the two apart as well."""
    if not hasattr(config, "exclude_modules"):  # prompt learning: no module is adapted
        return config
    inside = [name for name, module in model.named_modules() if is_head(name, heads) and targeted(config, name, module)]
    if not inside:  # (peft warns about an exclusion that excludes nothing)
        return config
    if isinstance(config.exclude_modules, str):  # peft reads a string as one regex
        config.exclude_modules = "|".join([f"(?:{config.exclude_modules})", *map(re.escape, inside)])
    else:
        config.exclude_modules = sorted(set(config.exclude_modules or ()) | set(inside))
    return config


class PeftBaseline(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.name
        self.peft_type = str(cfg.peft_type).upper()
        self.peft_model = None

    @property
    def rank(self):
        return self.cfg.config.get("r")

    def nf4_refusal(self) -> str | None:
        if self.peft_type in NF4_TUNERS:
            return None
        return (f"(PEFT {self.peft_type}) has no 4-bit layer in PEFT; PEFT tuners that run on a 4-bit base: "
                f"{', '.join(NF4_TUNERS)}")

    def apply(self, model: nn.Module, heads: list[str], target_sets: dict) -> dict[str, list[nn.Parameter]]:
        from peft import get_peft_model

        options = OmegaConf.to_container(self.cfg.config, resolve=True)
        options.setdefault("target_modules", self.resolve_targets(target_sets))
        if self.peft_type == "ADALORA":
            options.setdefault("total_step", 1)  # replaced by the trainer's real step count in on_train_start
        try:
            self.peft_model = get_peft_model(model, excluding_heads(peft_config(self.peft_type, options), model, heads))
        except (TypeError, ValueError) as err:  # e.g. a tuner that cannot adapt GPT-2's Conv1D
            raise LrbenchError(f"PEFT {self.peft_type} cannot adapt {options['target_modules']} of this model: "
                               f"{err}") from err
        groups: dict[str, list[nn.Parameter]] = {"adapter": [], "head": []}
        for name, param in model.named_parameters():
            if is_head(name, heads):
                param.requires_grad_(True)
                groups["head"].append(param)
            elif param.requires_grad:
                groups["adapter"].append(param)
        if not groups["adapter"]:
            raise LrbenchError(f"PEFT {self.peft_type} added no trainable parameters (targets {options['target_modules']})")
        keep_trainable_fp32(model)
        return groups

    def wrap(self, model: nn.Module) -> nn.Module:
        return self.peft_model

    def tuner(self):
        return self.peft_model.base_model

    def on_train_start(self, total_steps: int) -> None:
        if self.peft_type == "ADALORA":
            config = self.peft_model.peft_config["default"]
            config.total_step = total_steps
            if config.tinit + config.tfinal >= total_steps:  # AdaLoRA needs a budget schedule inside the run
                config.tinit, config.tfinal = total_steps // 10, total_steps // 10

    def after_optimizer_step(self, step: int) -> None:
        if self.peft_type == "ADALORA":
            self.tuner().update_and_allocate(step)

    def merge(self, model: nn.Module) -> None:
        self.peft_model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        self.peft_model.unmerge_adapter()

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None
