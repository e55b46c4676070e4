"""LoRA (Hu et al., 2021): y = W0 x + (alpha / r) * B A dropout(x).

A (r x in) starts Kaiming-uniform (a = sqrt(5)) and B (out x r) at zero, so the layer equals W0 at initialisation
(as in loralib and PEFT). `rslora: true` scales by alpha / sqrt(r) instead (Kalajdzievski, 2023).

`init_a` chooses the fan that Kaiming-uniform (a = sqrt(5), bound = gain * sqrt(3 / fan) = 1 / sqrt(fan)) divides by:
- `kaiming_fan_in` (default): A is drawn as an (r, in) tensor, fan = in, A ~ U(+-1/sqrt(in)): loralib
  (microsoft/LoRA loralib/layers.py:110, lora_A (r, in), and :124, `kaiming_uniform_(self.lora_A, a=math.sqrt(5))`)
  and PEFT (lora_A = nn.Linear(in, r), weight (r, in)). The LoRA paper (Sec. 4.1) says "random Gaussian" for A;
  every official code draws this uniform.
- `kaiming_fan_rank`: the LoRA baselines that the LoTR and CURLoRA papers compared against. Both store A as
  (in, r) and call `kaiming_uniform_(A, a=sqrt(5))` on that tensor, whose fan_in is its second dimension, r:
  daskol/lotr lotr/lora.py:39 (`Parameter(T.empty((in_features, rank)))`) and :57 (`kaiming_uniform_`);
  MNoorFawi/curlora code/lora.py:10-11 (`torch.empty(in_dim, rank)`, `kaiming_uniform_`). So A ~ U(+-1/sqrt(r)):
  sqrt(in / r) times wider than the default (16x on Mistral-7B at r=16, 12.6x on GPT-2 L's c_attn at r=8,
  4.9x..27.7x on RoBERTa-base at r=32..1). Adam's step on B does not depend on A's scale, so with this A the
  update B A moves that many times faster at the same learning rate: the baseline those papers trained.
  We keep A stored (r, in) but draw exactly what their code draws: an (in, r) tensor, on the CPU generator in the
  default dtype (their A is made by `torch.empty` with no device and moved to the GPU later), then transposed and
  cast to the base weight's device and dtype. With the same torch seed and the same RNG history, A is their A^T.
  (Their histories differ from ours before A: LoTR's LoRALinear first builds and initialises a throwaway
  nn.Linear(in, out), lotr/lora.py:34, and both inject after loading the model, so a whole run does not replay
  their numbers draw for draw; each A is drawn as theirs is.)
The default keeps the exact draws it always had (same tensor shape, device and generator), so default runs do not
change. The scale is untouched by `init_a`: LoTR's lora.py scales by scale / rank (our alpha / r with alpha = 1);
CURLoRA's by alpha with no 1/r (its presets say how they match it).

DoRA and BiDoRA subclass this layer but build it themselves: `init_a` is LoRA's option, and LoRA refuses a
non-default value when a subclass's layer would not read it (BiDoRA has its own `init_a`: kaiming | normal).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import AdaptedLayer, Method

A_INITS = ("kaiming_fan_in", "kaiming_fan_rank")


def check_init_a(init_a: str) -> None:
    if init_a not in A_INITS:
        raise LrbenchError(f"method.init_a={init_a!r} is not a LoRA initialisation of A; valid: {', '.join(A_INITS)} "
                           "(kaiming_fan_in: U(+-1/sqrt(in)), loralib and PEFT; kaiming_fan_rank: U(+-1/sqrt(r)), "
                           "the LoTR and CURLoRA papers' LoRA)")


def init_lora_a(r: int, in_features: int, init_a: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (r, in) as `init_a` says (see the module docstring)."""
    check_init_a(init_a)
    if init_a == "kaiming_fan_in":
        a = torch.empty(r, in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # fan_in = in: U(+-1/sqrt(in))
        return a
    # their tensor: (in, r) on the CPU in the default dtype; its fan_in is r: U(+-1/sqrt(r))
    a = torch.empty(in_features, r, device="cpu")
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a.T.contiguous().to(dtype=dtype, device=device)


class LoRALayer(AdaptedLayer):
    roles = {"lora_A": "adapter", "lora_B": "adapter"}

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, name: str = "",
                 init_a: str = "kaiming_fan_in"):
        super().__init__(base)
        self.check_rank(r, name)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        dtype, device = self.param_dtype, base.weight.device
        self.lora_A = nn.Parameter(init_lora_a(r, self.in_features, init_a, dtype, device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
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
    not_on_4bit = None  # QLoRA: the update never reads W; a merge dequantises, adds and quantises again

    def __init__(self, cfg):
        super().__init__(cfg)
        if type(self).make_layer is LoRA.make_layer:
            check_init_a(cfg.init_a)
        elif cfg.get("init_a") in A_INITS and cfg.get("init_a") != "kaiming_fan_in":
            # a subclass (DoRA, BiDoRA) builds its own layer and would silently ignore LoRA's init_a
            raise LrbenchError(f"method.init_a={cfg.get('init_a')} is LoRA's option; method {cfg.get('name')!r} "
                               "does not read it (use method=lora, or this method's own options)")

    def make_layer(self, name: str, base: nn.Module) -> LoRALayer:
        c = self.cfg
        return LoRALayer(base, c.r, c.alpha, c.dropout, c.rslora, name, init_a=c.init_a)
