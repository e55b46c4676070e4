"""One task: one head, its stages (one, or the bi-level search and its retraining), the best and last evaluation."""
from __future__ import annotations

from pathlib import Path

from lowrank_bench import results, tasks
from lowrank_bench.stages import stages_for


class SingleTask:
    one_head = True
    activate_head = None  # one head, always in place

    def __init__(self, cfg):
        self.task = tasks.build(cfg.task)
        self.tasks = [self.task]

    # (read from the task when asked: NER knows its head once prepare() has read the label set)
    @property
    def head(self):
        return self.task.head

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def metric(self) -> str:
        return self.task.metric

    def attach_heads(self, model, head_modules, groups):
        return groups, groups.get("head") or ()

    def plan(self, cfg, method, groups):
        return stages_for(self.task, method, groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                          cfg.trainer.max_steps, cfg.seed, trainer=cfg.trainer)

    def attach(self, trainer, run_dir: Path, tokenizer) -> None:
        self.task.use_run_folder(run_dir)

    def before_training(self) -> None:
        pass

    def measures(self, history) -> dict:
        return {**results.best_and_last(history.evals, self.metric), **self.task.result_counts()}

    def partial_measures(self, history) -> dict:
        scores = results.best_and_last(history.evals, self.metric) if history.evals else {}
        return {**scores, **self.task.result_counts()}

    def tables(self, history) -> dict:
        return results.tables_of(history.evals, self.metric)

    def write_files(self, run_dir: Path, logger) -> None:
        pass

    def before_save(self) -> None:
        pass

    def score(self, model, **kwargs) -> tuple[str, dict]:
        return self.metric, self.task.evaluate_all(model, **kwargs)
