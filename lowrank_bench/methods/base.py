"""The adapter interface every method implements, and injection of adapted layers by module name.

A method (`Method`) is built from its config (lowrank_bench/conf/method/<name>.yaml). `apply(model, heads)`
1. freezes the backbone, 2. replaces each targeted `nn.Linear` / GPT-2 `Conv1D` with the method's `AdaptedLayer`,
3. unfreezes the task head, and returns the trainable parameters grouped by *role*
(`adapter`, `magnitude`, `singular_values`, `head`, `backbone`, ...). A bi-level method declares which roles
belong to its `lower` and `upper` level; the trainer reads nothing else.

An `AdaptedLayer` wraps the frozen base layer. Its default forward is `base(x) + delta(x)`, and its merge adds
`delta_weight()` (an (out, in) matrix) into the base weight, so identity at initialisation and merge equality are
the same two checks for every method.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank_bench.errors import LrbenchError

ADAPTABLE = (nn.Linear, Conv1D)


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of an adaptable layer, whatever its storage layout."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


def check_rank(r: int, name: str, shape: tuple[int, int], limit: int | None = None) -> None:
    limit = limit or min(shape)
    if not 1 <= r <= limit:
        raise LrbenchError(f"rank r={r} is impossible for layer '{name}' ({shape[0]}x{shape[1]}): "
                           f"choose 1 <= r <= {limit}")


class AdaptedLayer(nn.Module):
    """A frozen base layer plus a method's trainable update. Subclasses set `roles` and implement `delta`."""

    #: attribute name of each trainable tensor -> its role (what a bi-level trainer splits on)
    roles: dict[str, str] = {}

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)  # GPT-2 stores W as (in, out)
        self.out_features, self.in_features = out_in(base)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view of the real storage (so in-place edits reach it)."""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias."""
        return x @ self.base.weight if self.fan_in_fan_out else nn.functional.linear(x, self.base.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix, such that merged weight = W + delta_weight()."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + self.delta(x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def role_parameters(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        for attr, role in self.roles.items():
            yield attr, role, getattr(self, attr)

    def check_rank(self, r: int, name: str) -> None:
        check_rank(r, name, (self.out_features, self.in_features))


def matches(name: str, targets: list[str]) -> bool:
    """A module name matches a target when it equals it, ends with '.<target>', or full-matches 're:<regex>'."""
    for target in targets:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], name):
                return True
        elif name == target or name.endswith("." + target):
            return True
    return False


def inject(model: nn.Module, targets: list[str], make_layer, heads: list[str] = ()) -> dict[str, AdaptedLayer]:
    """Replace every adaptable module whose name matches `targets` by `make_layer(name, module)`. Modules of the
    task head are left alone: the head trains whole (as peft never adapts a module of its `modules_to_save`)."""
    matched = [(name, module) for name, module in model.named_modules()
               if isinstance(module, ADAPTABLE) and matches(name, targets) and not isinstance(module, AdaptedLayer)]
    chosen = [(name, module) for name, module in matched if not is_head(name, heads)]
    if matched and not chosen:
        raise LrbenchError(f"targets {list(targets)} match only layers of the task head ({matched[0][0]}), which "
                           "trains whole; target layers of the backbone")
    if not chosen:
        candidates = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTABLE)})
        raise LrbenchError(f"no layer matches targets {list(targets)}; adaptable layers are named: {', '.join(candidates)}")
    layers = {}
    for name, module in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = make_layer(name, module)
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def is_head(param_name: str, heads: list[str]) -> bool:
    parts = param_name.split(".")
    return any(h in parts for h in heads)


class Method:
    """Base class of every method. Subclasses override `make_layer` (and `regularizer` when they have one)."""

    name = "base"
    #: roles trained at each level; `None` means single-level
    levels: dict[str, tuple[str, ...]] | None = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.layers: dict[str, AdaptedLayer] = {}  # filled by apply; per-step regularisers read it, not the model

    @property
    def rank(self):
        return self.cfg.get("r")

    def make_layer(self, name: str, base: nn.Module) -> AdaptedLayer:
        raise NotImplementedError

    def resolve_targets(self, target_sets: dict[str, list[str]]) -> list[str]:
        """`method.targets`: null (the model's default set), the name of one of the model's sets (e.g. `qkv`),
        or an explicit list of module names (suffixes, or `re:<regex>`)."""
        targets = self.cfg.targets
        if targets is None:
            return list(target_sets["default"])
        if isinstance(targets, str):
            if targets not in target_sets or target_sets[targets] is None:
                raise LrbenchError(f"method.targets={targets!r}: this model's target sets are "
                                   f"{', '.join(k for k, v in target_sets.items() if v)}; or give a list of names")
            return list(target_sets[targets])
        return list(targets)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the trainer calls (PEFT baselines return their PeftModel); by default the model itself."""
        return model

    def apply(self, model: nn.Module, heads: list[str], target_sets: dict[str, list[str]]) -> dict[str, list[nn.Parameter]]:
        """Freeze, inject, unfreeze the head; return trainable parameters grouped by role."""
        model.requires_grad_(False)
        self.layers = inject(model, self.resolve_targets(target_sets), self.make_layer, heads)
        return self.unfreeze_groups(model, heads)

    def unfreeze_groups(self, model: nn.Module, heads: list[str]) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        seen = set()
        for layer in adapted_layers(model).values():
            for _, role, param in layer.role_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    param.requires_grad_(True)
                    groups.setdefault(role, []).append(param)
        for name, param in model.named_parameters():
            if is_head(name, heads) and id(param) not in seen:
                seen.add(id(param))
                param.requires_grad_(True)
                groups.setdefault("head", []).append(param)
        return groups

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the (lower-level) training loss; None when the method has none."""
        return None

    def on_train_start(self, total_steps: int) -> None:
        """Called once the trainer knows the number of optimiser steps."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimiser step, while the gradients are still there."""

    def upper_regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term of a bi-level method's upper-level loss; None when there is none."""
        return None

    def merge(self, model: nn.Module) -> None:
        for layer in adapted_layers(model).values():
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for layer in adapted_layers(model).values():
            layer.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a method adds: the tensors of its adapted layers (trainable or, like BiDoRA's magnitudes during
    retraining, frozen), any other trainable tensor (the head), and the persistent buffers an adapted layer needs
    to reproduce its function (e.g. CURLoRA's sampled C and R)."""
    layers = adapted_layers(model)
    owned = {id(p) for layer in layers.values() for _, _, p in layer.role_parameters()}
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad or id(p) in owned}
    for layer_name, layer in layers.items():
        for buf_name, buf in layer.named_buffers(recurse=False):
            if buf_name not in layer._non_persistent_buffers_set:
                state[f"{layer_name}.{buf_name}"] = buf
    return state


def save_adapter(model: nn.Module, path) -> None:
    from safetensors.torch import save_file

    if any(layer.merged for layer in adapted_layers(model).values()):
        raise LrbenchError("unmerge the adapter before saving it")
    tmp = Path(f"{path}.tmp")  # written whole, then renamed: a killed run never leaves half a file
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in adapter_state_dict(model).items()}, str(tmp))
    os.replace(tmp, path)


def load_adapter(model: nn.Module, path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(model.state_dict()))
    if missing or unexpected:
        raise LrbenchError(f"adapter file {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(saved, strict=False)
