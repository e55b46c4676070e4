"""The training loop, over stages (stages.py): seeded, epochs or max steps, gradient accumulation, periodic
evaluation, bf16/fp16 autocast on CUDA, rich progress per stage, checkpoints and bit-for-bit resume
(checkpoint.py), data parallel over processes (distributed.py).

Each stage puts its parameters in training (everything else frozen), builds the step rule it names
(`single_level.SingleLevel` or `bilevel.BiLevel`; the trainer imports neither) and runs the same loop: step, log,
evaluate every `eval_every` steps and at the stage's end, checkpoint every `checkpoint_every` loop steps; then the
stage-end hooks (the curriculum's: a sequence re-evaluates every task seen so far there) and a checkpoint of the
stage's end.

Budgets (`stages.steps_for`, applied when the stages are planned and again before the first step). An optimiser
step averages `trainer.grad_accum` batches of `trainer.batch_size`; an epoch of a stage is ceil(n / batch_size)
batches of its n training examples (a bi-level stage: its lower part), hence ceil(batches / grad_accum)
optimiser steps (the batch stream is endless, so when grad_accum does not divide an epoch's batches a step takes
the end of one pass and the start of the next). `max_steps` wins over epochs (a bi-level stage counts rounds).
Otherwise a stage takes round(epochs x steps per epoch) steps, halves rounded up: fractional epochs are honoured,
the last one partial (`trainer.epochs=2.7` with 10 steps an epoch: 27 steps). Refused before training, with the
reason: `grad_accum` greater than an epoch's batches (the numbers named: one step would count examples twice and
an epoch would be several passes), and epochs that round to no step at all.

Divergence (`Diverged`, checked where the loop reads its losses: logging and evaluation steps, and the stage's
first step). The run stops as diverged when a training loss is NaN or infinite, or exceeds
max(1e4, 100 x the stage's first training loss) — the first step's loss is computed before any update, so it is
the untrained model's; the same limit applies to an evaluation loss (`eval_loss`, the SFT tasks'). Why: every
loss here is a mean (cross-entropy, ln(labels) to ln(vocabulary) ~ 12 at the start; a regression's squared error
~ 10), and a mean cross-entropy of 1e4 nats gives the right answer a probability of e^-10000, which no trained
model reaches unless its weights blew up; training curves fall, so 100 x the starting loss is far outside any
working run, and it keeps a task whose loss starts large from tripping the absolute floor. NaN is only the last
stage of an explosion (BiDoRA at lr 1e6 reaches losses of 2e17 first), which a NaN-only check recorded as finished.

Signals (checkpoint.Signals). SIGTERM, SIGUSR1, SIGUSR2 and SIGINT (Ctrl-C) make the loop checkpoint at the next
step boundary and stop (`checkpoint.Interrupted`, also when the signal came during the last stage's end); a second
Ctrl-C stops at once (KeyboardInterrupt). `after_training()` covers what follows the loop (the post-training
evaluations, the run's files and row): there a signal stops at once, naming the checkpoint of training's end,
from which a resume redoes only what follows training.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowrank_bench import checkpoint, distributed
from lowrank_bench.batches import BatchStream
from lowrank_bench.console import console
from lowrank_bench.devices import autocast_for, pick_device
from lowrank_bench.errors import LrbenchError
from lowrank_bench.memory import MemoryMonitor
from lowrank_bench.progress import display as progress_display
from lowrank_bench.results import defined_or_none
from lowrank_bench.stages import Stage, unique
from lowrank_bench.tasks.base import Task

#: the exploding-loss rule (module docstring): a loss above max(EXPLODED_FLOOR, EXPLODED_FACTOR x the stage's
#: first training loss), or not finite, is a divergence
EXPLODED_FLOOR = 1e4
EXPLODED_FACTOR = 100.0


def loss_limit(reference: float | None) -> float:
    """The largest loss a stage that started at `reference` may reach."""
    if reference is None or not math.isfinite(reference):
        return EXPLODED_FLOOR
    return max(EXPLODED_FLOOR, EXPLODED_FACTOR * abs(reference))


def beyond(values: dict[str, float], limit: float) -> dict[str, float]:
    """The values that break the rule: not finite, or above `limit`."""
    return {k: v for k, v in values.items() if not math.isfinite(v) or v > limit}


class Diverged(Exception):
    """A loss became NaN or infinite or exploded past the limit (module docstring): the run stops there (checked
    where the loop reads its losses anyway, so at most `log_every` steps late). `losses` are the offending values,
    `last_finite` the training losses read before them."""

    def __init__(self, stage: str, step: int, losses: dict[str, float], last_finite: dict[str, float],
                 limit: float = math.inf, what: str = "training loss"):
        self.stage, self.step, self.losses, self.last_finite, self.limit = stage, step, losses, last_finite, limit
        shown = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
        finite = all(math.isfinite(v) for v in losses.values())
        self.reason = f"{shown} above the limit {limit:.4g}" if finite else f"{shown} not finite"
        super().__init__(f"the {what} diverged at step {step} of stage {stage} ({self.reason}; the limit: "
                         f"max({EXPLODED_FLOOR:g}, {EXPLODED_FACTOR:g} x the stage's first loss))")


def finite_or_none(record: dict) -> dict:
    """metrics.jsonl stays strict JSON: a NaN or infinite number is written as null."""
    return {k: defined_or_none(v) for k, v in record.items()}


@dataclass
class History:
    evals: list[dict] = field(default_factory=list)
    train_steps: int = 0
    train_seconds: float = 0.0  # optimisation only, evaluation excluded
    samples: int = 0
    steps_per_stage: dict[str, int] = field(default_factory=dict)


# -- transformers' load_best_model_at_end (an option: CoLA's LLaMA-Factory recipe) -------------------------------
class LoadBestAtEnd:
    """`trainer.load_best_model_at_end: {save_steps, metric, greater_is_better}`, as transformers 4.46.1's Trainer
    does it (trainer_callback.py DefaultFlowCallback.on_step_end, trainer.py _save_checkpoint and the end of
    _inner_training_loop): a checkpoint is saved every `save_steps` steps and at the last step; an evaluation runs every
    `eval_steps` (here trainer.eval_every; our extra evaluation at a stage's end does not count); the best model is
    decided only where a checkpoint is saved *with* the metrics of an evaluation at the same step: the first such
    checkpoint unconditionally, a later one when strictly better; at the end the best one's weights are put back. A
    last step that is no evaluation step saves a checkpoint that never competes. The default `metric` is HF's
    (`loss`, i.e. the task's `eval_loss`, lower is better). Per stage; the kept weights ride in checkpoints (trainer
    snapshots) and the best step and value in the checkpoint's states, so a resumed run selects the same step."""

    KEYS = ("save_steps", "metric", "greater_is_better")

    def __init__(self, cfg, eval_every: int | None):
        unknown = sorted(set(cfg) - set(self.KEYS))
        if unknown:
            raise LrbenchError(f"trainer.load_best_model_at_end: unknown key(s) {unknown}; valid: {list(self.KEYS)}")
        self.save_steps = cfg.get("save_steps")
        if not isinstance(self.save_steps, int) or isinstance(self.save_steps, bool) or self.save_steps < 1:
            raise LrbenchError(f"trainer.load_best_model_at_end.save_steps={self.save_steps!r}: an integer > 0")
        if not eval_every or self.save_steps % eval_every:
            raise LrbenchError(f"trainer.load_best_model_at_end.save_steps={self.save_steps} must be a round multiple "
                               f"of trainer.eval_every={eval_every}, as transformers requires; set trainer.eval_every")
        self.metric = str(cfg.get("metric") or "eval_loss")
        greater = cfg.get("greater_is_better")
        self.greater = (not self.metric.endswith("loss")) if greater is None else bool(greater)
        self.best: dict[str, dict] = {}  # stage name -> {"step", "value"}

    @staticmethod
    def key(stage: Stage) -> str:
        return f"{stage.name}@best"

    def candidate(self, step: int, total: int, eval_every: int) -> bool:
        """A checkpoint saved with an evaluation's metrics at this step (save step or last step, and eval step)."""
        return step % eval_every == 0 and (step % self.save_steps == 0 or step == total)

    def after_eval(self, trainer: "Trainer", stage: Stage, step: int, total: int, eval_every: int, record: dict):
        if not self.candidate(step, total, eval_every):
            return
        if self.metric not in record:
            raise LrbenchError(f"trainer.load_best_model_at_end.metric={self.metric!r} is not among the evaluation's "
                               f"metrics {sorted(k for k in record if isinstance(record[k], (int, float)))}")
        value, best = float(record[self.metric]), self.best.get(stage.name)
        if best is None or (value > best["value"] if self.greater else value < best["value"]):
            self.best[stage.name] = {"step": step, "value": value}
            trainer.snapshots[self.key(stage)] = [p.detach().clone() for p in stage.params]

    def at_stage_end(self, trainer: "Trainer", stage: Stage, total: int) -> None:
        best = self.best.get(stage.name)
        if best is None:
            console.print(f"load_best_model_at_end: no step of {total} was both a save and an evaluation step; the "
                          f"last weights stay")
            return
        with torch.no_grad():
            for p, value in zip(stage.params, trainer.snapshots.pop(self.key(stage))):
                p.copy_(value)
        trainer.extras.update({"loaded_best_step": best["step"], f"loaded_best_{self.metric}": best["value"]})
        console.print(f"load_best_model_at_end: the weights of step {best['step']} of {total} "
                      f"({self.metric}={best['value']:.4f}) are put back")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state["best"])


