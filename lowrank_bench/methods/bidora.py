"""BiDoRA (Qin, Zhang, Xie; arXiv 2410.09758): DoRA's magnitude and direction trained at two levels.

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,         s = alpha / r
    lower level (80% of train):  direction V = (A, B) and the task head, + lambda * mean_k ||D_k D_k^T - I||_F
    upper level (20% of train):  magnitudes m, by the hypergradient of bilevel.py (default `darts`)

D_k is layer k's normalised direction (unit rows, so D D^T is their Gram matrix); the regulariser pushes the
directions of each adapted matrix towards orthogonality (weight 1e-5, Frobenius norm not squared, mean over
layers: the official code's `compute_direction_regularization`). An optional retraining phase re-trains direction
and head on the full training set from their pre-search state with the learned magnitudes frozen. With retraining,
the row's `best_*` is the best of the retraining's evaluations only (the official code keeps the search's and the
retraining's in separate lists, run_glue_bilevel.py:412, 553); the search's best is `search_best_<metric>`.

The hypergradient's finite difference (`bilevel.perturb`, bilevel.py): `trainable` (default, the paper's
V = {Delta V}) perturbs the lower level's trainable parameters (A, B, head); `whole_model` perturbs every parameter
of the model but the magnitudes, the frozen backbone included, as Betty does with the official code's unfrozen
RoBERTa (digest B2, §0.3). The official code's behaviour, as options: `orientation: official` +
`bilevel.perturb: whole_model` (+ `detach_norm: false`, the default, and the presets' optimiser and budget). On
MNLI the paper scores matched + mismatched concatenated (`task.metric=matched_mismatched_accuracy`, tasks/glue.py).

`orientation: standard` (default) is DoRA's: one magnitude per output row, W' = W0 at initialisation.
`orientation: official` reproduces the official code (t2ance/BiDoRA, digest B1): magnitudes per *column*
(||W0 + BA||_dim0), no alpha/r scaling, A ~ N(0, 1), and the layer computes x @ W' (that is, with W'^T in place of
W'). At initialisation it therefore computes x W0 rather than W0 x, so the adapted network does not reproduce the
pre-trained one; it only runs for square weights (RoBERTa's query/value). Use it to compare with published
numbers, not as the method. The official code also back-propagates through the norm: `detach_norm: false`.

Initialisation and scale, independent of the orientation (they act on `orientation: standard`; the official layer
always uses the official ones):
- `init_a: kaiming` (default, LoRA's Kaiming-uniform, a = sqrt(5)) | `normal` (the official code's N(0, 1));
- `scale: alpha_over_r` (default, s = alpha / r, or alpha / sqrt(r) with `rslora`) | `one` (s = 1, the official
  code, which computes alpha / r but never applies it; `one` ignores alpha and rslora).
The official learning rates (1e-5 .. 5e-5) are tuned to A ~ N(0, 1) and s = 1. Kaiming-uniform A has std
1 / sqrt(3 in), so with s = alpha / r = 2 the direction B A moves about sqrt(3 in) / 2 times (20x at in = 768) more
slowly at the same learning rate. B = 0 in every case, so W' = W0 at initialisation whatever the choice.
"""
from __future__ import annotations

import torch
from torch import nn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import AdaptedLayer
from lowrank_bench.methods.dora import DoRA, DoRALayer

ORIENTATIONS = ("standard", "official")
A_INITS = ("kaiming", "normal")
SCALES = ("alpha_over_r", "one")


class BiDoRALayer(DoRALayer):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 name: str = "", detach_norm: bool = True, init_a: str = "kaiming", scale: str = "alpha_over_r"):
        super().__init__(base, r, alpha, dropout, rslora, name, detach_norm)
        if init_a == "normal":
            with torch.no_grad():
                nn.init.normal_(self.lora_A)  # std 1, as the official code; B = 0 keeps the magnitude ||W0||_row
        if scale == "one":
            self.scaling = 1.0

    def direction(self) -> torch.Tensor:
        """D = (W0 + s B A) / ||.||_row: unit rows."""
        v = self.dense_weight() + self.delta_weight()
        return v / torch.linalg.vector_norm(v, dim=1, keepdim=True)

    def orthogonality_penalty(self) -> torch.Tensor:
        d = self.direction()
        eye = torch.eye(d.shape[0], device=d.device, dtype=d.dtype)
        return torch.linalg.matrix_norm(d @ d.T - eye)


class OfficialBiDoRALayer(AdaptedLayer):
    """The official code's layer (see the module docstring): y = x @ W'(m) + b with column-normalised W'."""

    roles = {"lora_A": "adapter", "lora_B": "adapter", "magnitude": "magnitude"}

    def __init__(self, base: nn.Module, r: int, name: str = "", detach_norm: bool = False):
        super().__init__(base)
        self.check_rank(r, name)
        if self.in_features != self.out_features:
            raise LrbenchError(f"method.orientation=official needs square weights; '{name}' is "
                               f"{self.out_features}x{self.in_features} (use orientation=standard)")
        w = self.weight.detach().to(self.param_dtype)
        self.detach_norm = detach_norm
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(w, dim=0).clone())
        self._original = None

    def direction(self) -> torch.Tensor:
        v = self.dense_weight() + self.lora_B @ self.lora_A  # no alpha/r: the official code computes but never uses it
        norm = torch.linalg.vector_norm(v, dim=0, keepdim=True)
        return v / (norm.detach() if self.detach_norm else norm)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) matrix the official layer applies: (m * D)^T."""
        return (self.direction() * self.magnitude).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        dtype = self.compute_dtype
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), self.effective_weight(), bias).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.effective_weight() - self.dense_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._original = self.weight.clone()
            self.weight.copy_(self.effective_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self._original)
            self.merged = False

    def orthogonality_penalty(self) -> torch.Tensor:
        d = self.direction()
        eye = torch.eye(d.shape[1], device=d.device, dtype=d.dtype)
        return torch.linalg.matrix_norm(d.T @ d - eye)


class BiDoRA(DoRA):
    name = "bidora"
    levels = {"lower": ("adapter", "head"), "upper": ("magnitude",)}

    def nf4_refusal(self) -> str | None:
        if self.cfg.orientation == "official":
            return "with orientation=official rebuilds the whole weight x @ W' in every forward; use orientation=standard"
        return super().nf4_refusal()

    def __init__(self, cfg):
        super().__init__(cfg)
        for key, valid in (("orientation", ORIENTATIONS), ("init_a", A_INITS), ("scale", SCALES)):
            if cfg[key] not in valid:
                raise LrbenchError(f"method.{key}={cfg[key]!r}; valid: {', '.join(valid)}")

    def make_layer(self, name: str, base: nn.Module) -> AdaptedLayer:
        c = self.cfg
        if c.orientation == "official":
            return OfficialBiDoRALayer(base, c.r, name, detach_norm=c.detach_norm)
        return BiDoRALayer(base, c.r, c.alpha, c.dropout, c.rslora, name, detach_norm=c.detach_norm,
                           init_a=c.init_a, scale=c.scale)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        weight = self.cfg.direction_reg
        if not weight:
            return None
        penalties = [layer.orthogonality_penalty() for layer in self.layers.values()]
        return weight * torch.stack(penalties).mean()
