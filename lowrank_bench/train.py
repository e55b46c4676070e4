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

from lowrank_bench import evaluate, mc_eval, methods, models, results, sweep, tasks, validate
from lowrank_bench.console import console
from lowrank_bench.continual import ContinualRun
from lowrank_bench.errors import LrbenchError
from lowrank_bench.heads import DecoderClassifier, HeadBank, decoder_head
from lowrank_bench.mc_eval import MultipleChoiceEval
from lowrank_bench.methods.base import Method, save_adapter
from lowrank_bench.models import Head
from lowrank_bench.stages import overridden, stages_for
from lowrank_bench.stages import unique as stages_unique
from lowrank_bench.tasks.base import HEAD_MODULES, Task
from lowrank_bench.tasks.continual import ContinualTask
from lowrank_bench.trainer import Diverged, Trainer

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
    task: Task | ContinualTask
    method: Method
    model: torch.nn.Module  # what the trainer calls (PEFT baselines: their PeftModel)
    groups: dict[str, list[torch.nn.Parameter]]
    params: dict[str, int]  # trainable (adapter + head), total, and the head apart
    tokenizer: object
    load_info: dict  # where the weights came from and how long they took (GGUF dequantisation, cache)
    bank: HeadBank | None = None  # continual runs: one head per task
    task_heads: dict[str, list[torch.nn.Parameter]] | None = None
    mc: MultipleChoiceEval | None = None  # eval=mc/<benchmark>: scored after training
    mc_before: dict | None = None  # ... and before it (eval.before), on the model as loaded


def build_model(model_cfg: DictConfig, head: Head, pad_token_id: int | None) -> torch.nn.Module:
    """The model with the task's head. A decoder classifies from its last real token and keeps its LM head."""
    if head.kind == "sequence_classification" and models.is_decoder(model_cfg):
        lm = models.load_model(model_cfg, Head("causal_lm"), pad_token_id)
        model = DecoderClassifier(lm, decoder_head(lm.config, 1 if head.regression else head.num_labels))
        model.lrbench_load_info = lm.lrbench_load_info
        return model
    return models.load_model(model_cfg, head, pad_token_id)


def prepare(cfg: DictConfig) -> Setup:
    """Everything before training: data tokenised, model built with the task's head, method applied."""
    tokenizer = models.load_tokenizer(cfg.model)  # first: an unreachable Hub model fails before anything slow
    task = tasks.build(cfg.task)
    method = methods.build(cfg.method)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    for each in task.tasks if isinstance(task, ContinualTask) else [task]:
        each.prepare(tokenizer, each.cfg.get("max_length") or cfg.model.max_length)
    first = task.tasks[0] if isinstance(task, ContinualTask) else task
    torch.manual_seed(cfg.seed)  # the head's and adapters' initialisation must not depend on the data loading
    model = build_model(cfg.model, first.head, tokenizer.pad_token_id)
    load_info = {f"model_{k}": v for k, v in model.lrbench_load_info.items() if k in ("load_from", "load_s")}
    mc = mc_eval.build(cfg, tokenizer, first.head)  # reads its items: a bad one fails before anything slow
    mc_before = mc.score_before(model, cfg.trainer) if mc and cfg.eval.before else None
    heads = head_modules(model, first.head)
    groups = method.apply(model, heads, models.target_sets(cfg.model))
    if not isinstance(task, ContinualTask):
        return Setup(task, method, method.wrap(model), groups, parameter_counts(model, groups.get("head", [])),
                     tokenizer, load_info, mc=mc, mc_before=mc_before)
    bank = HeadBank(model, heads[0], cfg.task.head_protocol, task.poolings)
    task_heads = {}
    for index, plan in enumerate(task.plans):
        torch.manual_seed(cfg.seed + index)  # each task's head, independent of the others (CURLoRA's: 1311)
        task_heads[plan.name] = bank.add(plan.name, plan.task.head.num_labels)
    bank.use(task.plans[0].name)
    groups = {role: params for role, params in groups.items() if role != "head"}  # the template head left
    all_heads = [p for params in task_heads.values() for p in params]
    return Setup(task, method, method.wrap(model), groups, parameter_counts(model, all_heads), tokenizer, load_info,
                 bank, task_heads, mc, mc_before)


def head_modules(model: torch.nn.Module, head: Head) -> list[str]:
    """The task's head: the modules its head kind uses, plus any module the checkpoint did not provide (freshly
    initialised weights, such as DeBERTa's classification pooler, must train)."""
    names = [n for n in HEAD_MODULES[head.kind] if hasattr(model, n)]
    fresh = sorted({name.split(".")[0] for name in getattr(model, "lrbench_new_parameters", ())})
    return names + [n for n in fresh if n not in names]


