"""Full fine-tuning: every backbone parameter trains; nothing is injected."""
from __future__ import annotations

from torch import nn

from lowrank_bench.methods.base import Method, is_head


class FullFineTuning(Method):
    name = "ft"

    def apply(self, model: nn.Module, heads: list[str], target_sets: dict) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for name, param in model.named_parameters():
            param.requires_grad_(True)
            groups["head" if is_head(name, heads) else "backbone"].append(param)
        return groups
