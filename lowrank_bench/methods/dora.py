"""DoRA (Liu et al., 2024): W' = m * (W0 + s B A) / ||W0 + s B A||_c, with s = alpha / r.

The magnitude m has one entry per output row of the (out, in) weight and starts at ||W0||_row, so W' = W0 at
initialisation (B = 0). As in the DoRA paper (Sec. 4.3) and PEFT, the norm is treated as a constant in the
backward pass (`detach_norm: true`); `detach_norm: false` back-propagates through it.

The forward never materialises W': with n = ||W0 + s B A||_row and g = m / n,
    y = W0 x + b + (g - 1) * (W0 x) + g * s * B A x,
and W0 x is the base layer's output minus its bias when there is no dropout (or in eval); with dropout it is
recomputed on the dropped-out input, exactly as PEFT does.
"""
from __future__ import annotations

import torch
from torch import nn

from lowrank_bench.methods.lora import LoRA, LoRALayer


class DoRALayer(LoRALayer):
    roles = {"lora_A": "adapter", "lora_B": "adapter", "magnitude": "magnitude"}

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 name: str = "", detach_norm: bool = True):
        super().__init__(base, r, alpha, dropout, rslora, name)
        self.detach_norm = detach_norm
        with torch.no_grad():
            self.magnitude = nn.Parameter(self.weight_norm().clone())
        self._merge_norm = None

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row (W0 in the adapter's dtype, dequantised on a 4-bit base)."""
        return torch.linalg.vector_norm(self.dense_weight() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        norm = self.weight_norm()
        if self.detach_norm:
            norm = norm.detach()
        gain = self.magnitude / norm
        if isinstance(self.dropout, nn.Identity) or not self.training:
            x_in = x
            base_out = out if self.base.bias is None else out - self.base.bias
        else:
            x_in = self.dropout(x)
            base_out = self.base_linear(x_in)
        # (on a half base: the sum in the adapter's dtype, rounded once to the base's)
        return (out + (gain - 1) * base_out + gain * self.lora(x_in.to(self.compute_dtype))).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            # the norm cannot be recomputed from the merged weight, so keep it for unmerge (as PEFT does)
            self._merge_norm = self.weight_norm()
            self.write_weight((self.magnitude / self._merge_norm)[:, None] * (self.dense_weight() + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.write_weight(self.dense_weight() * (self._merge_norm / self.magnitude)[:, None] - self.delta_weight())
            self.merged = False


class DoRA(LoRA):
    name = "dora"

    def make_layer(self, name: str, base: nn.Module) -> DoRALayer:
        c = self.cfg
        return DoRALayer(base, c.r, c.alpha, c.dropout, c.rslora, name, detach_norm=c.detach_norm)
