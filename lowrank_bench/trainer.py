"""The training loop: seeded, epochs or max steps, gradient accumulation, periodic evaluation, bf16/fp16 autocast on
CUDA, a rich progress bar. `BilevelTrainer` (bilevel.py) reuses everything here and replaces `train_step`.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowrank_bench.errors import LrbenchError
from lowrank_bench.results import MemoryMonitor

console = Console(stderr=True)


# -- optimisation -----------------------------------------------------------------------------------------------
def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)  # linear decay to zero


def make_optimizer(params: list[torch.nn.Parameter], cfg, total_steps: int):
    """AdamW (decay on matrices only) with linear warmup and a linear/cosine/constant schedule."""
    if not params:
        raise LrbenchError("no trainable parameters for an optimizer: check method.targets and model.head_modules")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    wd_1d = cfg.weight_decay if cfg.get("decay_vectors", False) else 0.0
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": wd_1d}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = cfg.warmup_steps if cfg.get("warmup_steps") is not None else int(cfg.warmup_ratio * total_steps)
    schedule = cfg.get("schedule", "linear")
    if schedule not in ("linear", "cosine", "constant"):
        raise LrbenchError(f"optimizer.schedule={schedule!r}; valid: constant, cosine, linear")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=warmup, total=total_steps, schedule=schedule))
    return optimizer, scheduler


def endless(loader):
    """Cycle a DataLoader forever; each pass reshuffles from the loader's seeded generator."""
    epoch = 0
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1


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


class Trainer:
    """Single-level training of every trainable parameter on the task's training split."""

    def __init__(self, cfg, model, task, method, groups: dict[str, list], run_dir: Path, log=None):
        self.cfg, self.model, self.task, self.method, self.groups = cfg, model, task, method, groups
        self.run_dir, self.log = run_dir, log
        tc = cfg.trainer
        self.device = pick_device(tc.device)
        self.precision, self.autocast = autocast_for(self.device, tc.precision)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.model.to(self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.optimizer_steps = 0
        self.setup()
        self.method.on_train_start(self.total_steps)

    # -- set-up; BilevelTrainer overrides this ------------------------------------------------------------------
    def setup(self) -> None:
        train = self.task.splits[self.task.train_split]
        self.total_steps = self.steps_for(len(train))
        self.batches = endless(self.loader(train))
        self.params = [p for group in self.groups.values() for p in group]
        self.optimizer, self.scheduler = make_optimizer(self.params, self.cfg.optimizer, self.total_steps)

    def loader(self, examples: list[dict]):
        return torch.utils.data.DataLoader(examples, batch_size=self.cfg.trainer.batch_size, shuffle=True,
                                           collate_fn=self.task.collate, generator=self.generator)

    def steps_for(self, n_examples: int) -> int:
        tc = self.cfg.trainer
        if tc.get("max_steps"):
            return int(tc.max_steps)
        if n_examples == 0:
            raise LrbenchError(f"task {self.task.name} has an empty training split")
        return max(1, math.ceil(n_examples / (tc.batch_size * tc.grad_accum)) * int(tc.epochs))

    # -- one optimisation step ----------------------------------------------------------------------------------
    def next_batch(self, batches) -> dict:
        self.epoch, batch = next(batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def loss_on(self, batch: dict) -> torch.Tensor:
        """The training loss of a batch plus the method's regulariser (BiDoRA's, BiLoRA's lower level's)."""
        with self.autocast():
            loss = self.task.loss(self.model, batch)
            reg = self.method.regularizer(self.model)
        return loss if reg is None else loss + reg

    def accumulate(self, batches, accum: int) -> tuple[torch.Tensor, int]:
        """Forward/backward over `accum` micro-batches; returns the mean loss (a tensor, not synced) and samples."""
        total, samples = 0.0, 0
        for _ in range(accum):
            batch = self.next_batch(batches)
            loss = self.loss_on(batch)
            self.scaler.scale(loss / accum).backward()
            total = total + loss.detach() / accum
            samples += batch["input_ids"].shape[0]
        return total, samples

    def optimizer_step(self, optimizer, params) -> None:
        if self.cfg.trainer.max_grad_norm:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.optimizer_steps += 1
        self.method.after_optimizer_step(self.optimizer_steps)
        optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> dict[str, torch.Tensor]:
        loss, samples = self.accumulate(self.batches, self.cfg.trainer.grad_accum)
        self.optimizer_step(self.optimizer, self.params)
        self.scheduler.step()
        self.history.samples += samples
        return {"loss": loss}

    def lrs(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    # -- the loop -----------------------------------------------------------------------------------------------
    def evaluate(self, step: int, logs: dict) -> dict:
        tc = self.cfg.trainer
        metrics = self.task.evaluate_all(self.model, batch_size=tc.eval_batch_size, device=self.device,
                                         autocast=self.autocast)
        record = {"step": step, "epoch": self.epoch, **self.record_extras(), **{f"train_{k}": v for k, v in logs.items()},
                  **metrics}
        self.history.evals.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.log:
            self.log(record, step)
        return record

    def fit(self) -> History:
        self.history = History()
        self.epoch = 0
        tc = self.cfg.trainer
        eval_every = tc.eval_every or self.total_steps
        self.model.train()
        logs: dict[str, float] = {}
        self.memory = MemoryMonitor(self.device)
        with self.memory, self.progress() as progress:
            bar = progress.add_task(f"{self.method.name} · {self.task.name}", total=self.total_steps, info="")
            start = time.perf_counter()
            for step in range(1, self.total_steps + 1):
                raw = self.train_step()
                if step % tc.log_every == 0 or step % eval_every == 0 or step == self.total_steps:
                    logs = {k: float(v) for k, v in raw.items()}  # the only host sync of the loop
                    self.sync()
                    elapsed = time.perf_counter() - start
                    rate = self.history.samples / max(elapsed + self.history.train_seconds, 1e-9)
                    info = " ".join(f"{k}={v:.4f}" for k, v in logs.items())
                    lrs = " ".join(f"{k}={v:.2e}" for k, v in self.lrs().items())
                    progress.update(bar, info=f"{info} {lrs} {rate:.1f} samples/s")
                progress.advance(bar)
                if step % eval_every == 0 or step == self.total_steps:
                    self.sync()
                    self.history.train_seconds += time.perf_counter() - start
                    self.history.train_steps = step
                    record = self.evaluate(step, logs)
                    progress.console.print(self.format_eval(record))
                    start = time.perf_counter()
        return self.history

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, disable=not self.cfg.trainer.progress)

    def format_eval(self, record: dict) -> str:
        shown = {k: v for k, v in record.items() if k != "epoch"}
        return "eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())

    def record_extras(self) -> dict:
        """Fields added to every evaluation record (the bi-level trainer adds its phase)."""
        return {}

    def extra_summary(self) -> dict:
        """Method-specific columns for the result row (the bi-level trainer adds split sizes and modes)."""
        return {}
