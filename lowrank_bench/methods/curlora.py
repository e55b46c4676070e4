"""CURLoRA (Fawi; arXiv 2408.14572): a CUR decomposition of W with a trainable core, against forgetting.

    y = W x + alpha * C U R x,   C = W[:, cols] (out x r),  R = W[rows, :] (r x in),  U (r x r) = 0 at start

Columns and rows are drawn with *inverted* probabilities, so low-norm ones are favoured:
    p_j = ||W_:,j||^2 / ||W||_F^2,   p~_j = (1 / p_j) / sum_i (1 / p_i)        (paper, `smoothing: 0`)
The official code draws from 1 / (p_j + 0.001) instead (`smoothing: 0.001`: for hidden sizes in the thousands
this is close to uniform) and samples with replacement (`replacement: true`); both are options here. Sampling is
seeded (`seed`, offset by the layer's position), and C, R and the drawn indices are buffers saved with the adapter,
so a saved adapter reloads to the same function (the official code keeps them as plain attributes and never
seeds NumPy). U is the only adapter parameter trained (r^2 per matrix); alpha = 1, no dropout, no 1/r.

We always work on the (out, in) view of the weight, so for GPT-2's fused `Conv1D` (stored in x out) the columns
are input features as for `nn.Linear`; the official code samples the stored matrix as is.
"""
from __future__ import annotations

import torch
from torch import nn

from lowrank_bench.methods.base import AdaptedLayer, Method


def inverted_probabilities(norms_sq: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """p~ proportional to 1 / (p + smoothing), with p the share of the squared Frobenius norm."""
    p = norms_sq.double() / norms_sq.double().sum()
    inverted = 1.0 / (p + smoothing)
    return inverted / inverted.sum()


def sample_indices(probs: torch.Tensor, k: int, replacement: bool, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs.cpu(), k, replacement=replacement, generator=generator)


class CURLoRALayer(AdaptedLayer):
    roles = {"U": "adapter"}

    def __init__(self, base: nn.Module, r: int, alpha: float = 1.0, smoothing: float = 0.0, replacement: bool = False,
                 seed: int = 0, name: str = ""):
        super().__init__(base)
        self.check_rank(r, name)
        self.alpha = alpha
        w = self.dense_weight(self.param_dtype).detach()
        if w.is_meta:  # parameter counting without weights: shapes only
            cols = rows = torch.arange(r)
        else:
            gen = torch.Generator().manual_seed(seed)
            cols = sample_indices(inverted_probabilities((w.float() ** 2).sum(0), smoothing), r, replacement, gen)
            rows = sample_indices(inverted_probabilities((w.float() ** 2).sum(1), smoothing), r, replacement, gen)
        self.register_buffer("cols", cols.to(w.device))
        self.register_buffer("rows", rows.to(w.device))
        self.register_buffer("C", w[:, cols].clone())
        self.register_buffer("R", w[rows, :].clone())
        self.U = nn.Parameter(torch.zeros(r, r, dtype=self.param_dtype, device=w.device))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.R.T) @ self.U.T @ self.C.T * self.alpha  # three thin products; C U R is never formed

    def delta_weight(self) -> torch.Tensor:
        return self.C @ self.U @ self.R * self.alpha


class CURLoRA(Method):
    name = "curlora"
    not_on_4bit = None  # C and R are copied from the dequantised W, in fp32

    def __init__(self, cfg):
        super().__init__(cfg)
        self.count = 0

    def make_layer(self, name: str, base: nn.Module) -> CURLoRALayer:
        c = self.cfg
        self.count += 1
        return CURLoRALayer(base, c.r, c.alpha, c.smoothing, c.replacement, c.seed + self.count, name)
