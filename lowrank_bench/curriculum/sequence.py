"""Continual-learning sequences: `task=continual/<name>` trains one task after another on the same adapter, each task
with a head of its own; after each task every task seen so far is evaluated again with its own head, and the
language model's perplexity is measured before the first task and after each one.

A sequence YAML names its stages in order (`sequence`) and defines each (`stages.<name>`): the task config it
reuses (`task: glue/mrpc`, any file under lowrank_bench/conf/task/, composed by Hydra as `task=glue/mrpc` would be) plus
per-stage overrides. Overrides of the task itself (`max_train_samples`, `max_eval_samples`, `max_length`,
`data_dir`, `source`, ...) go into that task's config; `epochs` and `max_steps` go to the stage's budget; `lr`,
`schedule`, `warmup_steps`, `warmup_ratio`, `weight_decay` and `schedule_steps` to its optimiser. Every stage's
settings are checked as the same keys of a single run are (validate.py); a stage's task that cannot be built, or a
setting out of range, says which stage it is. Two stage keys choose how CURLoRA's notebooks differ (arXiv
2408.14572, `code/*.ipynb`):
- `train_rows`: `seeded` (default: the fixed random subset of `max_train_samples` rows, reshuffled every pass) or
  `first` (the first `max_train_samples` rows, every pass in file order: the notebooks'
  `train_dataset[i:i+bs] for i in range(0, 1000, bs)`);
- `pooling`: `last_token` (default: the last real token, heads.py) or `last_position` (the notebooks'
  `logits[:, -1, :]`: right-padded rows are read at a pad position).

`every_stage.<key>` overrides a key in every stage (from the command line: `task.every_stage.max_train_samples=200`;
one stage: `+task.stages.mrpc.max_eval_samples=100`). `protocol` picks a named set of extra overrides from
`protocols.<name>` (`'*'` applies to every stage), e.g. the CURLoRA notebooks' never-ending warmup
(`task=continual/curlora task.protocol=notebook`). Precedence: the stage's definition, then the protocol's
overrides, then `every_stage`.

The setting is task-incremental (van de Ven & Tolias 2019), `continual_setting: task_incremental` in every row: a
head per task, and the task's identity given at test time (each task is scored through its own head), so a task
is never confused with another's classes; what can be forgotten is in the shared adapter (or backbone, for `ft`).

`standalone_accuracy` (task key, default null) gives the stand-alone accuracy of some stages: the task trained alone
from the same base on the same budget (`task.standalone_accuracy={sst2: 0.91, cola: 0.78}`, stage names as in
`stages`, accuracies in [0, 1]; checked before training). It is the reference of the forward transfer
(forgetting.forward_transfer: the mean over the tasks after the first of R[j][j] minus the stand-alone accuracy).

What a run keeps (measures in forgetting.py): the accuracy matrix R[i][j] (task j after training task i), average
accuracy, backward transfer, forgetting and forward transfer; each evaluation's metrics, confusion matrix and
whether the classifier predicted a single class (`degenerate`), one line per (stage, task) in metrics.jsonl, and in
the checkpoint the `degenerate` flag per (stage, task) and each task's majority-class share (from its confusion
matrix); the perplexity curve (`perplexity.*`). Files in the run folder: `accuracy_matrix.csv` and `forgetting.png`
(titled with the task, method, model and seed: the accuracy of each task across the stages on [0, 1], its
majority-class level dotted, degenerate points ringed in red; the perplexity's relative change in a panel below).
The run's result row is one summary row: final average accuracy, backward transfer, average forgetting, forward
transfer (None without a stand-alone accuracy after the first task) and the stand-alone accuracies it used
(`standalone_<task>`), perplexity before and after (with the corpus it scored, `ppl_corpus`, its text protocol,
`ppl_protocol`, and the tokens scored, `ppl_tokens`), each task's final accuracy, the matrix file it comes from,
and `continual_setting`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lowrank_bench import configs, forgetting, perplexity, results, tasks, validate
from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.heads import POOLINGS, DecoderClassifier, HeadBank
from lowrank_bench.stages import overridden, stages_for
from lowrank_bench.tasks.base import Task, data_dir

BUDGET_KEYS = ("epochs", "max_steps")
OPTIMIZER_KEYS = ("lr", "schedule", "warmup_steps", "warmup_ratio", "weight_decay", "schedule_steps")
TRAIN_ROWS = ("seeded", "first")
MATRIX_METRIC = "accuracy"
#: a head per task, the task's identity given at test time (module docstring)
SETTING = "task_incremental"


@dataclass
class StagePlan:
    """One stage of a sequence: its task (built, not yet tokenised) and what it overrides."""

    name: str
    task: Task
    budget: dict
    optimizer: dict
    pooling: str = "last_token"


class Sequence:
    """A sequence of classification tasks on one adapter, one head per task (heads.HeadBank)."""

    metric = "final_average_accuracy"
    one_head = False
    activate_head = None  # the head bank's `use`, once the heads exist

    def __init__(self, cfg: DictConfig):
        self.cfg, self.seed = cfg.task, cfg.seed
        self.name = self.cfg.name
        self.title = (f"{self.name} · {OmegaConf.select(cfg, 'method.name', default='?')} · "
                      f"{OmegaConf.select(cfg, 'model.name', default='?')} · seed {self.seed}")
        self.plans = self.read_plans(self.cfg)
        self.tasks = [p.task for p in self.plans]
        self.head = self.tasks[0].head  # classification heads only (read_plans): known before preparation
        self.names = [plan.name for plan in self.plans]
        self.bank: HeadBank | None = None
        self.task_heads: dict[str, list[torch.nn.Parameter]] = {}
        self.stages: list = []
        self.standalone = read_standalone(self.cfg, self.names)
        self.matrix = forgetting.AccuracyMatrix(self.names)
        self.degenerate: list[list[bool | None]] = [[None] * len(self.names) for _ in self.names]
        self.majority: dict[str, float | None] = {}
        self.perplexities: list[float | None] = []
        self.final: dict[str, dict] = {}
        self.corpus, self.corpus_ids = None, None
        self.scored_tokens: int | None = None

    # -- the plan -------------------------------------------------------------------------------------------------
    def read_plans(self, cfg: DictConfig) -> list[StagePlan]:
        sequence = list(cfg.get("sequence") or [])
        if not sequence:
            raise LrbenchError(f"task {cfg.name}: empty sequence; give task.sequence=[stage, ...] "
                               f"from the defined stages: {choices(cfg.get('stages') or {})}")
        defined = cfg.get("stages") or {}
        unknown = [s for s in sequence if s not in defined]
        if unknown:
            raise LrbenchError(f"task.sequence names unknown stage(s) {unknown}; defined stages: {choices(defined)}")
        if len(set(sequence)) != len(sequence):
            raise LrbenchError(f"task.sequence={sequence} repeats a stage; each stage keeps its own head")
        protocol, protocols = cfg.protocol, cfg.protocols
        if protocol not in protocols:
            raise LrbenchError(f"task.protocol={protocol!r}; valid: {choices(protocols)}")
        extra = protocols[protocol] or {}
        every = {k: v for k, v in (cfg.get("every_stage") or {}).items() if v is not None}
        plain = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else (c or {})  # noqa: E731
        plans = [self.plan_stage(name, OmegaConf.merge(plain(defined[name]), plain(extra.get("*")),
                                                       plain(extra.get(name)), every)) for name in sequence]
        not_classification = [p.name for p in plans if p.task.head.kind != "sequence_classification"]
        if not_classification:
            raise LrbenchError(f"{cfg.name}: stage(s) {not_classification} are not classification tasks; a "
                               "continual sequence holds classification tasks (one head each)")
        return plans

    def plan_stage(self, name: str, settings: DictConfig) -> StagePlan:
        task_name = settings.get("task")
        if task_name not in configs.available_tasks():
            raise LrbenchError(f"stage '{name}' of {self.name}: unknown task {task_name!r}; "
                               f"valid: {choices(configs.available_tasks())}")
        overrides = OmegaConf.to_container(settings, resolve=True)
        overrides.pop("task")
        budget = {k: overrides.pop(k) for k in BUDGET_KEYS if k in overrides}
        optimizer = {k: overrides.pop(k) for k in OPTIMIZER_KEYS if k in overrides}
        train_rows = overrides.pop("train_rows", None) or "seeded"
        pooling = overrides.pop("pooling", None) or "last_token"
        if train_rows not in TRAIN_ROWS:
            raise LrbenchError(f"task.stages.{name}.train_rows={train_rows!r}; valid: {choices(TRAIN_ROWS)}")
        if pooling not in POOLINGS:
            raise LrbenchError(f"task.stages.{name}.pooling={pooling!r}; valid: {choices(POOLINGS)}")
        task_cfg = OmegaConf.merge(configs.task_config(task_name), overrides)
        settings = OmegaConf.create({"task": task_cfg, "trainer": budget, "optimizer": optimizer})
        try:
            validate.check_values(settings, named=lambda key: key.rsplit(".", 1)[-1])
            task = tasks.build(task_cfg)
        except LrbenchError as err:  # say which stage, and where its settings go (task.source=hub means the stage's)
            raise LrbenchError(f"stage '{name}' of {self.name} (its settings: task.stages.{name}.<key>, or "
                               f"task.every_stage.<key>): {err}") from None
        if train_rows == "first":
            keep_first_rows(task)
        return StagePlan(name, task, budget, optimizer, pooling)

    def attach_heads(self, model, head_modules, groups):
        """One head per task, seeded apart (CURLoRA's: 1311); the template head's parameters leave the groups."""
        self.bank = HeadBank(model, head_modules[0], self.cfg.head_protocol, {p.name: p.pooling for p in self.plans})
        for index, plan in enumerate(self.plans):
            torch.manual_seed(self.seed + index)
            self.task_heads[plan.name] = self.bank.add(plan.name, plan.task.head.num_labels)
        self.bank.use(self.plans[0].name)
        self.activate_head = self.bank.use
        groups = {role: params for role, params in groups.items() if role != "head"}
        return groups, [p for params in self.task_heads.values() for p in params]

    def plan(self, cfg, method, groups):
        """One (or two: BiDoRA's search and retraining) stages per task, each with its head and budget."""
        self.stages = []
        for plan in self.plans:
            budget = {"epochs": cfg.trainer.epochs, "max_steps": cfg.trainer.max_steps, **plan.budget}
            self.stages += stages_for(plan.task, method, {**groups, "head": self.task_heads[plan.name]}, cfg.method,
                                      overridden(cfg.optimizer, **plan.optimizer), budget["epochs"],
                                      budget["max_steps"], cfg.seed, name=plan.name, head=plan.name,
                                      trainer=cfg.trainer)
        return self.stages

    # -- the run ------------------------------------------------------------------------------------------------
    def attach(self, trainer, run_dir: Path, tokenizer) -> None:
        """Re-evaluation at each task's end, its matrix and perplexities in every checkpoint. Reads the perplexity
        corpus: a missing one fails here, before training."""
        self.trainer, self.run_dir = trainer, run_dir
        self.corpus = self.perplexity_corpus()
        self.corpus_ids = self.read_corpus(self.corpus, tokenizer)
        trainer.stage_end_hooks.append(self.after_stage)
        trainer.states["continual"] = self

    def perplexity_corpus(self) -> perplexity.Corpus | None:
        """The perplexity text: `perplexity.corpus` (a file or a named corpus, from `perplexity.source`), else
        WikiText-2 valid under $LRBENCH_DATA_DIR (perplexity.resolve_corpus)."""
        pc = self.cfg.perplexity
        if pc.mode == "none":
            return None
        return perplexity.resolve_corpus(pc.corpus or None, pc.source, data_dir())

    def read_corpus(self, corpus: perplexity.Corpus | None, tokenizer):
        """The corpus as token ids, tokenised once for every measurement of the run."""
        if corpus is None:
            return None
        if not isinstance(self.bank.model, DecoderClassifier):
            console.print(f"[yellow]perplexity skipped: {self.bank.model.config.model_type} is not a causal LM")
            return None
        if self.cfg.perplexity.mode not in perplexity.MODES:
            raise LrbenchError(f"task.perplexity.mode={self.cfg.perplexity.mode!r}; valid: none, "
                               f"{', '.join(perplexity.MODES)}")
        text = corpus.text()
        return perplexity.corpus_ids(tokenizer, text, perplexity.MODES[self.cfg.perplexity.mode])

    def measure_perplexity(self, when: str) -> None:
        if self.corpus_ids is None:
            self.perplexities.append(None)
            return
        pc = self.cfg.perplexity
        result = perplexity.score(self.bank.model.lm, self.corpus_ids, pc.mode, pc.get("context"), pc.get("stride"),
                                  pc.max_tokens, self.trainer.device, self.trainer.autocast,
                                  pc.get("corpus_tokens"))
        self.perplexities.append(result["perplexity"])
        self.scored_tokens = result["tokens"]
        self.trainer.write_record({"perplexity_after": when, **result})
        console.print(f"perplexity ({pc.mode}) {when}: {result['perplexity']:.3f} over {result['tokens']} tokens")

    def before_training(self) -> None:
        self.measure_perplexity("start")

    def after_stage(self, index: int, stage, record: dict) -> None:
        """The stage-end hook: at the end of each task (its last stage), re-evaluate every task seen so far."""
        current = self.names.index(stage.head)
        if not self.is_last_stage_of_task(index, stage):
            return
        for j, plan in enumerate(self.plans[: current + 1]):
            if j == current:
                metrics = {k: v for k, v in record.items() if not k.startswith("train_")
                           and k not in ("step", "epoch", "stage")}
            else:
                self.bank.use(plan.name)
                metrics = self.trainer.evaluate_task(plan.task)
            self.matrix.record(current, plan.name, metrics[MATRIX_METRIC])
            self.keep_diagnostics(current, j, plan.name, metrics)
            self.final[plan.name] = metrics
            self.trainer.write_record({"after_stage": stage.head, "stage_index": current, "task": plan.name,
                                       **metrics})
        self.bank.use(stage.head)
        row = " ".join(f"{n}={v:.4f}" for n, v in zip(self.names, self.matrix.rows[current]) if v is not None)
        console.print(f"after {stage.head}: {row}")
        self.measure_perplexity(f"after {stage.head}")

    def keep_diagnostics(self, stage: int, j: int, name: str, metrics: dict) -> None:
        """For the figure: whether task j's classifier predicted one class after `stage`, and the task's
        majority-class share (forgetting.majority_share of its confusion matrix; the same evaluation rows after
        every stage)."""
        if "degenerate" in metrics:
            self.degenerate[stage][j] = bool(metrics["degenerate"])
        if metrics.get("confusion") is not None:
            self.majority[name] = forgetting.majority_share(metrics["confusion"])

    def is_last_stage_of_task(self, index: int, stage) -> bool:
        return index == len(self.stages) - 1 or self.stages[index + 1].head != stage.head

    # -- checkpoints (the trainer saves this with every checkpoint and puts it back on resume) --------------------
    def state_dict(self) -> dict:
        return {"rows": self.matrix.rows, "perplexities": self.perplexities, "final": self.final,
                "scored_tokens": self.scored_tokens, "degenerate": self.degenerate, "majority": self.majority}

    def load_state_dict(self, state: dict) -> None:
        self.matrix.rows = [list(row) for row in state["rows"]]
        self.perplexities = list(state["perplexities"])
        self.final = dict(state["final"])
        self.scored_tokens = state.get("scored_tokens")  # absent from checkpoints written before it was kept
        # absent from checkpoints written before the figure showed them: unknown, as if never recorded
        self.degenerate = [list(row) for row in state.get("degenerate") or [[None] * len(self.names)
                                                                          for _ in self.names]]
        self.majority = dict(state.get("majority") or {})

    # -- outputs ------------------------------------------------------------------------------------------------
    def write_files(self, run_dir: Path, logger) -> None:
        self.matrix.to_csv(run_dir / "accuracy_matrix.csv")
        forgetting.plot_forgetting(run_dir / "forgetting.png", self.names, self.matrix.rows,
                                   self.perplexities if any(p is not None for p in self.perplexities) else None,
                                   title=self.title, majority=[self.majority.get(n) for n in self.names],
                                   degenerate=self.degenerate)
        if logger:
            logger.log_matrix(self.names, self.matrix.rows, run_dir / "forgetting.png")

    def measures(self, history) -> dict:
        """The result row's measures."""
        summary = self.matrix.summary(self.standalone)
        out = {"continual_setting": SETTING,
               "final_average_accuracy": summary["average_accuracy"],
               "backward_transfer": summary["backward_transfer"],
               "average_forgetting": summary["average_forgetting"],
               "forward_transfer": summary["forward_transfer"],
               "ppl_before": self.perplexities[0] if self.perplexities else None,
               "ppl_after": self.perplexities[-1] if self.perplexities else None,
               "ppl_mode": self.cfg.perplexity.mode,
               "ppl_corpus": self.corpus.label if self.corpus_ids is not None else None,
               "ppl_protocol": perplexity.MODES.get(self.cfg.perplexity.mode) if self.corpus_ids is not None else None,
               "ppl_tokens": self.scored_tokens}
        for name in self.names:
            out[f"final_accuracy_{name}"] = self.matrix.rows[-1][self.names.index(name)]
        for name, value in summary["forgetting"].items():
            out[f"forgetting_{name}"] = value
        for name in self.names:
            if name in self.standalone:
                out[f"standalone_{name}"] = self.standalone[name]
        degenerate = [n for n, m in self.final.items() if m.get("degenerate")]
        out["degenerate"] = bool(degenerate)
        out["degenerate_tasks"] = " ".join(degenerate)
        out["matrix_csv"] = str(self.run_dir / "accuracy_matrix.csv")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    def partial_measures(self, history) -> dict:
        return {}  # a diverged sequence has no matrix worth a row

    def tables(self, history) -> dict:
        return {}

    def before_save(self) -> None:
        """The head in use is shared under two names: saved with the first task's in use, as it was built."""
        self.bank.use(self.plans[0].name)

    def score(self, model, **kwargs) -> tuple[str, dict]:
        """`mode=eval`: each task with its own head, and their mean."""
        out, finals = {}, []
        for plan in self.plans:
            self.bank.use(plan.name)
            measured = plan.task.evaluate_all(model, **kwargs)
            finals.append(measured[MATRIX_METRIC])
            out.update({f"{plan.name}_{k}": v for k, v in measured.items() if results.is_metric(k, v)})
        return "average_accuracy", {"average_accuracy": sum(finals) / len(finals), **out}


def read_standalone(cfg: DictConfig, names: list[str]) -> dict[str, float]:
    """`task.standalone_accuracy` (stage -> accuracy in [0, 1], or null) for the stages of the sequence (`names`):
    a stage defined in `stages` but left out of the sequence is accepted and unused; a null value is no reference.
    Read with .get: a sequence YAML without the key has no reference."""
    given = cfg.get("standalone_accuracy")
    if given is None:
        return {}
    if not isinstance(given, (DictConfig, dict)):
        raise LrbenchError(f"task.standalone_accuracy={given!r}; give a mapping stage -> accuracy in [0, 1] "
                           f"(stages: {choices(names)}) or null")
    given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given)
    defined = list(cfg.get("stages") or names)
    unknown = [str(k) for k in given if k not in defined]
    if unknown:
        raise LrbenchError(f"task.standalone_accuracy names unknown stage(s) {unknown}; valid: {choices(defined)}")
    for name, value in given.items():
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 <= value <= 1):
            raise LrbenchError(f"task.standalone_accuracy.{name}={value!r}; give an accuracy in [0, 1] (or null)")
    return {name: float(value) for name, value in given.items() if value is not None and name in names}


def keep_first_rows(task: Task) -> None:
    """`train_rows: first`: the task keeps the first `max_train_samples` training rows in file order instead of its
    seeded subset, and trains on them in that order every pass; the task's own subsample still sees the whole split
    (its checks, and its evaluation rows)."""
    subsample = task.subsample
    task.shuffle_train = False

    def first(examples: list[dict], split: str) -> list[dict]:
        kept = subsample(examples, split)
        if split != task.train_split:
            return kept
        limit = task.cfg.get("max_train_samples")
        return examples[:limit] if limit else examples

    task.subsample = first