# -- the loop ---------------------------------------------------------------------------------------------------
StageHook = Callable[[int, Stage, dict], None]


class Trainer:
    """Runs a list of stages on one model; `trainer` is the `trainer` config group. With a checkpoint `store` the
    run checkpoints (and can be resumed); `states` names the objects whose `state_dict()` (JSON) rides along in
    every checkpoint (the stage-end hooks' owners: a continual run's matrix)."""

    def __init__(self, trainer, model, method, run_dir: Path, seed: int, log=None,
                 activate_head: Callable[[str], None] | None = None, store: checkpoint.Store | None = None):
        self.tc, self.model, self.method, self.run_dir, self.log = trainer, model, method, run_dir, log
        self.dp = distributed.current()
        self.device = pick_device(trainer.device, self.dp)
        self.precision, self.autocast = autocast_for(self.device, trainer.precision)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.model.to(self.device)
        self.generator = torch.Generator().manual_seed(seed)  # one data order for the whole run, stage after stage
        self.activate_head = activate_head
        self.stage_end_hooks: list[StageHook] = []
        self.optimizer_steps = 0
        self.global_step = 0  # loop steps over every stage (a bi-level round is one)
        self.epoch = 0
        self.history = History()
        self.memory = MemoryMonitor(self.device)
        self.extras: dict = {}
        self.snapshots: dict[str, list[torch.Tensor]] = {}
        self.store, self.states = store, {}
        self.load_best = None
        if trainer.get("load_best_model_at_end"):
            self.load_best = self.states["load_best"] = LoadBestAtEnd(trainer.load_best_model_at_end,
                                                                      trainer.eval_every)
        self.signals = checkpoint.Signals() if store else None
        self.earlier = {"checkpoints": 0, "checkpoint_s": 0.0, "wall_s": 0.0}  # a resumed run's earlier processes
        self.created = time.perf_counter()
        self.resuming: tuple[checkpoint.Checkpoint, dict] | None = None
        # names fixed now, while the first task's head is in place (a head bank renames the active head's tensors)
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.module_names = {id(m): name for name, m in model.named_modules()}

    # -- data and steps -----------------------------------------------------------------------------------------
    def stream(self, examples: list[dict], task: Task) -> BatchStream:
        """Shuffled passes over `examples` from the run's generator (a DataLoader's batches and draws, resumable), or
        passes in file order when the task asks for them."""
        return BatchStream(examples, self.tc.batch_size, task.collate, self.generator, self.dp.rank, self.dp.world,
                           shuffle=task.shuffle_train)

    def steps_for(self, stage: Stage, n_examples: int | None = None) -> int:
        """The stage's loop steps under the budget rule (module docstring; `stages.steps_for`), over `n_examples`
        (default: the stage's own count)."""
        return stage.total_steps(self.tc.batch_size, self.tc.grad_accum, n_examples)

    def check(self, stages: list[Stage]) -> None:
        """Refuse an impossible budget of any stage (LrbenchError), before anything runs."""
        for stage in stages:
            self.steps_for(stage)

    def next_batch(self, batches) -> dict:
        self.epoch, batch = next(batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def loss_on(self, task: Task, batch: dict) -> torch.Tensor:
        """The training loss of a batch plus the method's regulariser (BiDoRA's, BiLoRA's lower level's)."""
        with self.autocast():
            loss = task.loss(self.model, batch)
            reg = self.method.regularizer(self.model)
        return loss if reg is None else loss + reg

    def accumulate(self, batches, task: Task, accum: int | None = None,
                   params: list[torch.nn.Parameter] | None = None) -> tuple[torch.Tensor, int, dict]:
        """Forward/backward over `accum` micro-batches; the mean loss (a tensor, not synced), the number of samples
        and the last micro-batch (the bi-level rule's finite difference reuses it). Under data parallel each rank's
        loss is weighted by its share of the global batch and the gradients of `params` are summed over the ranks."""
        accum = accum or self.tc.grad_accum
        total, samples = 0.0, 0
        for _ in range(accum):
            batch = self.next_batch(batches)
            loss = self.loss_on(task, batch)
            if self.dp.active:
                loss = loss * batches.share
                samples += batches.last_size
            else:
                samples += task.batch_size_of(batch)
            self.scaler.scale(loss / accum).backward()
            total = total + loss.detach() / accum
        if self.dp.active:
            total = self.dp.sum_gradients(params or [], total)
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
    def run(self, stages: list[Stage], resume: checkpoint.Checkpoint | None = None) -> History:
        """Run `stages`, or what is left of them after the checkpoint `resume`."""
        self.stages = stages
        self.check(stages)
        trained_somewhere = unique(p for stage in stages for p in stage.params)
        self.kept = self.tensors_to_keep(trained_somewhere)
        self.dp.broadcast_(list(self.kept.values()))
        self.model.train()
        first = self.restore(resume) if resume else 0
        with self.memory, self.progress() as progress, self.signals or nullcontext():
            for index, stage in enumerate(stages):
                if index < first:
                    continue
                if self.resuming and self.resuming[0].meta["position"]["step"]:
                    self.enter(stage, trained_somewhere)  # mid-stage: snapshots and restores happened before
                else:
                    self.start(stage, trained_somewhere)
                record = self.run_stage(stage, progress, index)
                for hook in self.stage_end_hooks:
                    hook(index, stage, record)
                written = self.checkpoint(index + 1, 0)
                if self.stop_requested(0):  # (after the last stage too: what follows training is not started)
                    raise self.signals.interrupted(written)
        if self.store:
            self.extras.update(checkpoints=self.earlier["checkpoints"] + self.store.count,
                               checkpoint_s=round(self.earlier["checkpoint_s"] + self.store.seconds, 3))
        return self.history

    def enter(self, stage: Stage, trained_somewhere: list[torch.nn.Parameter]) -> None:
        """Put the stage's head in place and its parameters in training; freeze the others."""
        if self.activate_head and stage.head:
            self.activate_head(stage.head)
        training = {id(p) for p in stage.params}
        for p in trained_somewhere:
            p.requires_grad_(id(p) in training)

    def start(self, stage: Stage, trained_somewhere: list[torch.nn.Parameter]) -> None:
        """Enter the stage; keep what it snapshots and restore what it restarts from."""
        self.enter(stage, trained_somewhere)
        if stage.snapshot:
            self.snapshots[stage.name] = [p.detach().clone() for p in stage.snapshot]
        if stage.restore_from:
            source = next(s for s in self.stages if s.name == stage.restore_from)
            with torch.no_grad():
                for p, value in zip(source.snapshot, self.snapshots[stage.restore_from]):
                    p.copy_(value)

    def run_stage(self, stage: Stage, progress: Progress, index: int = 0) -> dict:
        rule = stage.rule(self, stage)
        self.method.on_train_start(rule.total_steps)
        total = rule.total_steps
        eval_every = self.tc.eval_every or total
        logs: dict[str, float] = {}
        record: dict = {}
        first, loop = self.resume_stage(rule) if self.resuming else (1, {})
        reference = loop.get("loss_reference")  # the stage's first training loss (the divergence limit's base)
        bar = progress.add_task(f"{self.method.name} · {stage.name}", total=total, info="", completed=first - 1)
        start = time.perf_counter() - loop.get("pending_s", 0.0)
        stage_seconds = loop.get("stage_seconds", 0.0)
        stage_samples = loop.get("stage_samples", self.history.samples)
        for step in range(first, total + 1):
            raw = rule.step()
            self.global_step += 1
            if step % self.tc.log_every == 0 or step % eval_every == 0 or step == total or reference is None:
                finite, logs = logs, {k: float(v) for k, v in raw.items()}  # the only host sync of the loop
                if reference is None:  # the stage's first step: losses of the weights before any update
                    reference = min((abs(v) for v in logs.values() if math.isfinite(v)), default=math.nan)
                exploded = beyond(logs, loss_limit(reference))
                if exploded:
                    self.account(stage, step, time.perf_counter() - start)
                    raise self.diverged(Diverged(stage.name, self.global_step, exploded, finite,
                                                 loss_limit(reference)))
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
                self.account(stage, step, seconds)
                record = self.evaluate(stage, logs)
                exploded = beyond({k: float(v) for k, v in record.items() if k.endswith("eval_loss")
                                   and isinstance(v, (int, float))}, loss_limit(reference))
                if exploded:
                    raise self.diverged(Diverged(stage.name, self.global_step, exploded, logs,
                                                 loss_limit(reference), "evaluation loss"))
                if self.load_best:
                    self.load_best.after_eval(self, stage, step, total, eval_every, record)
                if self.dp.is_main:
                    progress.console.print(self.format_eval(record))
                start = time.perf_counter()
            if step < total and self.store:  # the stage's last step is checkpointed after its stage-end hooks
                stop = self.stop_requested(step)
                if stop or self.due():
                    pending = time.perf_counter() - start
                    written = self.checkpoint(index, step, rule, {"pending_s": pending, "stage_seconds": stage_seconds,
                                                                  "stage_samples": stage_samples,
                                                                  "loss_reference": reference})
                    start = time.perf_counter() - pending  # writing a checkpoint is not training time
                    if stop:
                        raise self.signals.interrupted(written)
        self.extras.update(rule.summary())
        if self.load_best:
            self.load_best.at_stage_end(self, stage, total)
        return record

    def diverged(self, stop: Diverged) -> Diverged:
        """`stop`, its reason kept for the row (`diverged_reason`)."""
        self.extras["diverged_reason"] = stop.reason
        return stop

    def account(self, stage: Stage, step: int, seconds: float) -> None:
        """Training time and steps up to `step` of `stage` (evaluation time excluded)."""
        self.history.train_seconds += seconds
        self.history.train_steps += step - self.history.steps_per_stage.get(stage.name, 0)
        self.history.steps_per_stage[stage.name] = step

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def due(self) -> bool:
        every = self.tc.get("checkpoint_every") or 0
        return every > 0 and self.global_step % every == 0

    def stop_requested(self, step: int) -> bool:
        """Whether a signal asked the run to stop. Data-parallel ranks agree on it at logging steps (where the loop
        syncs anyway), so that they stop at the same step."""
        if self.signals is None:
            return False
        if not self.dp.active:
            return self.signals.received is not None
        if step % self.tc.log_every and not self.due():
            return False
        return self.dp.any(self.signals.received is not None)

    def tensors_to_keep(self, trained: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Every parameter trained in some stage and the buffers of the modules holding them, by name."""
        missing = [p for p in trained if id(p) not in self.names]
        if missing:
            raise LrbenchError(f"{len(missing)} trained parameter(s) are not the model's own (model.named_parameters)"
                               "; a checkpoint could not name them")
        kept = {self.names[id(p)]: p for p in trained}
        ids = {id(p) for p in trained}
        for module in self.model.modules():
            if any(id(p) in ids for p in module.parameters(recurse=False)):
                prefix = self.module_names.get(id(module), "")
                for name, buffer in module.named_buffers(recurse=False):
                    kept[f"{prefix}.{name}" if prefix else name] = buffer
        return kept

    def checkpoint(self, stage: int, step: int, rule=None, loop: dict | None = None) -> Path | None:
        """Write the run's state after `step` steps of stage `stage` (step 0: the stage has not started)."""
        if self.store is None:
            return None
        started = time.perf_counter()
        rng = self.dp.gather(checkpoint.rng_state())  # every rank's: dropout draws differ between shards
        if not self.dp.is_main:
            return None
        tensors = {f"param/{name}": t for name, t in self.kept.items()}
        for name, values in self.snapshots.items():
            tensors.update({f"snapshot/{name}/{i}": v for i, v in enumerate(values)})
        tensors["generator"] = self.generator.get_state()
        for r, (_, states) in enumerate(rng):
            tensors.update({f"rng/{r}/{k}": v for k, v in states.items()})
        scalars, rule_tensors, optimizers = rule.state() if rule else ({}, {}, {})
        tensors.update({f"rule/{k}": v for k, v in rule_tensors.items()})
        metrics = self.run_dir / "metrics.jsonl"
        name = self.stages[stage].name if stage < len(self.stages) else "end"
        meta = {"position": {"stage": stage, "step": step, "stage_name": name},
                "stages": [s.name for s in self.stages], "global_step": self.global_step,
                "optimizer_steps": self.optimizer_steps, "epoch": self.epoch, "history": asdict(self.history),
                "extras": self.extras, "loop": loop or {}, "rule": scalars, "scaler": self.scaler.state_dict(),
                "states": {key: obj.state_dict() for key, obj in self.states.items()},
                "rng": [scalars_ for scalars_, _ in rng], "world": self.dp.world,
                "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
                "wall_s": self.earlier["wall_s"] + time.perf_counter() - self.created,
                "checkpoints": self.earlier["checkpoints"] + self.store.count + 1,
                "checkpoint_s": self.earlier["checkpoint_s"] + self.store.seconds}
        path = self.store.write(f"step-{self.global_step:08d}", meta, tensors, optimizers)
        self.store.seconds += time.perf_counter() - started
        self.signals.last = path
        return path

    @contextmanager
    def after_training(self):
        """For what follows `run` (the post-training evaluations, the run's files and row): a signal (SIGTERM,
        SIGUSR1, SIGUSR2, SIGINT) stops at once with `checkpoint.Interrupted` naming the checkpoint of training's
        end, so the caller marks the run interrupted and a resume redoes only what follows training. Without
        checkpoints (trainer.checkpoint_every=null) signals are left alone."""
        if self.signals is None:
            yield
            return
        with self.signals.at_once():
            yield

    def restore(self, resume: checkpoint.Checkpoint) -> int:
        """Put the checkpoint's state back; returns the stage to go on with. The step rule's state and the RNGs are
        put back when that stage's rule exists (`resume_stage`)."""
        meta = resume.meta
        names = [s.name for s in self.stages]
        if meta["stages"] != names:
            raise LrbenchError(f"checkpoint {resume.path} has stages {meta['stages']}, this run plans {names}")
        if meta["world"] != self.dp.world:
            console.print(f"[yellow]the checkpoint was written by {meta['world']} process(es), this run has "
                          f"{self.dp.world}: the data order is the same, dropout draws are not (not bit for bit)")
        tensors = {k: v.to(self.device) for k, v in resume.tensors().items()}
        with torch.no_grad():
            for name, t in self.kept.items():
                t.copy_(tensors[f"param/{name}"])
        self.snapshots = {}
        for key in sorted((k for k in tensors if k.startswith("snapshot/")), key=lambda k: int(k.rsplit("/", 1)[1])):
            stage_name = key[len("snapshot/"): key.rindex("/")]
            self.snapshots.setdefault(stage_name, []).append(tensors[key])
        self.generator.set_state(tensors["generator"].cpu())
        self.history = History(**meta["history"])
        self.extras = dict(meta["extras"])
        self.global_step, self.optimizer_steps, self.epoch = meta["global_step"], meta["optimizer_steps"], meta["epoch"]
        self.earlier = {"checkpoints": meta["checkpoints"], "checkpoint_s": meta["checkpoint_s"],
                        "wall_s": meta["wall_s"]}
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        for key, obj in self.states.items():
            obj.load_state_dict(meta["states"][key])
        metrics = self.run_dir / "metrics.jsonl"
        if self.dp.is_main and metrics.exists():  # records written after the checkpoint are written again
            with open(metrics, "r+b") as handle:
                handle.truncate(meta["metrics_bytes"])
        self.resuming = (resume, {k: v.cpu() for k, v in tensors.items() if k.startswith(("rule/", "rng/"))})
        if self.signals is not None:
            self.signals.last = resume.path
        return meta["position"]["stage"]

    def resume_stage(self, rule) -> tuple[int, dict]:
        """The stage's rule and the RNGs as the checkpoint left them; the first step to run and the loop's timers."""
        resume, tensors = self.resuming
        self.resuming = None
        meta = resume.meta
        step = meta["position"]["step"]
        if step:
            rule.load_state(meta["rule"], checkpoint.within(tensors, "rule/"), resume.optimizers())
        rank = self.dp.rank if meta["world"] == self.dp.world else 0
        checkpoint.set_rng_state(meta["rng"][rank], checkpoint.within(tensors, f"rng/{rank}/"))
        return step + 1, (meta["loop"] if step else {})

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate_task(self, task: Task) -> dict:
        return task.evaluate_all(self.model, batch_size=self.tc.eval_batch_size, device=self.device,
                                 autocast=self.autocast)

    def evaluate(self, stage: Stage, logs: dict) -> dict:
        distributed.take_evaluated()  # from here on, this evaluation's examples
        metrics = self.evaluate_task(stage.task)
        record = {"step": self.history.train_steps, "epoch": self.epoch, "stage": stage.name,
                  **{f"train_{k}": v for k, v in logs.items()}, **metrics}
        if self.dp.active:  # how the evaluation was shared out (distributed.eval_batches)
            record["eval_examples_by_rank"] = self.dp.gather(distributed.take_evaluated())
        self.history.evals.append(record)
        self.write_record(record)
        return record

    def write_record(self, record: dict) -> None:
        if not self.dp.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        if self.log:
            self.log(record, self.history.train_steps)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def progress(self) -> Progress:
        return progress_display(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                disable=not self.tc.progress or not self.dp.is_main)

    @staticmethod
    def format_eval(record: dict) -> str:
        shown = {k: v for k, v in record.items() if k != "epoch"}
        return "eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
