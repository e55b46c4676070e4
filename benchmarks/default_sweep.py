"""Re-derive every method's default learning rate on the shared data (issues 11 and 16), then measure the defaults.

Two phases, both resumable (a run whose row is already in the phase's CSV is skipped):

  sweep   each method at a few learning rates, seed 0, on the SST-2 subset: results/reference/defaults/sweep.csv
  table   each method at its YAML defaults (no optimizer.lr given), seeds 0-2, on the SST-2 subset and the MRPC
          subset: results/reference/defaults/table.csv (a sweep row at the chosen lr counts as that seed's run)

The default is the grid's best on SST-2 unless that lr fails on the whole MRPC training set, where each candidate
that won SST-2 was also run (seed 0, rows in mrpc_full.csv): LoRA's 5e-3 and BiDoRA's 5e-3 won SST-2 by 1-2 points
but lost MRPC (5e-3 LoRA to the majority class), so both kept 2e-3; BiLoRA's 5e-3 (at alpha 128) won both (see
each method's YAML).

  probe   BiLoRA's gap to LoRA on the whole MRPC, one change to its defaults at a time, and a LoRA control on 80 %
          of the pairs (`PROBES`, seed 0): results/reference/defaults/probes.csv

then `python benchmarks/default_sweep.py render` writes results/reference/defaults/README.md: the sweep's grid and
the table of mean +- std beside the majority class, and LoRA's and BiLoRA's time to a target accuracy.

Protocol (one budget for every method): MiniLM-L6, 3 epochs (the default), batch 32, max length 128,
SST-2 = 2,000 training sentences (a fixed subset) and the full dev set (872); MRPC = 1,000 training pairs (a fixed
subset) and the full dev set (408). Subsets keep the whole sweep within a few CPU hours on 2 cores.

    LRBENCH_DATA_DIR=../shared/data python benchmarks/default_sweep.py sweep [--jobs 2] [--methods lotr,curlora]
    LRBENCH_DATA_DIR=../shared/data python benchmarks/default_sweep.py table [--jobs 2]
    LRBENCH_DATA_DIR=../shared/data python benchmarks/default_sweep.py probe [--jobs 2]
    python benchmarks/default_sweep.py render
(`make sweep-defaults` runs all three.)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "reference" / "defaults"
RUNS = ROOT / "outputs" / "default_sweep"

METHODS = ("ft", "lora", "dora", "cola", "lotr", "curlora", "bilora", "bidora")
GRID = {  # learning rates tried per method (seed 0, SST-2 subset), the likelier ones first
    "ft": (1e-4,),
    "lora": (5e-4, 1e-3, 2e-3, 5e-3),
    "dora": (5e-4, 1e-3, 2e-3, 5e-3),
    "cola": (1e-3,),
    "lotr": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "curlora": (2.5e-4, 2e-3, 1e-2, 3e-2, 1e-1),
    "bilora": (1e-3, 2e-3, 5e-3),  # at alpha 128 (its YAML); alpha 16's 1e-2, 3e-2, 1e-1 are in bilora_alpha16.csv
    "bidora": (1e-3, 2e-3, 5e-3, 1e-2),
}
TASKS = {
    "sst2": ["task=glue/sst2", "task.max_train_samples=2000"],
    "mrpc": ["task=glue/mrpc", "task.max_train_samples=1000"],
}
SEEDS = (0, 1, 2)
BILEVEL = {"bilora", "bidora"}
# also on the whole MRPC training set at the defaults (seed 0), as a user first types it: the 1,000-pair subset's
# 96 steps are too few for most methods to leave the majority class, these 345 (bi-level: 276) are not
FULL_MRPC = ("lotr", "curlora", "lora", "dora", "bilora", "bidora")
# BiLoRA's gap to LoRA on the whole MRPC at alpha 16 (4.2 points at its best lr, 3e-2), probed one change at a time
# (seed 0, rows in probes.csv), with a control: LoRA on as many training pairs as BiLoRA's lower level sees (80 %).
# The overrides pin the old defaults, so that a probe means the same whatever the YAML says now.
OLD_BILORA = ["method.alpha=16", "optimizer.lr=3e-2"]
PROBES = {
    "upper_lr_3e-3": ("bilora", [*OLD_BILORA, "method.bilevel.upper_optimizer.lr=3e-3"],
                      "alpha 16, lr 3e-2, the upper level at 3e-3"),
    "init_adalora": ("bilora", [*OLD_BILORA, "method.init=adalora"],
                     "alpha 16, lr 3e-2, AdaLoRA's init (P, Q ~ N(0, 0.02^2))"),
    "alpha_128": ("bilora", ["method.alpha=128", "optimizer.lr=2e-3"],
                  "alpha 128, lr 2e-3: s/r = 2 = LoRA's alpha/r at the softmax's uniform start (the new default)"),
    "lambda_real": ("bilora", ["method.alpha=16", "method.lambda_param=real", "optimizer.lr=2e-3"],
                    "alpha 16, real lambda starting at 1 (LoRA's scale), lr 2e-3"),
    "lora_80pct": ("lora", ["task.max_train_samples=2934"], "LoRA on 2,934 pairs, the size of BiLoRA's lower set"),
}
CURVES = {"lora", "bilora"}  # evaluated every 30 steps on SST-2: time to a target accuracy
TARGET = 0.80


def whole_mrpc(method: str, *extra: str) -> list[str]:
    """The overrides of a run on the whole MRPC training set, seed 0, as a user first types it."""
    return [f"method={method}", "model=minilm-l6", "task=glue/mrpc", *extra, "trainer.progress=false",
            f"output_dir={RUNS}"]


def overrides(method: str, task: str, seed: int, lr: float | None) -> list[str]:
    args = [f"method={method}", "model=minilm-l6", *TASKS[task], f"seed={seed}", "trainer.progress=false",
            f"output_dir={RUNS}"]
    if lr is not None:
        args.append(f"optimizer.lr={lr}")
    if method in CURVES and task == "sst2":
        args.append("trainer.eval_every=30")
    return args


def rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def done(found: list[dict], method: str, task: str, seed: int, lr: float | None) -> bool:
    return any(r["method"] == method and r["task"] == f"glue/{task}" and int(r["seed"]) == seed
               and (lr is None or float(r["lr"]) == lr) for r in found)


def running() -> set[tuple[str, ...]]:
    """The overrides of lrbench runs in flight (a restarted sweep script must not start them twice)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            parts = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "lowrank_bench.train" in parts:
            found.add(tuple(p for p in parts[parts.index("lowrank_bench.train") + 1:] if p))
    return found


