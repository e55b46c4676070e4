"""`lrbench`: compose a run with Hydra, train, report.

    lrbench method=bidora task=glue/mrpc model=minilm-l6 seed=0
    lrbench -m method=ft,lora,dora seed=0,1 task=glue/sst2

seed -> task (raw data, tokenised once and cached) -> model with the task's head -> method.apply (inject and
group trainable parameters by role) -> the stages (stages.py: one, or the bi-level search and its retraining) ->
Trainer.run(stages) -> summary.json in the run directory and one row in results/runs.csv.
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.text import Text

from lowrank_bench import methods, models, results, tasks
from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import Method, save_adapter
from lowrank_bench.stages import stages_for
from lowrank_bench.tasks.base import Task
from lowrank_bench.trainer import Trainer

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisation is done once, before any worker forks


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Setup:
    task: Task
    method: Method
    model: torch.nn.Module
    groups: dict[str, list[torch.nn.Parameter]]
    params: tuple[int, int]


def prepare(cfg: DictConfig) -> Setup:
    """Everything before training: data tokenised, model built with the task's head, method applied."""
    tokenizer = models.load_tokenizer(cfg.model)  # first: an unreachable Hub model fails before anything slow
    task = tasks.build(cfg.task)
    method = methods.build(cfg.method)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    task.prepare(tokenizer, cfg.task.get("max_length") or cfg.model.max_length)
    torch.manual_seed(cfg.seed)  # the head's and adapters' initialisation must not depend on the data loading
    model = models.load_model(cfg.model, task.head, tokenizer.pad_token_id)
    groups = method.apply(model, list(cfg.model.head_modules), models.target_sets(cfg.model))
    return Setup(task, method, method.wrap(model), groups, models.count_parameters(model))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """One run end to end; returns its summary. Raises LrbenchError on bad input before anything is written."""
    started = time.perf_counter()
    origin = results.provenance()
    s = prepare(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = results.make_logger(cfg, run_dir)
    summary = None
    try:
        trainer = Trainer(cfg.trainer, s.model, s.method, run_dir, cfg.seed, logger)
        stages = stages_for(s.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                            cfg.trainer.max_steps, cfg.seed)
        history = trainer.run(stages)
        if cfg.save_adapter:
            save_adapter(s.model, run_dir / "adapter.safetensors")
        summary = results.summarize(cfg, s.task, s.method, trainer, history, s.params, time.perf_counter() - started,
                                    origin, extra={**trainer.extras, **stage_steps(history),
                                                   "run_dir": str(run_dir)})
        results.write_run_files(cfg, run_dir, summary)
        results.append_row(Path(cfg.results_csv), summary)
    finally:
        if logger:
            logger.finish(summary)
    return summary


def stage_steps(history) -> dict:
    """Steps per stage, when a run has more than one (BiDoRA's search and retraining)."""
    steps = history.steps_per_stage
    return {f"{name.replace('/', '_')}_steps": n for name, n in steps.items()} if len(steps) > 1 else {}


def job(cfg: DictConfig) -> float | None:
    """One Hydra job. Kept undecorated under its own name so that launchers which pickle it (joblib, submitit)
    pickle a reference, not the function's globals."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except LrbenchError as err:
        console.print(Text.assemble(("lrbench error: ", "bold red"), str(err)), soft_wrap=True)
        sys.exit(2)
    results.print_summary(summary)
    return summary.get(f"best_{summary['metric']}")


main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(job)

if __name__ == "__main__":  # `python -m lowrank_bench.train`: run the importable copy, so that jobs pickle by name
    from lowrank_bench.train import main as packaged_main

    packaged_main()
