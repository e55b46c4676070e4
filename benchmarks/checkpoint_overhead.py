"""What does checkpointing cost? MRPC with MiniLM (LoRA by default), checkpointing every `--every` steps.

Two measures:
- in-run: the trainer times every checkpoint it writes (`checkpoint_s` in the result row, excluded from
  `train_time_s` like evaluation); overhead = checkpoint_s / train_time_s of the same run, so a busy machine
  slows both alike;
- A/B (`--ab`): the same run without checkpoints (`trainer.checkpoint_every=null`), alternated with the
  checkpointing one; overhead = ratio of the medians of (train_time_s + checkpoint_s). Noisier on a shared machine.

    python benchmarks/checkpoint_overhead.py [--steps 300] [--every 100] [--method lora] [--ab --repeats 3]

On a slow or busy machine, checkpoint more often than you mean to (`--steps 40 --every 10`): the in-run figure is
then an upper bound, and the line "every 100 steps" scales the measured cost of one checkpoint to that interval.

Needs the shared data (LRBENCH_DATA_DIR) for MRPC. Prints each run's figures and the overhead in percent.
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


def one_run(args, out: Path, every: str) -> dict:
    env = {**os.environ, "LRBENCH_RESULTS_CSV": str(out / "runs.csv"), "LRBENCH_OUTPUT_DIR": str(out)}
    command = [sys.executable, "-m", "lowrank_bench.train", f"method={args.method}", f"model={args.model}",
               f"task={args.task}", f"trainer.max_steps={args.steps}", "trainer.progress=false",
               f"trainer.checkpoint_every={every}", "task.max_eval_samples=64", "save_adapter=false",
               f"hydra.run.dir={out}/run"]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    with open(out / "runs.csv", newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    seconds = float(row["checkpoint_s"] or 0) if "checkpoint_s" in row else 0.0
    return {"train_s": float(row["train_time_s"]), "checkpoint_s": seconds,
            "checkpoints": int(row.get("checkpoints") or 0), "ms_per_step": float(row["time_per_step_ms"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="glue/mrpc")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--ab", action="store_true", help="also time runs without checkpoints, alternated")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"checkpoints": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, every in (("checkpoints", str(args.every)), ("none", "null")):
                if name == "none" and not args.ab:
                    continue
                r = one_run(args, Path(tmp) / f"{name}_{repeat}", every)
                runs[name].append(r)
                print(f"{name:12} run {repeat + 1}: {r['ms_per_step']:9.1f} ms/step, train {r['train_s']:8.1f} s, "
                      f"{r['checkpoints']} checkpoint(s) in {r['checkpoint_s']:.3f} s", flush=True)
    ours = runs["checkpoints"]
    per_checkpoint = sum(r["checkpoint_s"] for r in ours) / max(1, sum(r["checkpoints"] for r in ours))
    in_run = 100 * statistics.median(r["checkpoint_s"] / r["train_s"] for r in ours)
    print(f"\n{args.method} on {args.model} / {args.task}: {args.steps} steps, a checkpoint every {args.every} "
          f"(and at the stage's end)")
    step_ms = statistics.median(r["ms_per_step"] for r in ours)
    print(f"one checkpoint: {1000 * per_checkpoint:.1f} ms; one step: {step_ms:.1f} ms")
    print(f"in-run overhead: {in_run:.3f} % of training time")
    step_s = statistics.median(r["train_s"] for r in ours) / args.steps
    print(f"every 100 steps: {100 * per_checkpoint / (100 * step_s):.3f} % (one checkpoint / 100 steps' time)")
    if args.ab:
        with_ = statistics.median(r["train_s"] + r["checkpoint_s"] for r in ours)
        without = statistics.median(r["train_s"] for r in runs["none"])
        print(f"A/B overhead: {100 * (with_ / without - 1):+.2f} % (medians {with_:.1f} s vs {without:.1f} s)")


if __name__ == "__main__":
    main()