def run(args: list[str], csv_path: Path, probe: str | None = None) -> None:
    """One run on one thread; its output goes to a log file (not a pipe: a run outlives a killed sweep script).
    A probe's row goes to a file of its own first, then into probes.csv with the probe's name."""
    if probe:
        own = RUNS / f"probe_{probe}.csv"
        run(args, own)
        add_probe_rows(own, probe, csv_path)
        return
    env = {**os.environ, "LRBENCH_RESULTS_CSV": str(csv_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    RUNS.mkdir(parents=True, exist_ok=True)
    log = RUNS / f"{'_'.join(a.split('=')[-1].replace('/', '-') for a in args[:4])}_{time.time_ns()}.log"
    started = time.time()
    with open(log, "w") as handle:
        code = subprocess.run([sys.executable, "-m", "lowrank_bench.train", *args], env=env, cwd=ROOT,
                              stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    tail = log.read_text().strip().splitlines()[-1:] if code else []
    print(f"[{time.time() - started:6.0f} s] rc={code} {' '.join(args[:5])} {' '.join(tail)}", flush=True)


def add_probe_rows(own: Path, probe: str, probes_csv: Path) -> None:
    from lowrank_bench.results import append_row

    for row in rows(own):
        append_row(probes_csv, {"probe": probe, **row})
    own.unlink(missing_ok=True)


def default_lr(method: str) -> float:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "lowrank_bench" / "conf"), version_base=None):
        return float(compose("config", [f"method={method}"]).optimizer.lr)


def table_jobs(methods: list[str], found: list[dict], full_csv: Path, table_csv: Path) -> list:
    """The SST-2 table first, longest runs first (the bi-level methods cost about 4x per step), then the full-MRPC
    runs, then MRPC seed by seed. Seed 0 on SST-2 at a learning rate of the grid is the sweep's run."""
    def job(method: str, task: str, seed: int) -> list:
        lr = default_lr(method)
        if done(found, method, task, seed, lr) or (task == "sst2" and seed == 0 and lr in GRID[method]):
            return []
        return [(overrides(method, task, seed, None), table_csv)]

    cheap, bilevel = [m for m in methods if m not in BILEVEL], [m for m in methods if m in BILEVEL]
    jobs = [j for m in bilevel for seed in SEEDS for j in job(m, "sst2", seed)]
    jobs += [j for m in cheap for seed in SEEDS for j in job(m, "sst2", seed)]
    jobs += [(whole_mrpc(m), full_csv) for m in FULL_MRPC
             if m in methods and not done(rows(full_csv), m, "mrpc", 0, default_lr(m))]
    for seed in SEEDS:
        jobs += [j for m in bilevel + cheap for j in job(m, "mrpc", seed)]
    return jobs


def probe_jobs(probes_csv: Path) -> list:
    tried = {r["probe"] for r in rows(probes_csv)}
    return [(whole_mrpc(method, *extra), probes_csv, name)
            for name, (method, extra, _) in PROBES.items() if name not in tried]


def jobs_for(phase: str, methods: list[str]) -> list[tuple]:
    OUT.mkdir(parents=True, exist_ok=True)
    sweep_csv, table_csv, full_csv = OUT / "sweep.csv", OUT / "table.csv", OUT / "mrpc_full.csv"
    found = rows(sweep_csv) + rows(table_csv)
    jobs = []
    if phase == "probe":
        jobs += probe_jobs(OUT / "probes.csv")
    if phase in ("sweep", "all"):  # round robin: every method's first learning rate to do, then every method's second, ...
        todo = {m: [lr for lr in GRID[m] if not done(found, m, "sst2", 0, lr)] for m in methods}
        for index in range(max(map(len, todo.values()))):
            jobs += [(overrides(m, "sst2", 0, lrs[index]), sweep_csv) for m, lrs in todo.items() if index < len(lrs)]
    if phase in ("table", "all"):
        jobs += table_jobs(methods, found, full_csv, table_csv)
    in_flight = running()
    return [job for job in jobs if tuple(job[0]) not in in_flight]


# -- render -----------------------------------------------------------------------------------------------------
def majority(task: str) -> float:
    from omegaconf import OmegaConf

    from lowrank_bench.tasks.glue import GlueTask

    cfg = OmegaConf.create({"family": "glue", "subset": task, "data_dir": None, "max_length": None,
                            "max_train_samples": None, "max_eval_samples": None, "metric": None})
    labels = [e["label"] for e in GlueTask(cfg).raw_split("validation")]
    return max(labels.count(v) for v in set(labels)) / len(labels)


def mean_std(values: list[float]) -> str:
    if not values:
        return "missing"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (n=1)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


def curve(row: dict) -> list[tuple[int, float]]:
    """The run's (step, dev accuracy) evaluations, from its metrics.jsonl."""
    path = Path(row["run_dir"]) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [(r["step"], r["accuracy"]) for r in records if r.get("accuracy") is not None]


def keep_curves(every: list[dict]) -> list[dict]:
    """curves.csv: the dev-accuracy curves of the CURVES runs, kept beside the rows because run folders are not."""
    path = OUT / "curves.csv"
    kept = {(r["run_dir"], int(r["step"])): r for r in rows(path)}
    for r in every:
        if r["method"] in CURVES and r["task"] == "glue/sst2":
            for step, accuracy in curve(r):
                kept[(r["run_dir"], step)] = {"run_dir": r["run_dir"], "step": step, "accuracy": accuracy}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["run_dir", "step", "accuracy"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(kept.values(), key=lambda r: (r["run_dir"], int(r["step"]))))
    return list(kept.values())


def steps_to_target(row: dict, curves: list[dict]) -> int | None:
    """The first evaluation step at which the run's dev accuracy reached TARGET."""
    steps = sorted(int(c["step"]) for c in curves if c["run_dir"] == row["run_dir"] and float(c["accuracy"]) >= TARGET)
    return steps[0] if steps else None


def sweep_lines(sweep: list[dict]) -> list[str]:
    lines = ["## Learning-rate sweep (seed 0, SST-2 subset; the default in bold)", "",
             "| method | lr | dev accuracy | final train loss (bi-level: lower) | degenerate |", "|---|---|---|---|---|"]
    for method in METHODS:
        chosen = default_lr(method)
        for r in sorted((r for r in sweep if r["method"] == method), key=lambda r: float(r["lr"])):
            lr = f"**{float(r['lr']):g}**" if float(r["lr"]) == chosen else f"{float(r['lr']):g}"
            loss = r.get("final_train_loss") or r.get("final_train_lower_loss")  # bi-level: the lower level's
            lines.append(f"| {method} | {lr} | {float(r['last_accuracy']):.4f} | {float(loss):.3f} "
                         f"| {r.get('degenerate', '')} |")
    return lines


def table_lines(every: list[dict]) -> list[str]:
    lines = ["## At the new defaults: mean ± std over seeds 0-2 of the last dev score, in %", "",
             "| method | lr | SST-2 accuracy | MRPC accuracy | MRPC F1 | degenerate runs |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        lr = default_lr(method)
        cells, degenerate = [], 0
        for task, key in (("sst2", "last_accuracy"), ("mrpc", "last_accuracy"), ("mrpc", "last_f1")):
            picked = [r for r in every if r["method"] == method and r["task"] == f"glue/{task}"
                      and float(r["lr"]) == lr and int(r["seed"]) in SEEDS]
            cells.append(mean_std([float(r[key]) for r in picked if r.get(key)]))
            if key == "last_accuracy":
                degenerate += sum(r.get("degenerate") == "True" for r in picked)
        lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {degenerate} |")
    mrpc = majority("mrpc")
    lines.append(f"| majority class | | {100 * majority('sst2'):.2f} | {100 * mrpc:.2f} | "
                 f"{100 * 2 * mrpc / (1 + mrpc):.2f} | |")
    return lines


def full_mrpc_lines(full: list[dict]) -> list[str]:
    lines = ["## The whole MRPC training set at the defaults (`lrbench method=<m> model=minilm-l6 task=glue/mrpc`)", "",
             ("Rows at an lr other than the method's default are the candidates that won SST-2, checked here, and "
              "BiLoRA's 2e-3, the alpha_128 probe below. Runs given `optimizer.lr` on the command line keep the YAML "
              "of their day as `method.lr`, so their config_hash differs from a run at the same YAML default."), "",
             "| method | lr | seed | dev accuracy | dev F1 | degenerate |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {float(r['lr']):g} | {r['seed']} | {float(r['last_accuracy']):.4f} | "
              f"{float(r['last_f1']):.4f} | {r.get('degenerate', '')} |" for r in full]
    if not full:
        return lines + ["| (not run yet) | | | | | |"]
    mrpc = majority("mrpc")
    return lines + [f"| majority class | | | {mrpc:.4f} | {2 * mrpc / (1 + mrpc):.4f} | |"]


def probe_lines(full: list[dict], probes: list[dict], old: list[dict]) -> list[str]:
    lines = ["## BiLoRA's gap to LoRA on the whole MRPC, one change at a time (seed 0)", "",
             ("At alpha 16, BiLoRA's best lr (3e-2) left it 4.2 points below LoRA. Each probe changes those settings "
              "in one way (`PROBES` in default_sweep.py, rows in probes.csv); `lora_80pct` is a control, LoRA on as "
              "many pairs as BiLoRA's lower level trains on."), "",
             "| run | settings | dev accuracy | dev F1 | final train loss (bi-level: lower / upper) |",
             "|---|---|---|---|---|"]
    lora = default_lr("lora")
    named = [("bilora, old default", "alpha 16, lr 3e-2", r) for r in old
             if r["file"] == "mrpc_full.csv" and float(r["lr"]) == 3e-2]
    named += [("lora at its default", f"lr {lora:g}", r) for r in full
              if r["method"] == "lora" and float(r["lr"]) == lora]
    named += [(r["probe"], PROBES[r["probe"]][2] if r["probe"] in PROBES else "", r) for r in probes]
    lines += [f"| {name} | {settings} | {float(r['last_accuracy']):.4f} | {float(r['last_f1']):.4f} | {loss_cell(r)} |"
              for name, settings, r in named]
    return lines if probes else []


def alpha16_lines(old: list[dict]) -> list[str]:
    """BiLoRA's rows at alpha 16, its default before the probes: the lr that scale needed, and what it reached."""
    lines = ["## BiLoRA at alpha 16, its default before the probes (bilora_alpha16.csv)", "",
             "| task | lr | seeds | dev accuracy, % | dev F1, % |", "|---|---|---|---|---|"]
    groups = {}
    for r in old:
        subset = "whole" if r["file"] == "mrpc_full.csv" else "subset"
        groups.setdefault((r["task"], subset, float(r["lr"])), []).append(r)
    for (task, subset, lr), picked in sorted(groups.items()):
        f1 = mean_std([float(r["last_f1"]) for r in picked]) if task == "glue/mrpc" else ""
        lines.append(f"| {task} ({subset}) | {lr:g} | {', '.join(sorted(r['seed'] for r in picked))} | "
                     f"{mean_std([float(r['last_accuracy']) for r in picked])} | {f1} |")
    return lines if old else []


def loss_cell(row: dict) -> str:
    if row.get("final_train_lower_loss"):
        return f"{float(row['final_train_lower_loss']):.3f} / {float(row['final_train_upper_loss']):.3f}"
    return f"{float(row['final_train_loss']):.3f}"


def time_lines(every: list[dict], curves: list[dict]) -> list[str]:
    lines = [f"## Time to {TARGET:.0%} SST-2 dev accuracy (evaluation every 30 steps)", "",
             ("Steps to the first evaluation at or above the target, and that many steps at the run's measured mean "
              "time per step. Runs shared the 2 cores with other jobs, so seconds compare only roughly."), "",
             "| method | lr | seed | steps | seconds | steps in the run |", "|---|---|---|---|---|---|"]
    for method in sorted(CURVES):
        lr = default_lr(method)
        for r in sorted((r for r in every if r["method"] == method and r["task"] == "glue/sst2"
                         and float(r["lr"]) == lr), key=lambda r: int(r["seed"])):
            steps = steps_to_target(r, curves)
            seconds = "never" if steps is None else f"{steps * float(r['time_per_step_ms']) / 1000:.0f}"
            lines.append(f"| {method} | {lr:g} | {r['seed']} | {steps or 'never'} | {seconds} | {r['train_steps']} |")
    return lines


def render() -> str:
    sweep, table, full = rows(OUT / "sweep.csv"), rows(OUT / "table.csv"), rows(OUT / "mrpc_full.csv")
    old = rows(OUT / "bilora_alpha16.csv")
    lines = ["# Every method's defaults, re-derived on the shared data", "",
             ("Produced by `benchmarks/default_sweep.py` (its docstring has the protocol); the rows are in "
              "sweep.csv, table.csv, mrpc_full.csv, probes.csv and bilora_alpha16.csv; the dev curves behind the time "
              "to target in curves.csv."), ""]
    curves = keep_curves(sweep + table)
    for part in (sweep_lines(sweep), table_lines(sweep + table), full_mrpc_lines(full),
                 probe_lines(full, rows(OUT / "probes.csv"), old), alpha16_lines(old),
                 time_lines(sweep + table, curves)):
        lines += [*part, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("sweep", "table", "probe", "all", "render"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    if args.phase == "render":
        (OUT / "README.md").write_text(render())
        print((OUT / "README.md").read_text())
        return
    jobs = jobs_for(args.phase, args.methods.split(","))
    print(f"{len(jobs)} runs to do", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job), jobs))


if __name__ == "__main__":
    main()
