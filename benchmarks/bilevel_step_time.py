"""Wall time per training step of BiDoRA and BiLoRA against DoRA and LoRA, for each hypergradient mode.

A bi-level step is one round: T1 = 1 lower step then T2 = 1 upper step (the upper one with the hypergradient);
a single-level step is one optimiser step. Same model, task, batch size and data for every method. neumann and cg
run at the method config's K (neumann_iterations, cg_iterations; --implicit-iterations overrides both): each of
their K iterations is one Hessian-vector product.

    python benchmarks/bilevel_step_time.py [--model minilm-l6] [--task glue/mrpc] [--steps 10] [--methods bidora]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lowrank_bench.stages import stages_for
from lowrank_bench.train import prepare
from lowrank_bench.trainer import Trainer

CONF = str(Path(__file__).resolve().parents[1] / "lowrank_bench" / "conf")
MODES = ("first_order", "darts", "one_step_exact", "unrolled", "darts_unrolled", "neumann", "cg")


@contextmanager
def first_stage(overrides: list[str]):
    """(the run's setup, the step rule of its first stage), the model in training mode; also used by
    bidora_scale_check.py."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    s = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg.trainer, s.model, s.method, Path(tmp), cfg.seed)
        stage = stages_for(s.curriculum.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                           cfg.trainer.max_steps, cfg.seed)[0]
        s.model.train()
        yield s, stage.rule(trainer, stage)


def step_times(overrides: list[str], steps: int, warmup: int) -> float:
    with first_stage(overrides) as (s, rule):
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            logs = rule.step()
            float(next(iter(logs.values())))  # wait for the step to finish (a no-op on the CPU)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="glue/mrpc")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="bidora,bilora", help="bi-level methods, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help="hypergradient modes, comma-separated")
    parser.add_argument("--implicit-iterations", type=int, default=None, help="K for neumann and cg")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, for every run")
    args = parser.parse_args()
    base = [f"model={args.model}", f"task={args.task}", "trainer.progress=false", *args.overrides]
    implicit = ([f"method.bilevel.{k}={args.implicit_iterations}" for k in ("neumann_iterations", "cg_iterations")]
                if args.implicit_iterations is not None else [])
    bilevel = args.methods.split(",")
    single = [{"bidora": "dora", "bilora": "lora"}[m] for m in bilevel]
    runs = [(m, None) for m in single] + [(m, h) for m in bilevel for h in args.modes.split(",")]
    results = {}
    for method, mode in runs:
        overrides = base + [f"method={method}"] + ([f"method.bilevel.hypergradient={mode}", *implicit] if mode else [])
        results[(method, mode)] = step_times(overrides, args.steps, args.warmup)
    device = "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    settings = [f"K={args.implicit_iterations}"] * bool(implicit) + args.overrides
    print(f"{args.model} on {args.task}, median of {args.steps} steps after {args.warmup}, {device}",
          *settings, sep=", ")
    print(f"{'method':8} {'hypergradient':15} {'ms/step':>9} {'ratio':>14} {'vs first_order':>15}")
    for (method, mode), ms in results.items():
        ref = {"bidora": "dora", "bilora": "lora"}.get(method)
        ratio = f"{ms / results[(ref, None)]:.2f} x {ref}" if ref else ""
        first = results.get((method, "first_order"))
        extra = f"{ms / first:.2f} x" if mode and first else ""
        print(f"{method:8} {mode or '-':15} {ms:9.1f} {ratio:>14} {extra:>15}")


if __name__ == "__main__":
    main()