def parameter_counts(model: torch.nn.Module, head: list[torch.nn.Parameter]) -> dict[str, int]:
    trainable, total = models.count_parameters(model)
    head_params = sum(p.numel() for p in stages_unique(head))
    return {"trainable_params": trainable, "total_params": total, "head_params": head_params,
            "adapter_params": trainable - head_params}


def plan_stages(cfg: DictConfig, s: Setup) -> list:
    if not isinstance(s.task, ContinualTask):
        return stages_for(s.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                          cfg.trainer.max_steps, cfg.seed)
    stages = []
    for plan in s.task.plans:
        groups = {**s.groups, "head": s.task_heads[plan.name]}
        budget = {"epochs": cfg.trainer.epochs, "max_steps": cfg.trainer.max_steps, **plan.budget}
        stages += stages_for(plan.task, s.method, groups, cfg.method, overridden(cfg.optimizer, **plan.optimizer),
                             budget["epochs"], budget["max_steps"], cfg.seed, name=plan.name, head=plan.name)
    return stages


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """One run end to end; returns its summary. Raises LrbenchError on bad input before anything is written.
    A run that continues a checkpoint (`trainer.resume`, or its own config's in its own folder: checkpoint.py)
    goes on in that checkpoint's folder. Under data parallel (distributed.py) only rank 0 writes."""
    import json

    from lowrank_bench import checkpoint, distributed

    validate.check(cfg)
    started = time.perf_counter()
    origin = results.provenance()
    dp = distributed.current()
    if dp.is_main:
        results.preflight(Path(cfg.results_csv), run_dir)
    resume = checkpoint.find_on_main(cfg, run_dir, dp)
    launched_in = run_dir
    if resume:
        started -= resume.meta["wall_s"]
        run_dir = resume.run_dir
    s = prepare(cfg)
    stages = plan_stages(cfg, s)
    store = None
    if cfg.trainer.get("checkpoint_every") is not None:
        store = checkpoint.Store(run_dir, checkpoint.identity(cfg), cfg.trainer.get("keep_checkpoint", False))
    trainer = Trainer(cfg.trainer, s.model, s.method, run_dir, cfg.seed,
                      activate_head=s.bank.use if s.bank else None, store=store)
    if hasattr(s.task, "output_dir"):  # a task that writes files of its own (E2E's generations) writes them here
        s.task.output_dir = run_dir
    sequence = None
    if isinstance(s.task, ContinualTask):  # reads the perplexity corpus: a missing one fails here, before training
        sequence = ContinualRun(s.task, trainer, s.bank, s.tokenizer, cfg.task.perplexity, stages, run_dir)
        trainer.stage_end_hooks.append(sequence.after_stage)
        trainer.states["continual"] = sequence  # its matrix and perplexities ride in every checkpoint
    if dp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        results.write_status(run_dir, "running")
        if resume and launched_in != run_dir and launched_in.is_dir():
            (launched_in / "resumed.json").write_text(json.dumps({"continued": str(run_dir),
                                                                  "from": str(resume.path)}))
    trainer.log = logger = results.make_logger(cfg, run_dir) if dp.is_main else None
    summary, outcome = None, "failed"
    try:
        if sequence:
            sequence.logger = logger
            if not resume:  # a resumed run has its starting perplexity in the checkpoint
                sequence.before_first_stage()
        try:
            history, diverged = trainer.run(stages, resume), None
        except Diverged as stop:
            history, diverged = trainer.history, stop
            console.print(f"[bold red]{stop}: the run stops; its row says status=diverged")
        if sequence and not diverged and dp.is_main:
            sequence.write_files()
        metric, scores = measures(s, history, sequence, diverged)
        if s.mc and not diverged:
            scores.update({**(s.mc_before or {}), **s.mc.score(s.model, trainer.device, trainer.autocast)})
            if dp.is_main:
                s.mc.write(run_dir)
        if cfg.save_adapter and dp.is_main and not diverged:  # (a diverged run's weights are not worth keeping)
            for param in stages_unique(p for stage in stages for p in stage.params):
                param.requires_grad_(True)  # what every stage trained (earlier tasks' heads too), not the last's only
            if s.bank:  # the head in use is shared under two names: save with the first in use, as prepare() has it
                s.bank.use(s.task.plans[0].name)
            save_adapter(s.model, run_dir / "adapter.safetensors")
        summary = results.summarize(cfg, s.task.name, metric, s.method, trainer, history, s.params,
                                    time.perf_counter() - started, origin,
                                    {**scores, **trainer.extras, **stage_steps(history), **s.load_info,
                                     "run_dir": str(run_dir)})
        if dp.is_main:
            tables = {} if sequence else results.tables_of(history.evals, s.task.metric)
            results.write_run_files(cfg, run_dir, summary, tables)
            csv_path = Path(cfg.results_csv)
            if not (resume and any(r.get("run_dir") == str(run_dir) for r in results.read_rows(csv_path))):
                results.append_row(csv_path, summary)  # (a run killed after its row, then resumed: still one row)
            if store:
                store.finish()
    except checkpoint.Interrupted:
        outcome = "interrupted"  # checkpointed; trainer.resume continues it
        raise
    finally:
        if logger:
            logger.finish(summary)
        if dp.is_main and run_dir.is_dir():
            results.write_status(run_dir, summary["status"] if summary else outcome)
    return summary


