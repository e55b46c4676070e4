"""How close Betty's finite-difference (`darts`) hypergradient is to the exact Hessian-vector product, and how far
both are from the first-order gradient: on a problem with a closed-form answer, and on BiDoRA (tiny RoBERTa, fp64).

    python benchmarks/hypergradient_check.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from lowrank_bench.bilevel import hypergradient, use_eager_attention
from lowrank_bench.train import prepare
from benchmarks.bilevel_step_time import CONF


def flat(ts):
    return torch.cat([t.flatten() for t in ts])


def compare(name, darts, exact, first=None):
    d, e = flat(darts), flat(exact)
    line = (f"{name:36} cos(darts, exact) = {F.cosine_similarity(d, e, 0):.6f}   "
            f"|darts-exact|/|exact| = {((d - e).norm() / e.norm()):.2e}")
    if first is not None:
        f = flat(first)
        line += (f"   cos(first_order, exact) = {F.cosine_similarity(f, e, 0):.4f}   "
                 f"|first-exact|/|exact| = {((f - e).norm() / e.norm()):.3f}")
    print(line)


def quadratic():
    g = torch.Generator().manual_seed(0)
    A, t, c = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (6,), (3,)))
    V = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    m = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    lower = lambda: 0.5 * ((V - A @ m) ** 2).sum() + (V.norm() ** 4) / 40
    upper = lambda: 0.5 * ((V - t) ** 2).sum() + c @ m
    modes = [hypergradient(upper, lower, [m], [V], mode)[0] for mode in ("darts", "exact", "first_order")]
    known = c + A.T @ (V.detach() - t)
    print(f"closed form: exact vs known answer, relative error {((modes[1][0] - known).norm() / known.norm()):.1e}")
    compare("quadratic (closed form)", *modes)


def bidora():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=bidora", "model=tiny-roberta"])
    s = prepare(cfg)
    model = s.model.eval().double()
    use_eager_attention(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in s.groups["adapter"]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    it = iter(s.task.loader("train", 16))
    lower_batch, upper_batch = next(it), next(it)
    upper, lower = s.groups["magnitude"], s.groups["adapter"] + s.groups["head"]
    up = lambda: s.task.loss(model, upper_batch)
    low = lambda: s.task.loss(model, lower_batch) + s.method.regularizer(model)
    grads = {mode: hypergradient(up, low, upper, lower, mode)[0] for mode in ("darts", "exact", "first_order")}
    compare("bidora tiny-roberta: hypergradient", grads["darts"], grads["exact"], grads["first_order"])
    implicit = [[g - f for g, f in zip(grads[m], grads["first_order"])] for m in ("darts", "exact")]
    compare("bidora tiny-roberta: implicit term", *implicit)


if __name__ == "__main__":
    quadratic()
    bidora()
