"""LoRA (Hu et al., 2021): y = W0 x + (alpha / r) * B A dropout(x).

A (r x in) starts Kaiming-uniform (a = sqrt(5)) and B (out x r) at zero, so the layer equals W0 at initialisation
(as in loralib and PEFT). `rslora: true` scales by alpha / sqrt(r) instead (Kalajdzievski, 2023).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_bench.methods.base import AdaptedLayer, Method


class LoRALayer(AdaptedLayer):
    roles = {"lora_A": "adapter", "lora_B": "adapter"}

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, name: str = ""):
        super().__init__(base)
        self.check_rank(r, name)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A x, computed as two thin matmuls."""
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoRA(Method):
    name = "lora"

    def make_layer(self, name: str, base: nn.Module) -> LoRALayer:
        c = self.cfg
        return LoRALayer(base, c.r, c.alpha, c.dropout, c.rslora, name)
