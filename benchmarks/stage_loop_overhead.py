"""Does the loop over stages cost anything? Time per step of the same run under this tree's trainer and under the
previous single-phase trainer (the commit before the stage loop), measured side by side, alternating A/B runs so
that a busy machine slows both alike.

    python benchmarks/stage_loop_overhead.py [--baseline ce846ae] [--steps 30] [--repeats 3] [--method lora]

Needs the shared data (LRBENCH_DATA_DIR) for MRPC; prints each run's ms/step (from its result row, evaluation
excluded) and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def one_run(code: Path, args, out: Path) -> float:
    env = {**os.environ, "LRBENCH_RESULTS_CSV": str(out / "runs.csv"), "LRBENCH_OUTPUT_DIR": str(out)}
    command = [sys.executable, "-m", "lowrank_bench.train", f"method={args.method}", f"model={args.model}",
               f"task={args.task}", f"trainer.max_steps={args.steps}", "trainer.progress=false",
               "task.max_eval_samples=64", "save_adapter=false", f"hydra.run.dir={out}/run"]
    subprocess.run(command, cwd=code, env=env, check=True, capture_output=True)  # cwd first on sys.path: its code
    with open(out / "runs.csv", newline="") as handle:
        return float(list(csv.DictReader(handle))[-1]["time_per_step_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="ce846ae", help="commit of the previous trainer")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="glue/mrpc")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"previous trainer": worktree(args.baseline, tmp / "baseline"), "stage loop": ROOT}
        times: dict[str, list[float]] = {name: [] for name in trees}
        try:
            for repeat in range(args.repeats):
                for name, code in trees.items():
                    times[name].append(one_run(code, args, tmp / f"{name.replace(' ', '_')}_{repeat}"))
                    print(f"{name:16} run {repeat + 1}: {times[name][-1]:8.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "baseline")], cwd=ROOT,
                           capture_output=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.method} on {args.model} / {args.task}, {args.steps} steps per run, {args.repeats} runs each")
    for name, value in medians.items():
        print(f"{name:16} median {value:8.1f} ms/step")
    print(f"stage loop / previous trainer: {medians['stage loop'] / medians['previous trainer']:.3f}")


if __name__ == "__main__":
    main()
