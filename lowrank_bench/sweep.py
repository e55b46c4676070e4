"""Sweeps finish: in a `-m` sweep a job that fails (bad input for one combination, a crash) is recorded in
`<sweep>/failures.jsonl` and the sweep goes on; at its end `SweepReport` (a Hydra callback, lowrank_bench/conf/config.yaml) lists
the sweep's folder, the results CSV and the command that compares its rows, then the failed jobs and why, and the
command exits 1 if any failed. Each job's folder is named by its number and what it varies (`0_method=lora,seed=0`:
lowrank_bench/conf/config.yaml's hydra.sweep.subdir, configs.job_folder).

What can be told from the command line alone is refused before any job runs (configs.CommandLine, from train.main):
a swept value that names no config (`method=lora,nonexistent,dora`) or a setting no config has, in any job of the
sweep, is one line and exit status 2, with nothing run and no sweep folder. A value that only a job can judge (a
rank too large for the model, a setting out of range: validate.py, at the job's start) is that job's failure."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from lowrank_bench.console import console

FAILURES = "failures.jsonl"


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(error: BaseException) -> None:
    """One line for this job in the sweep's failures file (safe under concurrent jobs)."""
    hc = HydraConfig.get()
    path = Path(hc.sweep.dir) / FAILURES
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"job": hc.job.num, "overrides": list(hc.overrides.task), "error": f"{type(error).__name__}: {error}"}
    with FileLock(str(path) + ".lock", timeout=60):
        with open(path, "a") as handle:
            handle.write(json.dumps(line) + "\n")


class SweepReport(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        """Where the sweep wrote and how to compare its runs; then its failed jobs, if any (exit status 1)."""
        folder = Path(config.hydra.sweep.dir)
        print_where(folder, Path(config.results_csv))
        path = folder / FAILURES
        if not path.is_file():
            return
        failures = [json.loads(line) for line in path.read_text().splitlines() if line]
        console.print(f"[bold red]{len(failures)} job(s) of the sweep failed[/] (details in {path}):")
        for failure in sorted(failures, key=lambda f: f["job"]):
            console.print(f"  #{failure['job']} {' '.join(failure['overrides'])}: {failure['error']}", soft_wrap=True)
        sys.exit(1)


def print_where(folder: Path, csv_path: Path) -> None:
    """The sweep's folder (a job's folder each, named by what it varies), the CSV its rows went to, and the command
    that compares them."""
    console.print(f"sweep folder: {folder}", soft_wrap=True, highlight=False)
    console.print(f"rows appended to: {csv_path}", soft_wrap=True, highlight=False)
    console.print(f"compare them: python -m lowrank_bench.tables {csv_path}", soft_wrap=True, highlight=False)
