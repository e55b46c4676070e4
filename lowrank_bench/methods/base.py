"""The adapter interface every method implements, and injection of adapted layers by module name.

A method (`Method`) is built from its config (lowrank_bench/conf/method/<name>.yaml). `apply(model, heads)`
1. freezes the backbone, 2. replaces each targeted `nn.Linear` / GPT-2 `Conv1D` with the method's `AdaptedLayer`,
3. unfreezes the task head, and returns the trainable parameters grouped by *role*
(`adapter`, `magnitude`, `singular_values`, `head`, `backbone`, ...). A bi-level method declares which roles
belong to its `lower` and `upper` level; the trainer reads nothing else.

An `AdaptedLayer` wraps the frozen base layer. Its default forward is `base(x) + delta(x)`, and its merge adds
`delta_weight()` (an (out, in) matrix) into the base weight, so identity at initialisation and merge equality are
the same two checks for every method.

Precision (models.BasePrecision, docs/gpu.md). A method's own tensors are fp32 whatever the base's dtype
(`adapter_dtype`): a bf16/fp16 base, or a 4-bit one (bitsandbytes' `Linear4bit`, whose `weight` is packed bytes),
gets fp32 adapters; an fp32 or fp64 base gets adapters of its own dtype. The adapter's input is cast to the
adapter's dtype and its result back to the base output's, as PEFT does. Where a method needs W itself (DoRA's norm,
CURLoRA's C and R, a merge) it reads `dense_weight()`: W in the adapter's dtype, dequantised from 4 bits. After
`apply`, every trainable tensor left in half precision (a checkpoint's head loaded in bf16) is made fp32 and its
module casts its inputs to fp32 (`keep_trainable_fp32`).
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
from lowrank_bench.models import hold_in_fp32

ADAPTABLE = (nn.Linear, Conv1D)  # (bitsandbytes' Linear4bit is an nn.Linear)
HALF = (torch.float16, torch.bfloat16)


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (its weight is packed bytes with a quantisation state), told without importing
    bitsandbytes."""
    return hasattr(getattr(module, "weight", None), "quant_state")


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of an adaptable layer, whatever its storage layout."""
    if is_4bit(module):
        return module.out_features, module.in_features
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of a method's tensors on `base`: fp32 on a half-precision or 4-bit base, else the base's own."""
    dtype = base.weight.dtype
    return torch.float32 if is_4bit(base) or dtype in HALF else dtype


def dequantised(base: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes 4-bit layer, in the dtype it was quantised from."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)


def requantise(base: nn.Module, weight: torch.Tensor) -> None:
    """Replace a 4-bit layer's weight by `weight` (out, in), quantised again (PEFT's merge on a 4-bit base: lossy,
    by the quantisation error of the new weight)."""
    import bitsandbytes as bnb

    old = base.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs.update(requires_grad=False, bnb_quantized=False)
    data = weight.to("cpu", old.quant_state.dtype).contiguous()
    base.weight = bnb.nn.Params4bit(data, **kwargs).to(old.device)


def keep_trainable_fp32(model: nn.Module) -> None:
    """Every module with a trainable half-precision tensor (a head the loader did not know, e.g. DeBERTa's fresh
    pooler) made fp32 and casting its inputs (see the module docstring)."""
    for module in model.modules():
        if any(p.requires_grad and p.dtype in HALF for p in module.parameters(recurse=False)):
            hold_in_fp32(module)


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
        self.quantised = is_4bit(base)
        self.param_dtype = adapter_dtype(base)  # what the subclass creates its tensors in
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view of the real storage (so in-place edits reach it); packed bytes on a
        4-bit base (read `dense_weight` there)."""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the method's own tensors now (fp64 after `model.double()`)."""
        return getattr(self, next(iter(self.roles))).dtype

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as an (out, in) matrix in `dtype` (default: the adapter's), dequantised on a 4-bit base (a copy then,
        else a view when the dtypes agree)."""
        weight = dequantised(self.base) if self.quantised else self.weight
        return weight.to(dtype or self.compute_dtype)

    @torch.no_grad()
    def write_weight(self, weight: torch.Tensor) -> None:
        """Set W (out, in) to `weight`: rounded to the base's dtype, or quantised again on a 4-bit base."""
        if self.quantised:
            requantise(self.base, weight)
        else:
            self.weight.copy_(weight)

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias."""
        if self.quantised:
            out = self.base(x)
            return out if self.base.bias is None else out - self.base.bias
        return x @ self.base.weight if self.fan_in_fan_out else nn.functional.linear(x, self.base.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix, such that merged weight = W + delta_weight()."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.delta(x.to(self.compute_dtype)).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.add_to_weight(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.add_to_weight(-self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W += delta, summed in the adapter's dtype and rounded once (to a half base's dtype, or to 4 bits)."""
        if self.quantised or self.weight.dtype in HALF:
            self.write_weight(self.dense_weight() + delta)
        else:
            self.weight.add_(delta.to(self.weight.dtype))

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
    #: why the method cannot train on a 4-bit (nf4) base; None: it can (`nf4_refusal` may say more per config)
    not_on_4bit: str | None = "has not been written for a 4-bit base"

    def __init__(self, cfg):
        self.cfg = cfg
        self.layers: dict[str, AdaptedLayer] = {}  # filled by apply; per-step regularisers read it, not the model

    @property
    def rank(self):
        return self.cfg.get("r")

    def make_layer(self, name: str, base: nn.Module) -> AdaptedLayer:
        raise NotImplementedError

    @property
    def half_base_on_auto(self) -> bool:
        """Whether model.dtype=auto gives a bf16 base on a GPU: not for a bi-level method, whose hypergradient passes
        run in fp32 (bilevel.py) and would otherwise see a bf16 network."""
        return self.levels is None

    def nf4_refusal(self) -> str | None:
        """Why this method, as configured, cannot train on a 4-bit base; None: it can."""
        return self.not_on_4bit

    def half_refusal(self) -> str | None:
        """Why this method, as configured, cannot train on a bf16/fp16 base; None: it can."""
        bilevel = self.cfg.get("bilevel")
        if self.levels is not None and bilevel is not None and bilevel.get("perturb") == "whole_model":
            return ("perturbs every base weight by eps v (method.bilevel.perturb=whole_model), which a half-precision "
                    "or 4-bit weight rounds away; use method.bilevel.perturb=trainable")
        return None

    def check_base(self, base) -> None:
        """Refuse, before anything is loaded, a frozen base (models.BasePrecision) this method cannot train on."""
        name = self.cfg.get("name")
        reason = self.half_refusal() if base.half or base.quantised else None
        if reason is None and base.quantised:
            reason = self.nf4_refusal()
        if reason is None:
            return
        setting = "model.quantization=nf4" if base.quantised else f"model.dtype={base.dtype}"
        fix = "model.quantization=none" if base.quantised else "model.dtype=fp32"
        raise LrbenchError(f"{setting}: method={name} {reason}; use {fix} (docs/gpu.md: which methods run on a "
                           f"{'4-bit' if base.quantised else 'half-precision'} base)")

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
        groups = self.unfreeze_groups(model, heads)
        keep_trainable_fp32(model)
        return groups

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
