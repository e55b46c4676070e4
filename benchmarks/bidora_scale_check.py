"""How far BiDoRA's direction update s B A moves in N bi-level steps at the official learning rate (issue 11, point 1).

Three runs from the same seed, through the real bi-level loop (lower step + upper step with the configured
hypergradient), no gradient clipping as in the official runs:
- official:  orientation=official (the released code's layer: A ~ N(0, 1), no alpha/r);
- matched:   orientation=standard, init_a=normal, scale=one (what the experiment presets now use);
- default:   orientation=standard, init_a=kaiming, scale=alpha_over_r (the method YAML's defaults).
It prints ||s B A||_F over all adapted layers (root of the sum of squares) after each run; `matched` should be within
a small factor of `official`, and `default` about sqrt(3 in) / 2 times smaller.

    python benchmarks/bidora_scale_check.py [--model minilm-l6] [--task toy/sentiment] [--steps 50] [--lr 2e-5]
"""
from __future__ import annotations

import argparse

import torch
from bilevel_step_time import first_stage  # the sibling script (benchmarks/ is this script's import path)

from lowrank_bench.methods.base import adapted_layers
RUNS = {
    "official": ["method.orientation=official"],
    "matched": ["method.init_a=normal", "method.scale=one"],
    "default": [],
}


def direction_update_norm(model: torch.nn.Module) -> float:
    with torch.no_grad():
        norms = [(layer.lora_B @ layer.lora_A * getattr(layer, "scaling", 1.0)).norm()
                 for layer in adapted_layers(model).values()]
    return torch.stack(norms).norm().item()


def norm_after_training(overrides: list[str], steps: int) -> float:
    with first_stage(overrides) as (s, rule):
        for _ in range(steps):
            rule.step()
    return direction_update_norm(s.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="toy/sentiment")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-5, help="lower and upper lr (official RoBERTa-base MRPC: 2e-5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, for every run")
    args = parser.parse_args()
    base = [f"model={args.model}", f"task={args.task}", "method=bidora", "trainer.progress=false",
            "trainer.max_grad_norm=null", "optimizer.warmup_ratio=0", f"optimizer.lr={args.lr}",
            f"method.bilevel.upper_optimizer.lr={args.lr}", f"trainer.max_steps={args.steps}",
            f"trainer.batch_size={args.batch_size}", *args.overrides]
    norms = {name: norm_after_training(base + extra, args.steps) for name, extra in RUNS.items()}
    print(f"BiDoRA ||s B A||_F after {args.steps} steps, {args.model} on {args.task}, lr {args.lr}, "
          f"batch {args.batch_size}", *args.overrides, sep=", ")
    for name, value in norms.items():
        print(f"{name:9} {' '.join(RUNS[name]) or '(method defaults)':45} {value:.4e}  "
              f"{value / norms['official']:.3f} x official")


if __name__ == "__main__":
    main()