def measures(s: Setup, history, sequence: ContinualRun | None, diverged: Diverged | None) -> tuple[str, dict]:
    """(the run's main metric, its row's measures): the best and last evaluation, or a sequence's final accuracies,
    or how far a diverged run got; with the task's own counts."""
    metric = "final_average_accuracy" if sequence else s.task.metric
    if diverged:
        scores = results.best_and_last(history.evals, metric) if history.evals and not sequence else {}
        scores.update(status="diverged", diverged_stage=diverged.stage, diverged_at_step=diverged.step,
                      **{f"last_finite_train_{k}": v for k, v in diverged.last_finite.items()})
    else:
        scores = {"status": "finished",
                  **(sequence.scores() if sequence else results.best_and_last(history.evals, metric))}
    return metric, {**scores, **getattr(s.task, "result_counts", dict)()}


def stage_steps(history) -> dict:
    """Steps per stage, when a run has more than one (BiDoRA's search and retraining)."""
    steps = history.steps_per_stage
    return {f"{name.replace('/', '_')}_steps": n for name, n in steps.items()} if len(steps) > 1 else {}


def discard_if_untouched(run_dir: Path) -> None:
    """A run refused before it wrote anything leaves no folder: Hydra made it (its .hydra/ and the job's log)."""
    import shutil

    if run_dir.is_dir() and all(p.name in (".hydra", "train.log") for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def command_line_groups() -> set[str]:
    """The top-level keys this command's overrides touch (`task=...`, `task.max_length=...`: task)."""
    return {o.split("=")[0].lstrip("+~").split(".")[0] for o in HydraConfig.get().overrides.task}


def job(cfg: DictConfig) -> float | None:
    """One Hydra job. Kept undecorated under its own name so that launchers which pickle it (joblib, submitit)
    pickle a reference, not the function's globals. Under torchrun (or several submitit tasks) every process runs
    it: rank 0's run folder is everyone's, and rank 0 alone prints and writes. A signal stops it after a
    checkpoint and is then handed to whoever listened before (submitit requeues the job)."""
    import signal

    from lowrank_bench import checkpoint, distributed

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.mode not in evaluate.MODES:
            raise LrbenchError(f"mode={cfg.mode}: choose one of {', '.join(evaluate.MODES)}")
        dp = distributed.init(cfg.trainer.device)
        if cfg.mode == "eval":
            summary = evaluate.evaluate_run(cfg, run_dir, command_line_groups())
        else:
            summary = run(cfg, distributed.main_folder(run_dir))
    except LrbenchError as err:
        console.print(Text.assemble(("lrbench error: ", "bold red"), str(err)), soft_wrap=True)
        discard_if_untouched(run_dir)
        if sweep.in_sweep():  # the other jobs go on; the sweep's end lists this one and exits 1
            sweep.record_failure(err)
            return None
        sys.exit(2)
    except checkpoint.Interrupted as stop:
        console.print(f"{signal.Signals(stop.signum).name}: stopped after checkpoint {stop.path}; "
                      "`trainer.resume=auto` continues it (a requeued job continues by itself)")
        stop.hand_over()
    except Exception as err:  # a crash: its traceback, and in a sweep the next job
        if not sweep.in_sweep():
            raise
        console.print_exception()
        sweep.record_failure(err)
        return None
    finally:
        distributed.shutdown()
    if dp.is_main:
        results.print_summary(summary)
    return summary.get(f"best_{summary['metric']}", summary.get(summary["metric"]))


main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(job)

if __name__ == "__main__":  # `python -m lowrank_bench.train`: run the importable copy, so that jobs pickle by name
    from lowrank_bench.train import main as packaged_main

    packaged_main()
