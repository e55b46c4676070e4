"""CoLA, Collaborative LoRA (Zhou, Yao, Chen; ACL Findings 2025; arXiv 2505.15471). Not the GLUE task.

#A down-projections A_i (r x in) and #B up-projections B_j (out x r) per matrix (paper default 2 and 3),
combined by one of three strategies, s = alpha / r:
- `full` (fully collaborative; the only one the released code enables):  Delta W = s (sum_j B_j)(sum_i A_i);
- `random` (random collaborative): in training, each A_i is paired with a B_j drawn uniformly at every forward
  pass: Delta W = s sum_i B_{j(i)} A_i. At evaluation (and for merging) we use the expectation over the draw,
  Delta W = s (mean_j B_j)(sum_i A_i): deterministic, and the function the training noise averages to. The paper
  does not say what it does at inference;
- `heuristic` (heuristic collaborative): with k = #B // #A, A_i is paired with B_{ik} .. B_{ik+k-1}, and each
  remaining B_j (j >= #A k) with A_{j - #A k}; for (2, 3): A0-B0, A1-B1, A0-B2. Delta W = s sum_pairs B_j A_i.

Initialisation (always, as in the released code): PiSSA split evenly across the copies. With W = U S V^T,
A_i = diag(sqrt(S_r / s)) V_r^T / #A and B_j = U_r diag(sqrt(S_r / s)) / #B for every i, j, and the base weight
becomes the residual W - U_r S_r V_r^T. Under `full` the adapted layer equals W exactly at step 0. Under `random`
the adapter contributes U_r S_r V_r^T / #B (training and evaluation alike) and under `heuristic`
U_r S_r V_r^T / #A, so those two strategies do not start from the pretrained function (as in the paper's code).
Trainable parameters per matrix: r (#A in + #B out).
"""
from __future__ import annotations

import torch
from torch import nn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import AdaptedLayer, Method

STRATEGIES = ("full", "random", "heuristic")


def heuristic_pairs(num_a: int, num_b: int) -> list[tuple[int, int]]:
    k = num_b // num_a
    pairs = [(i, i * k + t) for i in range(num_a) for t in range(k)]
    pairs += [(j - num_a * k, j) for j in range(num_a * k, num_b)]
    return pairs


class CoLALayer(AdaptedLayer):
    roles = {"lora_A": "adapter", "lora_B": "adapter"}

    def __init__(self, base: nn.Module, r: int, alpha: float, num_a: int, num_b: int, strategy: str, name: str = ""):
        super().__init__(base)
        self.check_rank(r, name)
        self.r, self.scaling, self.strategy = r, alpha / r, strategy
        self.num_a, self.num_b = num_a, num_b
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(num_a, r, self.in_features, dtype=self.param_dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(num_b, self.out_features, r, dtype=self.param_dtype, device=w.device))
        self.pairs = heuristic_pairs(num_a, num_b)
        if not w.is_meta:
            self.pissa_init()

    @torch.no_grad()
    def pissa_init(self) -> None:
        w = self.weight
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scaling)
        a = (root[:, None] * vh[: self.r]) / self.num_a
        b = (u[:, : self.r] * root) / self.num_b
        self.lora_A.copy_(a.expand_as(self.lora_A))
        self.lora_B.copy_(b.expand_as(self.lora_B))
        # the residual stays as the base weight (rounded to a half base's dtype: W' = W then holds to that rounding)
        w.sub_((u[:, : self.r] * s[: self.r]) @ vh[: self.r])

    def pairing(self) -> list[tuple[int, int]] | None:
        """The (A, B) pairs of this forward pass; None means the factorised sum (sum B)(sum A)."""
        if self.strategy == "heuristic":
            return self.pairs
        if self.strategy == "random" and self.training:
            draws = torch.randint(self.num_b, (self.num_a,)).tolist()
            return list(enumerate(draws))
        return None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        pairs = self.pairing()
        if pairs is None:
            b = self.lora_B.sum(0) if self.strategy == "full" else self.lora_B.mean(0)
            return (x @ self.lora_A.sum(0).T) @ b.T * self.scaling
        hidden = torch.einsum("...i,kri->...kr", x, self.lora_A)  # every A_i x once
        return sum(hidden[..., i, :] @ self.lora_B[j].T for i, j in pairs) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        if self.strategy == "heuristic":
            return sum(self.lora_B[j] @ self.lora_A[i] for i, j in self.pairs) * self.scaling
        b = self.lora_B.sum(0) if self.strategy == "full" else self.lora_B.mean(0)
        return b @ self.lora_A.sum(0) * self.scaling


class CoLA(Method):
    name = "cola"
    not_on_4bit = ("starts from PiSSA, which rewrites the base weight as W - U_r S_r V_r^T: quantised again, the "
                   "residual's 4-bit error would break W' = W at step 0")

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.strategy not in STRATEGIES:
            raise LrbenchError(f"method.strategy={cfg.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if cfg.num_a < 1 or cfg.num_b < 1:
            raise LrbenchError(f"method.num_a={cfg.num_a}, method.num_b={cfg.num_b}: both must be >= 1")
        if cfg.strategy == "heuristic" and cfg.num_a > cfg.num_b:
            raise LrbenchError(f"the heuristic strategy needs num_a <= num_b, got {cfg.num_a} > {cfg.num_b}")

    def make_layer(self, name: str, base: nn.Module) -> CoLALayer:
        c = self.cfg
        return CoLALayer(base, c.r, c.alpha, c.num_a, c.num_b, c.strategy, name)
