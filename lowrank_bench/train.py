"""`lrbench`: compose a run with Hydra, train, report.

    lrbench method=bidora task=glue/mrpc model=minilm-l6 seed=0
    lrbench -m method=ft,lora,dora seed=0,1 task=glue/sst2

assembly.prepare (the curriculum's tasks tokenised, the model with its head, the method applied) -> the
curriculum's stages -> Trainer.run(stages) -> the curriculum's measures and the post-training evaluations ->
summary.json in the run directory and one row in results/runs.csv. `mode=eval` is evaluate.py.

What needs torch and transformers is imported where it is used, so that `lrbench --help` and `--cfg` answer
without loading them (`prepare` and `STAGE_KEYS` are still importable from here: `__getattr__`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lowrank_bench import configs
from lowrank_bench.configs import CONF_DIR
from lowrank_bench.console import console, copied_to_run_log, print_refusal, to_run_log
from lowrank_bench.errors import BAD_INPUT, LrbenchError

__all__ = ["CONF_DIR", "main", "run"]  # and `prepare`, `STAGE_KEYS`: __getattr__


def __getattr__(name: str):
    """The names other modules import from here that need torch: loaded when first asked for."""
    if name == "prepare":
        from lowrank_bench.assembly import prepare

        return prepare
    if name == "STAGE_KEYS":
        return stage_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """One run end to end; returns its summary. Raises LrbenchError on bad input before anything is written.
    A run that continues a checkpoint (`trainer.resume`, or its own config's in its own folder: checkpoint.py)
    goes on in that checkpoint's folder. Under data parallel (distributed.py) only rank 0 writes."""
    from lowrank_bench import assembly, checkpoint, distributed, progress, results, validate
    from lowrank_bench.trainer import Diverged, Trainer

    validate.check(cfg)
    progress.configure(cfg.trainer)  # trainer.progress=false: no bar anywhere (evaluations, downloads)
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
    s = assembly.prepare(cfg)
    shape = s.curriculum
    stages = shape.plan(cfg, s.method, s.groups)
    trainer = Trainer(cfg.trainer, s.model, s.method, run_dir, cfg.seed, activate_head=shape.activate_head,
                      store=checkpoint_store(cfg, run_dir))
    shape.attach(trainer, run_dir, s.tokenizer)
    trainer.stage_end_hooks.append(lambda index, stage, record: log_stage(trainer, stages, index, stage))
    if dp.is_main:
        open_run_folder(run_dir, launched_in, resume)
    trainer.log = logger = results.make_logger(cfg, run_dir) if dp.is_main else None
    summary, outcome = None, "failed"
    try:
        if not resume:  # a resumed run has its measurements before training in the checkpoint
            shape.before_training()
        try:
            history, diverged = trainer.run(stages, resume), None
        except Diverged as stop:
            history, diverged = trainer.history, stop
            console.print(f"[bold red]{stop}: the run stops; its row says status=diverged")
        with trainer.after_training():  # a signal here stops at once: the resume redoes only what follows
            summary = finish(cfg, s, shape, trainer, stages, history, diverged, run_dir, logger, dp,
                             time.perf_counter() - started, origin)
            if dp.is_main:
                append_row_once(Path(cfg.results_csv), summary, run_dir, resume)
        if dp.is_main and trainer.store:  # outside: once the checkpoints go, the run is written whole
            trainer.store.finish()
    except checkpoint.Interrupted:
        outcome = "interrupted"  # checkpointed; trainer.resume continues it
        raise
    finally:
        if logger:
            logger.finish(summary)
        if dp.is_main and run_dir.is_dir():
            results.write_status(run_dir, summary["status"] if summary else outcome)
    return summary


def log_stage(trainer, stages: list, index: int, stage) -> None:
    """A stage's end, in train.log (the terminal has its progress bar)."""
    steps = trainer.history.steps_per_stage.get(stage.name, 0)
    to_run_log(f"stage {index + 1}/{len(stages)} {trainer.method.name} · {stage.name}: done, {steps} steps")


def finish(cfg, s, shape, trainer, stages, history, diverged, run_dir: Path, logger, dp, wall_s: float,
           origin) -> dict:
    """What follows training: the post-training evaluations, the run's files and adapter, its summary."""
    from lowrank_bench import results

    scores = measures(shape, history, diverged)
    if not diverged:
        scores.update(s.before)
        for evaluation in s.evaluations:
            scores.update(evaluation.after(s.model, trainer.device, trainer.autocast))
        if dp.is_main:
            shape.write_files(run_dir, logger)
            for evaluation in s.evaluations:
                evaluation.write(run_dir)
            if cfg.save_adapter:  # (a diverged run's weights are not worth keeping)
                save_trained(s.model, shape, stages, run_dir)
    summary = results.summarize(cfg, shape.name, shape.metric, s.method, trainer, history, s.params, wall_s, origin,
                                {**scores, **trainer.extras, **stage_steps(history), **s.load_info,
                                 "run_dir": str(run_dir)})
    if dp.is_main:
        results.write_run_files(cfg, run_dir, summary, shape.tables(history))
    return summary


def checkpoint_store(cfg: DictConfig, run_dir: Path):
    """The run's checkpoint.Store, or None with `trainer.checkpoint_every=null`."""
    from lowrank_bench import checkpoint

    if cfg.trainer.get("checkpoint_every") is None:
        return None
    return checkpoint.Store(run_dir, checkpoint.identity(cfg), cfg.trainer.get("keep_checkpoint", False))


def open_run_folder(run_dir: Path, launched_in: Path, resume) -> None:
    """The run folder, marked running; a resumed run leaves a note in the folder it was launched in."""
    from lowrank_bench import results

    run_dir.mkdir(parents=True, exist_ok=True)
    results.write_status(run_dir, "running")
    if resume and launched_in != run_dir and launched_in.is_dir():
        (launched_in / "resumed.json").write_text(json.dumps({"continued": str(run_dir), "from": str(resume.path)}))


def measures(shape, history, diverged) -> dict:
    """The row's measures: the curriculum's, or, for a diverged run, how far it got."""
    if not diverged:
        return {"status": "finished", **shape.measures(history)}
    return {**shape.partial_measures(history), "status": "diverged", "diverged_stage": diverged.stage,
            "diverged_at_step": diverged.step, **{f"last_finite_train_{k}": v for k, v in diverged.last_finite.items()}}


def save_trained(model, shape, stages: list, run_dir: Path) -> None:
    """adapter.safetensors: what every stage trained (earlier tasks' heads too), not the last stage's only."""
    from lowrank_bench.methods.base import save_adapter
    from lowrank_bench.stages import unique

    for param in unique(p for stage in stages for p in stage.params):
        param.requires_grad_(True)
    shape.before_save()
    save_adapter(model, run_dir / "adapter.safetensors")


def append_row_once(csv_path: Path, summary: dict, run_dir: Path, resume) -> None:
    """(a run killed after its row, then resumed: still one row)"""
    from lowrank_bench import results

    if not (resume and any(r.get("run_dir") == str(run_dir) for r in results.read_rows(csv_path))):
        results.append_row(csv_path, summary)


def stage_steps(history) -> dict:
    """Steps per stage, when a run has more than one (BiDoRA's search and retraining)."""
    steps = history.steps_per_stage
    return {f"{name.replace('/', '_')}_steps": n for name, n in steps.items()} if len(steps) > 1 else {}


def command_line_groups() -> set[str]:
    """The top-level keys this command's overrides touch (`task=...`, `task.max_length=...`: task)."""
    return {o.split("=")[0].lstrip("+~").split(".")[0] for o in HydraConfig.get().overrides.task}


def job(cfg: DictConfig) -> float | None:
    """One Hydra job. Kept undecorated under its own name so that launchers which pickle it (joblib, submitit)
    pickle a reference, not the function's globals. What it prints also goes to the run folder's train.log
    (Hydra's job log), as plain text."""
    with copied_to_run_log():
        return run_job(cfg)


def run_job(cfg: DictConfig) -> float | None:
    """Under torchrun (or several submitit tasks) every process runs it: rank 0's run folder is everyone's, and
    rank 0 alone prints and writes. A signal stops it after a checkpoint and is then handed to whoever listened
    before (submitit requeues the job)."""
    import signal

    from lowrank_bench import checkpoint, distributed, evaluate, results, sweep
    from lowrank_bench.tasks.base import recorded_data_dir

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.mode not in evaluate.MODES:
            raise LrbenchError(f"mode={cfg.mode}: choose one of {', '.join(evaluate.MODES)}")
        dp = distributed.init(cfg.trainer.device)
        if cfg.mode == "eval":
            with recorded_data_dir(evaluated_data_dir(cfg)):
                summary = evaluate.evaluate_run(cfg, run_dir, command_line_groups())
        else:
            summary = run(cfg, distributed.main_folder(run_dir))
    except LrbenchError as err:
        print_refusal(err)
        results.discard_untouched(run_dir, Path(cfg.output_dir))  # the folder Hydra made for this refusal
        if sweep.in_sweep():  # the other jobs go on; the sweep's end lists this one and exits 1
            sweep.record_failure(err)
            return None
        sys.exit(BAD_INPUT)
    except checkpoint.Interrupted as stop:
        where = f"after checkpoint {stop.path}" if stop.path else "(rank 0 holds the checkpoint)"
        console.print(f"{signal.Signals(stop.signum).name}: stopped {where}; "
                      "`trainer.resume=auto` continues it (a requeued job continues by itself)")
        stop.hand_over()
    except KeyboardInterrupt:  # a second Ctrl-C (the first checkpoints and stops), or one outside training
        console.print("interrupted (Ctrl-C): stopped at once, without a checkpoint of this point; the run folder "
                      "says failed")
        sys.exit(130)
    except Exception as err:  # a crash: its traceback, and in a sweep the next job
        if not sweep.in_sweep():
            raise
        console.print_exception()
        sweep.record_failure(err)
        return None
    finally:
        distributed.shutdown()
    if dp.is_main:
        results.print_summary(summary, Path(cfg.results_csv))
    return summary.get(f"best_{summary['metric']}", summary.get(summary["metric"]))


def evaluated_data_dir(cfg: DictConfig) -> str | None:
    """`mode=eval`: the data folder the scored run read (`data_dir` in its config_resolved.yaml), or None. A
    `run_dir` or `adapter` that holds no readable run config is left to evaluate.py, which names what is wrong."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    named = cfg.get("adapter") or cfg.get("run_dir")
    if not named:
        return None
    folder = Path(str(named)).expanduser()
    saved = (folder.parent if cfg.get("adapter") else folder) / "config_resolved.yaml"
    try:
        recorded = OmegaConf.load(saved)
    except (OSError, UnicodeDecodeError, YAMLError, OmegaConfBaseException, ValueError):
        return None  # missing, a folder, not YAML: evaluate.py's refusal says which
    value = recorded.get("data_dir") if isinstance(recorded, DictConfig) else None
    return str(value) if value else None


def stage_keys() -> tuple[str, ...]:
    """What a sequence's stage may set besides its task's settings (curriculum/sequence.py)."""
    from lowrank_bench.curriculum.sequence import BUDGET_KEYS, OPTIMIZER_KEYS

    return ("task", "train_rows", "pooling", *BUDGET_KEYS, *OPTIMIZER_KEYS)


#: Hydra's flags that show something rather than compose a run (or that change where configs come from): left to it
HYDRA_ONLY = ("help", "hydra_help", "shell_completion", "info", "config_path", "config_name", "config_dir",
              "experimental_rerun")

hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(job)


def command_line(argv: list[str]):
    """Hydra's own reading of the command line (its flags and overrides), or None where Hydra alone should answer
    (--help, --info, tab completion, --version, a malformed flag)."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:
        return None
    parser = get_args_parser()

    def error(message):
        raise ValueError(message)

    parser.error = error
    try:
        args = parser.parse_args(argv)
    except ValueError:
        return None
    return None if any(getattr(args, flag, None) for flag in HYDRA_ONLY) else args


def complete_nested_groups(argv: list[str]) -> bool:
    """Answers the shell's tab-completion query (`lrbench -sc query=bash`, installed by `lrbench -sc install=bash`)
    where the word is a config group's, nested options included, which Hydra's own completion leaves out."""
    if argv[:1] != ["-sc"] or len(argv) != 2 or argv[1] not in ("query=bash", "query=zsh"):
        return False
    line = os.environ.get("COMP_LINE", "")
    word = "" if line.endswith(" ") else (line.split() or [""])[-1]
    options = configs.completions(word)
    if options is None:
        return False
    print(" ".join(options))
    return True


def main():
    """`lrbench`: the overrides are checked first (configs.check_command_line: malformed syntax, an unknown option,
    setting or stage, in a `-m` sweep every value): bad input is one line, exit status 2, before Hydra makes a
    folder or a job runs. Then Hydra composes and runs the job(s); a sweep's job folders are named by what differs
    between them (`name_sweep_folders`)."""
    if complete_nested_groups(sys.argv[1:]):
        return None
    args = command_line(sys.argv[1:])
    if args is not None:
        from lowrank_bench import results, validate

        multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
        try:
            configs.check_command_line(args.overrides, multirun, stage_keys, validate.valid_text)
            results.check_output_root(args.overrides)  # Hydra makes its folder there next: a file is its traceback
        except LrbenchError as err:
            print_refusal(err)
            sys.exit(BAD_INPUT)
        if multirun:
            sys.argv = name_sweep_folders(sys.argv, args.overrides)
    return hydra_main()


def name_sweep_folders(argv: list[str], overrides: list[str]) -> list[str]:
    """`argv` with the override that leaves out of the job folders' names what every job has alike
    (configs.sweep_folder_override), placed after the other overrides (argparse reads them as one run of words)."""
    line = configs.sweep_folder_override(overrides)
    if line is None:
        return argv
    end = len(argv) - argv[::-1].index(overrides[-1]) if overrides else len(argv)
    return [*argv[:end], line, *argv[end:]]


if __name__ == "__main__":  # `python -m lowrank_bench.train`: run the importable copy, so that jobs pickle by name
    from lowrank_bench.train import main as packaged_main

    packaged_main()
