"""LoTR (Bershatsky et al.; arXiv 2402.01376): low tensor rank adapters shared across layers.

    Delta W_k = s * L G_k R^T,     L: out x r and R: in x r shared,  G_k: r x r per adapted matrix,  s = alpha / r

Stacking the updates of N matrices gives a Tucker-2 tensor with factors L, R and core [G_1 .. G_N], so the number of
parameters is (out + in) r + N r^2: one shared (L, R) over RoBERTa-base's 24 query/value matrices costs
1536 r + 24 r^2.

`share`: `all_targets` uses one (L, R) for every adapted matrix, as the official code does (query and value of all
layers); `per_matrix_type` uses one pair per target name (one for all `query`, one for all `value`), the reading of
the paper in which each tensor stacks one kind of matrix across layers.

`init`: `normal` (the official default) draws L, R ~ N(0, 1) and sets G = 0, so Delta W = 0 at initialisation.
`svd` takes L and R as the leading r modes of the stacked pretrained weights (Tucker-2 by truncated HOSVD) and
G_k = L^T W_k R; the base weights keep the residual W_k - s L G_k R^T so the function is unchanged (the official
`svd` initialiser does not subtract it). Unlike the official code, LoTR layers merge and unmerge.
"""
from __future__ import annotations

import torch
from torch import nn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import AdaptedLayer, Method, adapted_layers, adapter_dtype, check_rank, out_in

SHARING = ("all_targets", "per_matrix_type")
INITS = ("normal", "svd")


class SharedFactors(nn.Module):
    """The (L, R) pair of one Tucker-2 tensor, registered once and referenced by every layer that shares it."""

    def __init__(self, out_features: int, in_features: int, r: int, dtype, device):
        super().__init__()
        self.L = nn.Parameter(torch.randn(out_features, r, dtype=dtype, device=device))
        self.R = nn.Parameter(torch.randn(in_features, r, dtype=dtype, device=device))


class LoTRLayer(AdaptedLayer):
    roles = {"L": "adapter", "R": "adapter", "G": "adapter"}

    def __init__(self, base: nn.Module, factors: SharedFactors, r: int, alpha: float):
        super().__init__(base)
        self.r, self.scaling = r, alpha / r
        self.factors = [factors]  # a list: not registered as a child module, so L and R are not saved per layer
        self.G = nn.Parameter(torch.zeros(r, r, dtype=self.param_dtype, device=base.weight.device))

    @property
    def L(self) -> nn.Parameter:
        return self.factors[0].L

    @property
    def R(self) -> nn.Parameter:
        return self.factors[0].R

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.R) @ self.G.T @ self.L.T * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.L @ self.G @ self.R.T * self.scaling


class LoTR(Method):
    name = "lotr"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.share not in SHARING:
            raise LrbenchError(f"method.share={cfg.share!r}; valid: {', '.join(SHARING)}")
        if cfg.init not in INITS:
            raise LrbenchError(f"method.init={cfg.init!r}; valid: {', '.join(INITS)}")
        self.shared = nn.ModuleDict()

    def nf4_refusal(self) -> str | None:
        if self.cfg.init == "svd":
            return ("with init=svd rewrites each base weight as its Tucker-2 residual, which 4 bits cannot hold "
                    "exactly; use method.init=normal")
        return None  # init=normal: the update never reads W

    def share_key(self, name: str) -> str:
        return "all" if self.cfg.share == "all_targets" else name.rsplit(".", 1)[-1]

    def make_layer(self, name: str, base: nn.Module) -> LoTRLayer:
        shape, r, key = out_in(base), self.cfg.r, self.share_key(name)
        check_rank(r, name, shape)
        if key not in self.shared:
            self.shared[key] = SharedFactors(*shape, r, adapter_dtype(base), base.weight.device)
        factors = self.shared[key]
        if (factors.L.shape[0], factors.R.shape[0]) != shape:
            raise LrbenchError(f"LoTR shares (L, R) across '{key}' but '{name}' is {shape[0]}x{shape[1]}, not "
                               f"{factors.L.shape[0]}x{factors.R.shape[0]}; use method.share=per_matrix_type "
                               "or other targets")
        return LoTRLayer(base, factors, r, self.cfg.alpha)

    def apply(self, model, heads, target_sets):
        groups = super().apply(model, heads, target_sets)
        model.lotr_factors = self.shared  # registered on the model: L and R are saved once, under lotr_factors.*
        if self.cfg.init == "svd":
            self.tucker2_init(model)
        return groups

    @torch.no_grad()
    def tucker2_init(self, model: nn.Module) -> None:
        by_key: dict[str, list[LoTRLayer]] = {}
        for name, layer in adapted_layers(model).items():
            by_key.setdefault(self.share_key(name), []).append(layer)
        for key, layers in by_key.items():
            weights = torch.stack([layer.dense_weight(torch.float32) for layer in layers])  # N x out x in
            n, out, inp = weights.shape
            r = self.cfg.r
            left = torch.linalg.svd(weights.permute(1, 0, 2).reshape(out, n * inp), full_matrices=False)[0][:, :r]
            right = torch.linalg.svd(weights.permute(2, 0, 1).reshape(inp, n * out), full_matrices=False)[0][:, :r]
            factors = self.shared[key]
            factors.L.copy_(left)
            factors.R.copy_(right)
            for layer, w in zip(layers, weights):
                layer.G.copy_(left.T @ w @ right / layer.scaling)
                layer.weight.sub_(layer.delta_weight().to(layer.weight.dtype))  # keep the residual
