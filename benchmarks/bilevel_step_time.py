"""Wall time per training step of BiDoRA and BiLoRA against DoRA and LoRA, for each hypergradient mode.

A bi-level step is one round: T1 = 1 lower step then T2 = 1 upper step (the upper one with the hypergradient);
a single-level step is one optimiser step. Same model, task, batch size and data for every method.

    python benchmarks/bilevel_step_time.py [--model minilm-l6] [--task glue/mrpc] [--steps 10]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lowrank_bench.stages import stages_for
from lowrank_bench.train import prepare
from lowrank_bench.trainer import Trainer, step_rule

CONF = str(Path(__file__).resolve().parents[1] / "conf")
RUNS = [("lora", None), ("dora", None)] + [(m, h) for m in ("bidora", "bilora") for h in ("first_order", "darts", "exact")]


def step_times(overrides: list[str], steps: int, warmup: int) -> float:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    s = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg.trainer, s.model, s.method, Path(tmp), cfg.seed)
        stage = stages_for(s.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                           cfg.trainer.max_steps, cfg.seed)[0]
        rule = step_rule(trainer, stage)
        s.model.train()
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
    args = parser.parse_args()
    base = [f"model={args.model}", f"task={args.task}", "trainer.progress=false"]
    results = {}
    for method, mode in RUNS:
        overrides = base + [f"method={method}"] + ([f"method.bilevel.hypergradient={mode}"] if mode else [])
        results[(method, mode)] = step_times(overrides, args.steps, args.warmup)
    print(f"{args.model} on {args.task}, batch 32, median of {args.steps} steps, "
          f"{'cuda' if torch.cuda.is_available() else f'cpu x{torch.get_num_threads()} threads'}")
    print(f"{'method':8} {'hypergradient':14} {'ms/step':>9} {'ratio':>22}")
    for (method, mode), ms in results.items():
        ref = {"bidora": "dora", "bilora": "lora"}.get(method)
        ratio = f"{ms / results[(ref, None)]:.2f} x {ref}" if ref else ""
        print(f"{method:8} {mode or '-':14} {ms:9.1f} {ratio:>22}")


if __name__ == "__main__":
    main()
