"""`lrbench-mc` (`python -m lowrank_bench.mc_eval eval=mc/<benchmark> model=<name> [eval.adapter=<run folder>]`):
0-shot multiple choice alone, on a base model or on a run's adapter (rebuilt by assembly.rebuild). The scoring is
evaluations/multiple_choice.py, the same a training run does after training. The same Hydra config as `lrbench`
(the `eval` group, model, trainer.device/precision)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from rich.table import Table

from lowrank_bench import assembly, curriculum, models, progress, results
from lowrank_bench.console import console, print_refusal
from lowrank_bench.devices import autocast_for, pick_device
from lowrank_bench.errors import LrbenchError
from lowrank_bench.evaluations.multiple_choice import MultipleChoiceEval


def saved_run(cfg):
    """(the run's config, its adapter) of `eval.adapter=<run folder>`, checked to have trained a causal LM; or
    (None, None) for the base model of `model=...`, which must be a decoder."""
    if not cfg.eval.adapter:
        models.check_fits(cfg.model, models.Head("causal_lm"), f"eval=mc/{cfg.eval.name}")
        return None, None
    setting = f"eval.adapter={cfg.eval.adapter}"
    run_cfg, adapter = assembly.saved_run(Path(str(cfg.eval.adapter)).expanduser(), setting)
    head = assembly.declared_head(curriculum.build(run_cfg))
    if head is not None and head.kind != "causal_lm":
        raise LrbenchError(f"{setting}: that run trained a {head.kind} head (task {run_cfg.task.name}); "
                           f"eval=mc/{cfg.eval.name} scores a causal LM's next-token letters: give a run of "
                           "task=sft/<domain> or task=e2e, or no eval.adapter to score the base model")
    models.check_fits(run_cfg.model, models.Head("causal_lm"), f"eval=mc/{cfg.eval.name}")
    return run_cfg, adapter


def load_for_eval(cfg, run_cfg=None, adapter=None, tokenizer=None):
    """(model, tokenizer, the config it was trained under): the base model of `model=...`, or, with
    `eval.adapter=<run folder>` (`run_cfg` and `adapter`: `saved_run`), that run rebuilt with its adapter loaded."""
    if cfg.eval.adapter:
        if run_cfg is None:
            run_cfg, adapter = saved_run(cfg)
        setup = assembly.rebuild(run_cfg, adapter)
        return setup.model, setup.tokenizer, run_cfg
    tokenizer = tokenizer or models.load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)  # as a run does: a config-built model's weights from the run's seed
    return models.load_model(cfg.model, models.Head("causal_lm"), tokenizer.pad_token_id), tokenizer, cfg


def print_subjects(evaluator: MultipleChoiceEval, when: str = "after") -> None:
    details = evaluator.details[when]
    table = Table(title=f"{evaluator.cfg.name} · {evaluator.cfg.backend} · template {evaluator.template}")
    for column in ("subject", "items", "accuracy"):
        table.add_column(column, justify="left" if column == "subject" else "right")
    for subject, row in details["subjects"].items():
        table.add_row(subject, str(row["items"]), f"{row['accuracy']:.4f}")
    table.add_row("[bold]all (micro)", str(details["mc_items"]), f"[bold]{details['mc_accuracy']:.4f}")
    table.add_row("[bold]mean over subjects", "", f"{details['mc_macro_accuracy']:.4f}")
    console.print(table)


def run_standalone(cfg, run_dir: Path) -> dict:
    """Score `model=...` (or a run's adapter, `eval.adapter`) on `eval=mc/<benchmark>`; writes
    mc_<benchmark>.json and mc_summary.json into `run_dir`. The items are read, and the prompts rendered, before
    the model loads: a bad item or template is refused in seconds."""
    if not cfg.get("eval"):
        raise LrbenchError("no benchmark: add eval=mc/<benchmark> (lowrank_bench/conf/eval/mc/: bbh, fineval, gsm8k, mmlu, "
                           "mmlu_law, mmlu_medicine)")
    progress.configure(cfg.trainer)
    eval_cfg = cfg.eval
    run_cfg, adapter = saved_run(cfg)
    trained = run_cfg if run_cfg is not None else cfg
    tokenizer = models.load_tokenizer(trained.model)
    evaluator = MultipleChoiceEval(eval_cfg, tokenizer, trained.task.get("template"))
    model, tokenizer, run_cfg = load_for_eval(cfg, run_cfg, adapter, tokenizer)
    device = pick_device(cfg.trainer.device)
    precision, autocast = autocast_for(device, cfg.trainer.precision)
    model.to(device)
    scores = evaluator.score(model, device, autocast)
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluator.write(run_dir)
    summary = {"model": run_cfg.model.name, "method": run_cfg.method.name if eval_cfg.adapter else "none",
               "adapter": str(eval_cfg.adapter or ""), "benchmark": eval_cfg.name, "backend": eval_cfg.backend,
               "template": evaluator.template, "precision": precision, **scores}
    (run_dir / "mc_summary.json").write_text(json.dumps(summary, indent=2))
    print_subjects(evaluator)
    return summary


def job(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_standalone(cfg, run_dir)
    except LrbenchError as err:
        print_refusal(err)
        results.discard_untouched(run_dir, Path(cfg.output_dir))  # the folder Hydra made for this refusal
        sys.exit(2)
    return summary["mc_accuracy"]


def main() -> None:
    import hydra

    try:  # Hydra makes its run folder before the job runs: a file or a read-only place there is refused first
        results.check_output_root([a for a in sys.argv[1:] if not a.startswith("-")])
    except LrbenchError as err:
        print_refusal(err)
        sys.exit(2)
    if "--help" in sys.argv:  # lrbench's page is lrbench's (the config is shared): Hydra's plain one here
        sys.argv.append("hydra/help=default")
    hydra.main(version_base="1.3", config_path=assembly.CONF_DIR, config_name="config")(job)()


if __name__ == "__main__":
    main()
