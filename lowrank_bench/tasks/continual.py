"""Continual-learning sequences: `task=continual/<name>` trains one task after another on the same adapter.

A sequence YAML names its stages in order (`sequence`) and defines each (`stages.<name>`): the task config it
reuses (`task: glue/mrpc`, any file under conf/task/) plus per-stage overrides. Overrides of the task itself
(`max_train_samples`, `max_eval_samples`, `max_length`, `data_dir`, `source`, ...) go into that task's config;
`epochs` and `max_steps` go to the stage's budget; `lr`, `schedule`, `warmup_steps`, `warmup_ratio`, `weight_decay`
and `schedule_steps` to its optimiser. A stage's task that cannot be built says which stage it is. Two stage keys
choose how CURLoRA's notebooks differ (arXiv 2408.14572, `code/*.ipynb`):
- `train_rows`: `seeded` (default: the fixed random subset of `max_train_samples` rows, reshuffled every pass) or
  `first` (the first `max_train_samples` rows, every pass in file order: the notebooks'
  `train_dataset[i:i+bs] for i in range(0, 1000, bs)`);
- `pooling`: `last_token` (default: the last real token, heads.py) or `last_position` (the notebooks'
  `logits[:, -1, :]`: right-padded rows are read at a pad position).

`every_stage.<key>` overrides a key in every stage (from the command line: `task.every_stage.max_train_samples=200`;
one stage: `+task.stages.mrpc.max_eval_samples=100`). `protocol` picks a named set of extra overrides from
`protocols.<name>` (`'*'` applies to every stage), e.g. the CURLoRA notebooks' never-ending warmup
(`task=continual/curlora task.protocol=notebook`). Precedence: the stage's definition, then the protocol's
overrides, then `every_stage`. Perplexity of the language model is measured before the first stage and after each
one (`perplexity.*`, see continual.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lowrank_bench import perplexity
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.heads import POOLINGS
from lowrank_bench.tasks.base import Task, data_dir

TASK_CONF = Path(__file__).resolve().parents[2] / "conf" / "task"
BUDGET_KEYS = ("epochs", "max_steps")
OPTIMIZER_KEYS = ("lr", "schedule", "warmup_steps", "warmup_ratio", "weight_decay", "schedule_steps")
TRAIN_ROWS = ("seeded", "first")


def available_tasks() -> list[str]:
    return sorted(p.relative_to(TASK_CONF).with_suffix("").as_posix() for p in TASK_CONF.rglob("*.yaml")
                  if p.parent.name != "continual")


@dataclass
class StagePlan:
    """One stage of a sequence: its task (built, not yet tokenised) and what it overrides."""

    name: str
    task: Task
    budget: dict
    optimizer: dict
    pooling: str = "last_token"


class ContinualTask:
    """A sequence of tasks; `build` makes each stage's task through the task registry."""

    family = "continual"

    def __init__(self, cfg: DictConfig, build):
        self.cfg = cfg
        self.name = cfg.name
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
        protocol = cfg.get("protocol") or "paper"
        protocols = cfg.get("protocols") or {"paper": {}}
        if protocol not in protocols:
            raise LrbenchError(f"task.protocol={protocol!r}; valid: {choices(protocols)}")
        extra = protocols[protocol] or {}
        every = {k: v for k, v in (cfg.get("every_stage") or {}).items() if v is not None}
        plain = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else (c or {})  # noqa: E731
        self.plans = [self.plan(name, OmegaConf.merge(plain(defined[name]), plain(extra.get("*")),
                                                      plain(extra.get(name)), every), build) for name in sequence]
        not_classification = [p.name for p in self.plans if p.task.head.kind != "sequence_classification"]
        if not_classification:
            raise LrbenchError(f"{cfg.name}: stage(s) {not_classification} are not classification tasks; a "
                               "continual sequence holds classification tasks (one head each)")

    def plan(self, name: str, settings: DictConfig, build) -> StagePlan:
        task_name = settings.get("task")
        if task_name not in available_tasks():
            raise LrbenchError(f"stage '{name}' of {self.name}: unknown task {task_name!r}; "
                               f"valid: {choices(available_tasks())}")
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
        task_cfg = OmegaConf.merge(OmegaConf.load(TASK_CONF / f"{task_name}.yaml"), overrides)
        try:
            task = build(task_cfg)
        except LrbenchError as err:  # say which stage, and where its settings go (task.source=hub means the stage's)
            raise LrbenchError(f"stage '{name}' of {self.name} (its settings: task.stages.{name}.<key>, or "
                               f"task.every_stage.<key>): {err}") from None
        if train_rows == "first":
            keep_first_rows(task)
        return StagePlan(name, task, budget, optimizer, pooling)

    @property
    def tasks(self) -> list[Task]:
        return [p.task for p in self.plans]

    @property
    def poolings(self) -> dict[str, str]:
        return {p.name: p.pooling for p in self.plans}

    def perplexity_corpus(self) -> perplexity.Corpus | None:
        """The perplexity text: `perplexity.corpus` (a file or a named corpus, from `perplexity.source`), else
        WikiText-2 valid under $LRBENCH_DATA_DIR (perplexity.resolve_corpus)."""
        pc = self.cfg.perplexity
        if pc.mode == "none":
            return None
        return perplexity.resolve_corpus(pc.get("corpus") or None, pc.get("source") or "auto", data_dir())


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
