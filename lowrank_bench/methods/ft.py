"""Full fine-tuning: every backbone parameter trains; nothing is injected.

Precision: the weights that train stay fp32 (AdamW's updates of 1e-5 relative size vanish in bf16's 8-bit
mantissa), so `model.dtype=auto` gives ft an fp32 base on a GPU too (bf16 autocast still applies there), and an
explicit bf16/fp16 base or an nf4 one is refused.
"""
from __future__ import annotations

from torch import nn

from lowrank_bench.methods.base import Method, is_head


class FullFineTuning(Method):
    name = "ft"
    not_on_4bit = "trains every base weight, and 4-bit weights cannot train"
    half_base_on_auto = False

    def half_refusal(self) -> str | None:
        return ("trains every base weight, and those stay fp32 (updates smaller than 2^-8 of a weight vanish in "
                "bf16); bf16 autocast still applies on a GPU")

    def apply(self, model: nn.Module, heads: list[str], target_sets: dict) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for name, param in model.named_parameters():
            param.requires_grad_(True)
            groups["head" if is_head(name, heads) else "backbone"].append(param)
        return groups
