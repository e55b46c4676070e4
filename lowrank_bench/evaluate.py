"""Evaluate what a run saved: `lrbench mode=eval run_dir=<run folder>` (or `adapter=<file>`, whose folder holds the
run's config_resolved.yaml).

The model is rebuilt as the run built it (its resolved config: model, method, task, seed), the saved adapter and
head are loaded, and the task's evaluation splits are scored, or those of another task named on the command line
(`task=...`, whose head must fit the saved one). The device, precision and evaluation batch size are this command's.
A continual run's tasks are each scored with their own head. The row (results CSV and summary.json in this
command's folder) says `mode=eval`, which adapter and which run it evaluated; the metrics carry their plain names
(`accuracy`, `f1`, `test_f1`, ...), one value each, as the run's `last_*` columns recorded them.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lowrank_bench import results
from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import load_adapter
from lowrank_bench.tasks.continual import ContinualTask

MODES = ("train", "eval")
FROM_THIS_COMMAND = ("device", "precision", "eval_batch_size", "progress")  # trainer settings an evaluation takes


def run_folder(folder: Path, setting: str) -> tuple[Path, Path]:
    """(config_resolved.yaml, adapter.safetensors) of a run folder; `setting` says where the folder was named."""
    if not folder.is_dir():
        raise LrbenchError(f"{setting}: no such run folder")
    config, adapter = folder / "config_resolved.yaml", folder / "adapter.safetensors"
    for path in (config, adapter):
        if not path.is_file():
            raise LrbenchError(f"{setting}: no {path.name} there (a run folder holds config_resolved.yaml and, "
                               f"unless the run had save_adapter=false, adapter.safetensors)")
    return config, adapter


def saved_files(cfg: DictConfig) -> tuple[Path, Path]:
    """(the run's folder, its adapter file) from `run_dir` or `adapter`."""
    if cfg.get("adapter"):
        adapter = Path(str(cfg.adapter)).expanduser()
        if not adapter.is_file():
            raise LrbenchError(f"adapter={cfg.adapter}: no such file (a run folder's adapter.safetensors)")
        run_folder(adapter.parent, f"adapter={cfg.adapter}")
        return adapter.parent, adapter
    if cfg.get("run_dir"):
        folder = Path(str(cfg.run_dir)).expanduser()
        if folder.is_dir() and not (folder / "adapter.safetensors").is_file():  # the likelier miss, named first
            raise LrbenchError(f"run_dir={cfg.run_dir}: no adapter.safetensors there (runs save it unless "
                               f"save_adapter=false)")
        return folder, run_folder(folder, f"run_dir={cfg.run_dir}")[1]
    raise LrbenchError("mode=eval needs run_dir=<a run's folder> or adapter=<its adapter.safetensors>")


def run_config(cfg: DictConfig, folder: Path, overridden: set[str]) -> DictConfig:
    """The run's resolved config, with what this command may change: the task (when given on the command line)
    and the trainer's device, precision and evaluation batch size."""
    run_cfg = OmegaConf.load(folder / "config_resolved.yaml")
    if "task" in overridden:
        run_cfg.task = cfg.task
    for key in FROM_THIS_COMMAND:
        run_cfg.trainer[key] = cfg.trainer[key]
    run_cfg.eval = None  # a multiple-choice benchmark is scored by lrbench-mc
    return run_cfg


def rebuild(run_cfg: DictConfig, adapter: Path):
    """The trained model: built as the run built it, then its adapter and head loaded."""
    from lowrank_bench.train import prepare

    setup = prepare(run_cfg)
    try:
        load_adapter(setup.model, adapter)
    except RuntimeError as err:  # a tensor of another shape: another model, rank or head
        first = str(err).strip().splitlines()[-1].strip()
        raise LrbenchError(f"adapter {adapter} does not fit the model of {run_cfg.model.name} with "
                           f"method={run_cfg.method.name} and task {run_cfg.task.name}: {first}") from None
    return setup


def scores(setup, device, autocast, batch_size: int) -> tuple[str, dict]:
    """(the main metric, every measure) of the rebuilt model on its task(s); tables (a confusion matrix, NER's
    F1 per type) included."""
    from lowrank_bench.continual import MATRIX_METRIC

    model = setup.model.to(device)
    kwargs = {"batch_size": batch_size, "device": device, "autocast": autocast}
    if not isinstance(setup.task, ContinualTask):
        return setup.task.metric, setup.task.evaluate_all(model, **kwargs)
    out, finals = {}, []
    for plan in setup.task.plans:
        setup.bank.use(plan.name)
        measured = plan.task.evaluate_all(model, **kwargs)
        finals.append(measured[MATRIX_METRIC])
        out.update({f"{plan.name}_{k}": v for k, v in measured.items() if results.is_metric(k, v)})
    return "average_accuracy", {"average_accuracy": sum(finals) / len(finals), **out}


def evaluate_run(cfg: DictConfig, out_dir: Path, overridden: set[str]) -> dict:
    """Score a saved run; write its row and summary.json (this command's folder). Returns the row."""
    from lowrank_bench.memory import MemoryMonitor
    from lowrank_bench.trainer import autocast_for, pick_device

    from lowrank_bench import validate

    validate.check(cfg)
    started = time.perf_counter()
    folder, adapter = saved_files(cfg)
    run_cfg = run_config(cfg, folder, overridden)
    trained = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    setup = rebuild(run_cfg, adapter)
    device = pick_device(run_cfg.trainer.device)
    precision, autocast = autocast_for(device, run_cfg.trainer.precision)
    with MemoryMonitor(device) as memory:
        metric, measured = scores(setup, device, autocast, run_cfg.trainer.eval_batch_size)
    tables = {k: v for k, v in measured.items() if isinstance(v, (dict, list))}  # summary.json only
    measured = {k: v for k, v in measured.items() if k not in tables}
    row = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": "eval",
           "method": setup.method.name, "model": run_cfg.model.name, "task": setup.task.name, "seed": run_cfg.seed,
           "rank": setup.method.rank if setup.method.rank is not None else "", **setup.params,
           "metric": metric, **measured, "evaluated_run": str(folder), "adapter": str(adapter),
           "trained_task": trained.get("task", ""), "trained_commit": trained.get("git_commit", ""),
           "wall_time_s": round(time.perf_counter() - started, 3), "peak_mem_mb": memory.megabytes,
           "peak_mem_kind": memory.kind, "device": results.device_name(device), "precision": precision,
           **results.provenance(), "run_dir": str(out_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    results.write_run_files(run_cfg, out_dir, row, tables)
    results.append_row(Path(cfg.results_csv), row)
    return row
