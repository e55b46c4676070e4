"""A continual run: after each task of the sequence, every task seen so far is evaluated again with its own head,
and the language model's perplexity is measured before the first task and after each one.

What it keeps (measures in forgetting.py):
- the accuracy matrix R[i][j] (task j after training task i), average accuracy, backward transfer and forgetting;
- each evaluation's metrics, confusion matrix and whether the classifier predicted a single class (`degenerate`),
  one line per (stage, task) in metrics.jsonl;
- the perplexity curve.
Files in the run folder: `accuracy_matrix.csv` and `forgetting.png` (accuracy of each task across the stages,
perplexity on a second axis). The run's result row is one summary row: final average accuracy, backward transfer,
average forgetting, perplexity before and after (with the corpus it scored, `ppl_corpus`, its text protocol,
`ppl_protocol`, and the tokens scored, `ppl_tokens`), each task's final accuracy, and the matrix file it comes from.
"""
from __future__ import annotations

import math
from pathlib import Path

from lowrank_bench import forgetting, perplexity
from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError
from lowrank_bench.heads import DecoderClassifier, HeadBank

MATRIX_METRIC = "accuracy"


class ContinualRun:
    def __init__(self, sequence, trainer, bank: HeadBank, tokenizer, settings, stages: list, run_dir: Path,
                 logger=None):
        self.sequence, self.trainer, self.bank, self.tokenizer = sequence, trainer, bank, tokenizer
        self.settings, self.stages, self.run_dir, self.logger = settings, stages, run_dir, logger
        self.names = [plan.name for plan in sequence.plans]
        self.matrix = forgetting.AccuracyMatrix(self.names)
        self.perplexities: list[float | None] = []
        self.final: dict[str, dict] = {}
        self.corpus = sequence.perplexity_corpus()
        self.corpus_ids = self.read_corpus(self.corpus)
        self.scored_tokens: int | None = None

    def read_corpus(self, corpus: perplexity.Corpus | None):
        """The corpus as token ids, tokenised once for every measurement of the run."""
        if corpus is None:
            return None
        if not isinstance(self.bank.model, DecoderClassifier):
            console.print(f"[yellow]perplexity skipped: {self.bank.model.config.model_type} is not a causal LM")
            return None
        if self.settings.mode not in perplexity.MODES:
            raise LrbenchError(f"task.perplexity.mode={self.settings.mode!r}; valid: none, "
                               f"{', '.join(perplexity.MODES)}")
        text = corpus.text()
        return perplexity.corpus_ids(self.tokenizer, text, perplexity.MODES[self.settings.mode])

    # -- measurements -------------------------------------------------------------------------------------------
    def measure_perplexity(self, when: str) -> None:
        if self.corpus_ids is None:
            self.perplexities.append(None)
            return
        pc = self.settings
        result = perplexity.score(self.bank.model.lm, self.corpus_ids, pc.mode, pc.get("context"), pc.get("stride"),
                                  pc.get("max_tokens") or 10000, self.trainer.device, self.trainer.autocast,
                                  pc.get("corpus_tokens"))
        self.perplexities.append(result["perplexity"])
        self.scored_tokens = result["tokens"]
        self.trainer.write_record({"perplexity_after": when, **result})
        console.print(f"perplexity ({pc.mode}) {when}: {result['perplexity']:.3f} over {result['tokens']} tokens")

    def before_first_stage(self) -> None:
        self.measure_perplexity("start")

    def after_stage(self, index: int, stage, record: dict) -> None:
        """The stage-end hook: at the end of each task (its last stage), re-evaluate every task seen so far."""
        current = self.names.index(stage.head)
        if not self.is_last_stage_of_task(index, stage):
            return
        for j, plan in enumerate(self.sequence.plans[: current + 1]):
            if j == current:
                metrics = {k: v for k, v in record.items() if not k.startswith("train_")
                           and k not in ("step", "epoch", "stage")}
            else:
                self.bank.use(plan.name)
                metrics = self.trainer.evaluate_task(plan.task)
            self.matrix.record(current, plan.name, metrics[MATRIX_METRIC])
            self.final[plan.name] = metrics
            self.trainer.write_record({"after_stage": stage.head, "stage_index": current, "task": plan.name,
                                       **metrics})
        self.bank.use(stage.head)
        row = " ".join(f"{n}={v:.4f}" for n, v in zip(self.names, self.matrix.rows[current]) if v is not None)
        console.print(f"after {stage.head}: {row}")
        self.measure_perplexity(f"after {stage.head}")

    def is_last_stage_of_task(self, index: int, stage) -> bool:
        return index == len(self.stages) - 1 or self.stages[index + 1].head != stage.head

    # -- checkpoints (the trainer saves this with every checkpoint and puts it back on resume) --------------------
    def state_dict(self) -> dict:
        return {"rows": self.matrix.rows, "perplexities": self.perplexities, "final": self.final,
                "scored_tokens": self.scored_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.matrix.rows = [list(row) for row in state["rows"]]
        self.perplexities = list(state["perplexities"])
        self.final = dict(state["final"])
        self.scored_tokens = state.get("scored_tokens")  # absent from checkpoints written before it was kept

    # -- outputs ------------------------------------------------------------------------------------------------
    def write_files(self) -> None:
        self.matrix.to_csv(self.run_dir / "accuracy_matrix.csv")
        forgetting.plot_forgetting(self.run_dir / "forgetting.png", self.names, self.matrix.rows,
                                   self.perplexities if any(p is not None for p in self.perplexities) else None,
                                   title=self.sequence.name)
        if self.logger:
            self.logger.log_matrix(self.names, self.matrix.rows, self.run_dir / "forgetting.png")

    def scores(self) -> dict:
        """The result row's measures."""
        summary = self.matrix.summary()
        out = {"final_average_accuracy": summary["average_accuracy"],
               "backward_transfer": summary["backward_transfer"],
               "average_forgetting": summary["average_forgetting"],
               "ppl_before": self.perplexities[0] if self.perplexities else None,
               "ppl_after": self.perplexities[-1] if self.perplexities else None,
               "ppl_mode": self.settings.mode,
               "ppl_corpus": self.corpus.label if self.corpus_ids is not None else None,
               "ppl_protocol": perplexity.MODES.get(self.settings.mode) if self.corpus_ids is not None else None,
               "ppl_tokens": self.scored_tokens}
        for name in self.names:
            out[f"final_accuracy_{name}"] = self.matrix.rows[-1][self.names.index(name)]
        for name, value in summary["forgetting"].items():
            out[f"forgetting_{name}"] = value
        degenerate = [n for n, m in self.final.items() if m.get("degenerate")]
        out["degenerate"] = bool(degenerate)
        out["degenerate_tasks"] = " ".join(degenerate)
        out["matrix_csv"] = str(self.run_dir / "accuracy_matrix.csv")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
