"""BiLoRA (Qiang, Zhang, Xie; arXiv 2403.13037): a pseudo-SVD update trained at two levels.

    Delta W = s * P diag(lambda) Q,     P: out x r,  Q: r x in,  lambda = f(theta) in R^r,  s = alpha / r
    lower level (D_lower):  P, Q and the task head, + gamma1 * mean_k (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2)
    upper level (D_upper):  theta (the pseudo singular values), + gamma2 * R2(lambda)

The parameterisation of lambda (`lambda_param`, the paper's Table 5 ablation):
- `softmax` (default): lambda = softmax(theta) over the r values of each matrix, theta = 0 at start (uniform 1/r);
- `real`: lambda = theta, starting at 1;
- `binary`: lambda = sigmoid(theta), starting at 0.5, with R2 = mean lambda (1 - lambda) pushing it to {0, 1}.
AdaLoRA's form without its rank allocator (no pruning). There is no official code; the hypergradient follows
BiDoRA's (Betty `darts`), see hypergradient.py.

The paper does not give the initialisation; `init` chooses it, and Delta W = 0 at initialisation under both:
- `lora` (default): P = 0 and Q Kaiming-uniform, as LoRA's B and A. With P = 0, dL/dlambda_i = s p_i^T G q_i is
  exactly zero, so the first (first-order) hypergradient for lambda vanishes; and softmax's lambda = 1/r makes the
  effective scale of P Q alpha / r^2.
- `adalora`: AdaLoRA's (peft: lambda = 0, P and Q ~ N(0, 0.02^2)), so lambda gets a gradient from the first step.
  Only `real` can start at lambda = 0 (theta = 0); softmax and sigmoid are never 0, so for them theta keeps its
  usual start and the initial update s P0 diag(lambda0) Q0 is kept as a frozen low-rank buffer and subtracted.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import AdaptedLayer, Method

PARAMETERISATIONS = ("softmax", "real", "binary")
INITS = ("lora", "adalora")
ADALORA_STD = 0.02  # peft's AdaLoRA: lora_A, lora_B ~ N(0, 0.02^2), lora_E (lambda) = 0


class BiLoRALayer(AdaptedLayer):
    roles = {"P": "adapter", "Q": "adapter", "theta": "singular_values"}

    def __init__(self, base: nn.Module, r: int, alpha: float, lambda_param: str = "softmax", name: str = "",
                 init: str = "lora"):
        super().__init__(base)
        self.check_rank(r, name)
        self.r, self.scaling, self.lambda_param = r, alpha / r, lambda_param
        dtype, device = self.param_dtype, base.weight.device
        self.P = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.Q = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        start = 1.0 if lambda_param == "real" else 0.0
        if init == "adalora":
            nn.init.normal_(self.P, std=ADALORA_STD)
            nn.init.normal_(self.Q, std=ADALORA_STD)
            start = 0.0  # real: lambda = 0, AdaLoRA's; softmax: uniform 1/r; binary: 0.5
        else:
            nn.init.kaiming_uniform_(self.Q, a=math.sqrt(5))
        self.theta = nn.Parameter(torch.full((r,), start, dtype=dtype, device=device))
        self.has_offset = init == "adalora" and lambda_param != "real"
        if self.has_offset:
            with torch.no_grad():  # -s P0 diag(lambda0) Q0 as two thin factors, so that Delta W = 0 at start
                self.register_buffer("offset_left", -self.P * self.singular_values())
                self.register_buffer("offset_right", self.Q.clone())

    def singular_values(self) -> torch.Tensor:
        if self.lambda_param == "softmax":
            return torch.softmax(self.theta, dim=0)
        if self.lambda_param == "binary":
            return torch.sigmoid(self.theta)
        return self.theta

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = ((x @ self.Q.T) * self.singular_values()) @ self.P.T
        if self.has_offset:
            out = out + (x @ self.offset_right.T) @ self.offset_left.T
        return out * self.scaling

    def delta_weight(self) -> torch.Tensor:
        weight = (self.P * self.singular_values()) @ self.Q
        if self.has_offset:
            weight = weight + self.offset_left @ self.offset_right
        return weight * self.scaling

    def orthogonality_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.r, device=self.P.device, dtype=self.P.dtype)
        return ((self.P.T @ self.P - eye) ** 2).sum() + ((self.Q @ self.Q.T - eye) ** 2).sum()


class BiLoRA(Method):
    name = "bilora"
    levels = {"lower": ("adapter", "head"), "upper": ("singular_values",)}
    not_on_4bit = None  # its update never reads W

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.lambda_param not in PARAMETERISATIONS:
            raise LrbenchError(f"method.lambda_param={cfg.lambda_param!r}; valid: {', '.join(PARAMETERISATIONS)}")
        if cfg.init not in INITS:
            raise LrbenchError(f"method.init={cfg.init!r}; valid: {', '.join(INITS)}")

    def make_layer(self, name: str, base: nn.Module) -> BiLoRALayer:
        return BiLoRALayer(base, self.cfg.r, self.cfg.alpha, self.cfg.lambda_param, name,
                           init=self.cfg.init)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        gamma1 = self.cfg.orth_reg
        if not gamma1:
            return None
        return gamma1 * torch.stack([l.orthogonality_penalty() for l in self.layers.values()]).mean()

    def upper_regularizer(self, model: nn.Module) -> torch.Tensor | None:
        gamma2 = self.cfg.binary_reg
        if self.cfg.lambda_param != "binary" or not gamma2:
            return None
        lam = torch.cat([l.singular_values() for l in self.layers.values()])
        return gamma2 * (lam * (1 - lam)).mean()
