"""The training loop, over stages (stages.py): seeded, epochs or max steps, gradient accumulation, periodic
evaluation, bf16/fp16 autocast on CUDA, rich progress per stage.

Each stage puts its parameters in training (everything else frozen), builds its step rule (`SingleLevel` here,
`BiLevel` in bilevel.py) and runs the same loop: step, log, evaluate every `eval_every` steps and at the stage's
end; then the stage-end hooks (a continual run re-evaluates every task seen so far there).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError
from lowrank_bench.memory import MemoryMonitor
from lowrank_bench.optim import endless, make_optimizer
from lowrank_bench.stages import Stage, unique
from lowrank_bench.tasks.base import Task

# -- devices and precision --------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LrbenchError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default (fp16 where bf16 is unsupported); plain fp32 on the CPU."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise LrbenchError(f"trainer.precision={precision!r}; valid: auto, bf16, fp16, fp32")
    if precision == "fp32":
        return precision, nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, partial(torch.autocast, device_type=device.type, dtype=dtype)


@dataclass
class History:
    evals: list[dict] = field(default_factory=list)
    train_steps: int = 0
    train_seconds: float = 0.0  # optimisation only, evaluation excluded
    samples: int = 0
    steps_per_stage: dict[str, int] = field(default_factory=dict)


# -- the single-level step rule ---------------------------------------------------------------------------------
class SingleLevel:
    """One optimiser step of every trainable parameter of the stage over `grad_accum` micro-batches."""

    def __init__(self, loop: "Trainer", stage: Stage):
        self.loop, self.task, self.params = loop, stage.task, stage.params
        train = stage.task.train_examples()
        self.total_steps = loop.steps_for(len(train), stage.task, stage.epochs, stage.max_steps)
        self.batches = endless(loop.loader(train, stage.task))
        self.optimizer, self.scheduler = make_optimizer(self.params, stage.optimizer, self.total_steps)

    def step(self) -> dict[str, torch.Tensor]:
        loss, samples, _ = self.loop.accumulate(self.batches, self.task)
        self.loop.optimizer_step(self.optimizer, self.params)
        self.scheduler.step()
        self.loop.history.samples += samples
        return {"loss": loss}

    def lrs(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def summary(self) -> dict:
        return {}


def step_rule(loop: "Trainer", stage: Stage):
    if stage.bilevel is None:
        return SingleLevel(loop, stage)
    from lowrank_bench.bilevel import BiLevel

    return BiLevel(loop, stage)


# -- the loop ---------------------------------------------------------------------------------------------------
StageHook = Callable[[int, Stage, dict], None]


class Trainer:
    """Runs a list of stages on one model; `trainer` is the `trainer` config group."""

    def __init__(self, trainer, model, method, run_dir: Path, seed: int, log=None,
                 activate_head: Callable[[str], None] | None = None):
        self.tc, self.model, self.method, self.run_dir, self.log = trainer, model, method, run_dir, log
        self.device = pick_device(trainer.device)
        self.precision, self.autocast = autocast_for(self.device, trainer.precision)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.model.to(self.device)
        self.generator = torch.Generator().manual_seed(seed)  # one data order for the whole run, stage after stage
        self.activate_head = activate_head
        self.stage_end_hooks: list[StageHook] = []
        self.optimizer_steps = 0
        self.epoch = 0
        self.history = History()
        self.memory = MemoryMonitor(self.device)
        self.extras: dict = {}
        self.snapshots: dict[str, list[torch.Tensor]] = {}

    # -- data and steps -----------------------------------------------------------------------------------------
    def loader(self, examples: list[dict], task: Task):
        return torch.utils.data.DataLoader(examples, batch_size=self.tc.batch_size, shuffle=True,
                                           collate_fn=task.collate, generator=self.generator)

    def steps_for(self, n_examples: int, task: Task, epochs: float, max_steps: int | None) -> int:
        """Optimiser steps of a stage: `max_steps`, or `epochs` passes over `n_examples`."""
        if max_steps:
            return int(max_steps)
        if n_examples == 0:
            raise LrbenchError(f"task {task.name} has an empty training split")
        return max(1, math.ceil(n_examples / (self.tc.batch_size * self.tc.grad_accum)) * int(epochs))

    def next_batch(self, batches) -> dict:
        self.epoch, batch = next(batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def loss_on(self, task: Task, batch: dict) -> torch.Tensor:
        """The training loss of a batch plus the method's regulariser (BiDoRA's, BiLoRA's lower level's)."""
        with self.autocast():
            loss = task.loss(self.model, batch)
            reg = self.method.regularizer(self.model)
        return loss if reg is None else loss + reg

    def accumulate(self, batches, task: Task, accum: int | None = None) -> tuple[torch.Tensor, int, dict]:
        """Forward/backward over `accum` micro-batches; the mean loss (a tensor, not synced), the number of samples
        and the last micro-batch (the bi-level rule's finite difference reuses it)."""
        accum = accum or self.tc.grad_accum
        total, samples = 0.0, 0
        for _ in range(accum):
            batch = self.next_batch(batches)
            loss = self.loss_on(task, batch)
            self.scaler.scale(loss / accum).backward()
            total = total + loss.detach() / accum
            samples += task.batch_size_of(batch)
        return total, samples, batch

    def optimizer_step(self, optimizer, params) -> None:
        if self.tc.max_grad_norm:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.tc.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.optimizer_steps += 1
        self.method.after_optimizer_step(self.optimizer_steps)
        optimizer.zero_grad(set_to_none=True)

    # -- stages -------------------------------------------------------------------------------------------------
    def run(self, stages: list[Stage]) -> History:
        self.stages = stages
        trained_somewhere = unique(p for stage in stages for p in stage.params)
        self.model.train()
        with self.memory, self.progress() as progress:
            for index, stage in enumerate(stages):
                self.start(stage, trained_somewhere)
                record = self.run_stage(stage, progress)
                for hook in self.stage_end_hooks:
                    hook(index, stage, record)
        return self.history

    def start(self, stage: Stage, trained_somewhere: list[torch.nn.Parameter]) -> None:
        """Put the stage's parameters in training and freeze the others; restore what the stage restarts from."""
        if self.activate_head and stage.head:
            self.activate_head(stage.head)
        training = {id(p) for p in stage.params}
        for p in trained_somewhere:
            p.requires_grad_(id(p) in training)
        if stage.snapshot:
            self.snapshots[stage.name] = [p.detach().clone() for p in stage.snapshot]
        if stage.restore_from:
            source = next(s for s in self.stages if s.name == stage.restore_from)
            with torch.no_grad():
                for p, value in zip(source.snapshot, self.snapshots[stage.restore_from]):
                    p.copy_(value)

    def run_stage(self, stage: Stage, progress: Progress) -> dict:
        rule = step_rule(self, stage)
        self.method.on_train_start(rule.total_steps)
        total = rule.total_steps
        eval_every = self.tc.eval_every or total
        logs: dict[str, float] = {}
        record: dict = {}
        bar = progress.add_task(f"{self.method.name} · {stage.name}", total=total, info="")
        start, stage_seconds, stage_samples = time.perf_counter(), 0.0, self.history.samples
        for step in range(1, total + 1):
            raw = rule.step()
            if step % self.tc.log_every == 0 or step % eval_every == 0 or step == total:
                logs = {k: float(v) for k, v in raw.items()}  # the only host sync of the loop
                self.sync()
                elapsed = stage_seconds + time.perf_counter() - start
                rate = (self.history.samples - stage_samples) / max(elapsed, 1e-9)
                lrs = " ".join(f"{k}={v:.2e}" for k, v in rule.lrs().items())
                info = " ".join(f"{k}={v:.4f}" for k, v in logs.items())
                progress.update(bar, info=f"{info} {lrs} {rate:.1f} samples/s")
            progress.advance(bar)
            if step % eval_every == 0 or step == total:
                self.sync()
                seconds = time.perf_counter() - start
                stage_seconds += seconds
                self.history.train_seconds += seconds
                self.history.train_steps += step - self.history.steps_per_stage.get(stage.name, 0)
                self.history.steps_per_stage[stage.name] = step
                record = self.evaluate(stage, logs)
                progress.console.print(self.format_eval(record))
                start = time.perf_counter()
        self.extras.update(rule.summary())
        return record

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate_task(self, task: Task) -> dict:
        return task.evaluate_all(self.model, batch_size=self.tc.eval_batch_size, device=self.device,
                                 autocast=self.autocast)

    def evaluate(self, stage: Stage, logs: dict) -> dict:
        metrics = self.evaluate_task(stage.task)
        record = {"step": self.history.train_steps, "epoch": self.epoch, "stage": stage.name,
                  **{f"train_{k}": v for k, v in logs.items()}, **metrics}
        self.history.evals.append(record)
        self.write_record(record)
        return record

    def write_record(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.log:
            self.log(record, self.history.train_steps)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, disable=not self.tc.progress)

    @staticmethod
    def format_eval(record: dict) -> str:
        shown = {k: v for k, v in record.items() if k != "epoch"}
        return "eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
