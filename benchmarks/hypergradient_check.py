"""How close each hypergradient mode is to its closed form on quadratic problems, and how the modes compare on
BiDoRA (tiny RoBERTa, fp64): the finite differences against the exact products they approximate (darts against
one_step_exact, darts_unrolled against unrolled), the implicit-function modes (neumann, cg) at growing K, and every
mode against first_order.

    python benchmarks/hypergradient_check.py [--xi 0.1]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from lowrank_bench.bilevel import use_eager_attention
from lowrank_bench.hypergradient import hypergradient
from lowrank_bench.train import prepare
from benchmarks.bilevel_step_time import CONF


def flat(ts):
    return torch.cat([t.flatten() for t in ts])


def cos(a, b) -> float:
    return F.cosine_similarity(flat(a), flat(b), 0).item()


def rel(a, b) -> float:
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def compare(name, got, reference, ref_name):
    print(f"{name:44} vs {ref_name:16} cos = {cos(got, reference):.6f}   rel. error = {rel(got, reference):.2e}")


def quadratic(xi: float):
    """L_lower = 1/2 ||V - A m||^2 + ||V||^4 / 40, L_upper = 1/2 ||V - t||^2 + c.m (see tests/test_bilevel.py)."""
    g = torch.Generator().manual_seed(0)
    A, t, c = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (6,), (3,)))
    V = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    m = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    lower = lambda: 0.5 * ((V - A @ m) ** 2).sum() + (V.norm() ** 4) / 40
    upper = lambda: 0.5 * ((V - t) ** 2).sum() + c @ m
    w = V.detach()
    w_virtual = w - xi * ((w - A @ m.detach()) + w.norm() ** 2 * w / 10)
    one_step = [c + A.T @ (w - t)]
    unrolled = [c + xi * A.T @ (w_virtual - t)]
    for mode, known in (("one_step_exact", one_step), ("darts", one_step), ("unrolled", unrolled),
                        ("darts_unrolled", unrolled), ("first_order", [c])):
        compare(f"quadratic: {mode}", hypergradient(upper, lower, [m], [V], mode, xi=xi)[0], known, "closed form")


def solved_quadratic():
    """L_lower = 1/2 V^T P V - V^T A m at its optimum V = P^-1 A m: the implicit-function answer in closed form."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    P = torch.eye(6, dtype=torch.float64) + B @ B.T / 6
    A, t, c, m0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (6,), (3,), (3,)))
    m, V = torch.nn.Parameter(m0), torch.nn.Parameter(torch.linalg.solve(P, A @ m0))
    lower = lambda: 0.5 * V @ P @ V - V @ (A @ m)
    upper = lambda: 0.5 * ((V - t) ** 2).sum() + c @ m
    true = [c + A.T @ torch.linalg.solve(P, V.detach() - t)]
    eta = 1.0 / torch.linalg.eigvalsh(P).max().item()
    for K in (3, 30, 300):
        got = hypergradient(upper, lower, [m], [V], "neumann", neumann_iterations=K, neumann_eta=eta)[0]
        compare(f"solved quadratic: neumann K={K} eta=1/lmax", got, true, "IFT closed form")
    for K in (3, 6):
        compare(f"solved quadratic: cg K={K}", hypergradient(upper, lower, [m], [V], "cg", cg_iterations=K)[0], true,
                "IFT closed form")


def bidora(xi: float):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=bidora", "model=tiny-roberta"])
    s = prepare(cfg)
    model = s.model.eval().double()
    use_eager_attention(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in s.groups["adapter"]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    it = iter(s.curriculum.task.loader("train", 16))
    lower_batch, upper_batch = next(it), next(it)
    upper, lower = s.groups["magnitude"], s.groups["adapter"] + s.groups["head"]
    up = lambda: s.curriculum.task.loss(model, upper_batch)
    low = lambda: s.curriculum.task.loss(model, lower_batch) + s.method.regularizer(model)
    run = lambda mode, **kw: hypergradient(up, low, upper, lower, mode, xi=xi, **kw)[0]
    first = run("first_order")
    implicit = lambda g: [a - f for a, f in zip(g, first)]
    grads = {mode: run(mode) for mode in ("darts", "one_step_exact", "unrolled", "darts_unrolled")}
    compare("bidora: darts, implicit term", implicit(grads["darts"]), implicit(grads["one_step_exact"]),
            "one_step_exact")
    compare(f"bidora: darts_unrolled (xi={xi}), implicit term", implicit(grads["darts_unrolled"]),
            implicit(grads["unrolled"]), "unrolled")
    for K in (1, 3, 10):
        grads[f"neumann K={K}"] = run("neumann", neumann_iterations=K, neumann_eta=1.0)
        grads[f"cg K={K}"] = run("cg", cg_iterations=K, cg_damping=0.0)
    compare("bidora: neumann K=10 eta=1", grads["neumann K=10"], grads["cg K=10"], "cg K=10")
    for name, g in grads.items():
        compare(f"bidora: {name}", g, first, "first_order")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xi", type=float, default=0.1, help="the virtual step's learning rate (unrolled modes)")
    args = parser.parse_args()
    quadratic(args.xi)
    solved_quadratic()
    bidora(args.xi)
