"""Evaluate what a run saved: `lrbench mode=eval run_dir=<run folder>` (or `adapter=<file>`, whose folder holds the
run's config_resolved.yaml).

The model is rebuilt as the run built it (its resolved config: model, method, task, seed), the saved adapter and
head are loaded, and the task's evaluation splits are scored, or those of another task named on the command line
(`task=...`, whose head must fit the saved one). The device, precision and evaluation batch size are this command's.
A sequence's tasks are each scored with their own head (the curriculum's `score`). The row (results CSV and
summary.json in this command's folder) says `mode=eval`, which adapter and which run it evaluated; the metrics carry
their plain names (`accuracy`, `f1`, `test_f1`, ...), one value each, as the run's `last_*` columns recorded them.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from lowrank_bench import assembly, distributed, models, progress, results, validate
from lowrank_bench.assembly import run_folder
from lowrank_bench.devices import autocast_for, pick_device
from lowrank_bench.errors import LrbenchError
from lowrank_bench.memory import MemoryMonitor

MODES = ("train", "eval")
FROM_THIS_COMMAND = ("device", "precision", "eval_batch_size", "progress")  # trainer settings an evaluation takes


def saved_files(cfg: DictConfig) -> tuple[Path, Path]:
    """(the run's folder, its adapter file) from `run_dir` or `adapter`."""
    if cfg.get("adapter"):
        adapter = Path(str(cfg.adapter)).expanduser()
        if not adapter.is_file():
            raise LrbenchError(f"adapter={cfg.adapter}: " + ("a folder; give the adapter file (a run folder's "
                               "adapter.safetensors), or run_dir=<the folder>" if adapter.is_dir() else
                               "no such file (a run folder's adapter.safetensors)"))
        models.check_safetensors(adapter, f"adapter={cfg.adapter}:")
        if not (adapter.parent / "config_resolved.yaml").is_file():
            raise LrbenchError(f"adapter={cfg.adapter}: no config_resolved.yaml beside it (the adapter of a run "
                               "folder is read with that folder's config)")
        return adapter.parent, adapter
    if cfg.get("run_dir"):
        folder = Path(str(cfg.run_dir)).expanduser()
        if folder.is_dir() and not (folder / "adapter.safetensors").is_file():  # the likelier miss, named first
            raise assembly.missing_adapter(folder, f"run_dir={cfg.run_dir}")
        return folder, run_folder(folder, f"run_dir={cfg.run_dir}")[1]
    raise LrbenchError("mode=eval needs run_dir=<a run's folder> or adapter=<its adapter.safetensors>")


def setting_of(cfg: DictConfig) -> str:
    """The setting that named the run (`run_dir=...` or `adapter=...`), for messages."""
    return f"adapter={cfg.adapter}" if cfg.get("adapter") else f"run_dir={cfg.get('run_dir')}"


def run_config(cfg: DictConfig, folder: Path, overridden: set[str]) -> DictConfig:
    """The run's resolved config, with what this command may change: the task (when given on the command line)
    and the trainer's device, precision and evaluation batch size."""
    run_cfg = assembly.read_run_config(folder / "config_resolved.yaml", setting_of(cfg))
    if "task" in overridden:
        run_cfg.task = cfg.task
    for key in FROM_THIS_COMMAND:
        run_cfg.trainer[key] = cfg.trainer[key]
    return run_cfg


def evaluate_run(cfg: DictConfig, out_dir: Path, overridden: set[str]) -> dict:
    """Score a saved run; write its row and summary.json (this command's folder). Returns the row. Under torchrun
    the ranks share the evaluation batches (distributed.py) and rank 0 alone writes, into its folder."""
    validate.check(cfg)
    started = time.perf_counter()
    dp = distributed.current()
    out_dir = distributed.main_folder(out_dir)
    folder, adapter = saved_files(cfg)
    run_cfg = run_config(cfg, folder, overridden)
    progress.configure(run_cfg.trainer)
    trained = assembly.read_summary(folder, setting_of(cfg))
    if dp.is_main:
        results.preflight(Path(cfg.results_csv), out_dir)  # the row can be written: checked before anything slow
    setup = assembly.rebuild(run_cfg, adapter)
    device = pick_device(run_cfg.trainer.device, dp)
    precision, autocast = autocast_for(device, run_cfg.trainer.precision)
    distributed.take_evaluated()
    with MemoryMonitor(device) as memory:
        model = setup.model.to(device)
        metric, measured = setup.curriculum.score(model, batch_size=run_cfg.trainer.eval_batch_size, device=device,
                                                  autocast=autocast)
    if dp.active:  # how the evaluation was shared out
        measured["eval_examples_by_rank"] = dp.gather(distributed.take_evaluated())
    tables = {k: v for k, v in measured.items() if isinstance(v, (dict, list))}  # summary.json only
    measured = {k: v for k, v in measured.items() if k not in tables}
    row = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": "eval",
           "method": setup.method.name, "model": run_cfg.model.name, "task": setup.curriculum.name,
           "seed": run_cfg.seed,
           "rank": setup.method.rank if setup.method.rank is not None else "", **setup.params,
           "metric": metric, **measured, "evaluated_run": str(folder), "adapter": str(adapter),
           "trained_task": trained.get("task", ""), "trained_commit": trained.get("git_commit", ""),
           "wall_time_s": round(time.perf_counter() - started, 3), "peak_mem_mb": memory.megabytes,
           "peak_mem_kind": memory.kind, "device": results.device_name(device), "precision": precision,
           **results.provenance(), "run_dir": str(out_dir)}
    if dp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        results.write_run_files(run_cfg, out_dir, row, tables)
        results.append_row(Path(cfg.results_csv), row)
    return row
