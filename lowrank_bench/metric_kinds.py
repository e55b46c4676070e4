"""What kind of number each metric is, in one place: a `fraction` (accuracy, F1, a correlation, BLEU as this code
computes it: shown x100 as a percent) or `raw` (a perplexity, a loss, NIST, CIDEr, a count: shown as it is).
Tables and any other display scale by this registry, never by guessing from a column's name.

Where each comes from (what the code emits, checked against the emitting function):
- GLUE (tasks/glue.py via metrics.py): accuracy, f1, matthews_correlation, pearson, spearmanr in [0, 1] / [-1, 1];
  MNLI's matched_mismatched_accuracy (pooled correct / pooled n).
- NER (tasks/ner.py, seqeval): f1, precision, recall, accuracy, fractions.
- E2E (e2e_metrics.py, the official scorer's values): BLEU as a fraction (mteval's 0-1, not sacrebleu's 0-100),
  METEOR and ROUGE_L fractions; NIST (an information-weighted n-gram sum, about 1-10) and CIDEr (CIDEr-D, 10 x a
  cosine, about 0-10) raw.
- instruction tuning (tasks/sft.py): eval_loss (nats) and perplexity = exp(eval_loss) raw, token_accuracy fraction.
- multiple choice after training (mc_eval.py): mc_accuracy, mc_macro_accuracy fractions; mc_items a count.
- continual sequences (continual.py, forgetting.py; columns of the row itself, not best_/last_): final_average_accuracy,
  backward_transfer, average_forgetting, forward_transfer, final_accuracy_<task> and standalone_<task> (the
  stand-alone reference forward transfer is measured against) fractions; ppl_before, ppl_after raw.

A metric of a task with several evaluation splits carries the split as a prefix (`matched_accuracy`,
`test_BLEU`): its kind is its base name's. A name this registry does not know has no kind (None): shown raw, as
written, never multiplied.
"""
from __future__ import annotations

FRACTION = "fraction"
RAW = "raw"

KINDS: dict[str, str] = {
    # classification (GLUE, sentiment, toy, NER)
    "accuracy": FRACTION, "f1": FRACTION, "precision": FRACTION, "recall": FRACTION,
    "matthews_correlation": FRACTION, "pearson": FRACTION, "spearmanr": FRACTION,
    "matched_mismatched_accuracy": FRACTION,
    # E2E NLG, as the official scorer reports them
    "BLEU": FRACTION, "METEOR": FRACTION, "ROUGE_L": FRACTION, "NIST": RAW, "CIDEr": RAW,
    # language modelling and instruction tuning
    "eval_loss": RAW, "perplexity": RAW, "nll": RAW, "token_accuracy": FRACTION,
    # multiple choice after training
    "mc_accuracy": FRACTION, "mc_macro_accuracy": FRACTION, "mc_items": RAW,
    # continual sequences: the row's own columns
    "final_average_accuracy": FRACTION, "backward_transfer": FRACTION, "average_forgetting": FRACTION,
    "forward_transfer": FRACTION, "ppl_before": RAW, "ppl_after": RAW,
}

#: families of row columns named `<prefix><task>` (a continual run's final accuracy on each of its tasks)
PER_TASK: dict[str, str] = {"final_accuracy_": FRACTION, "standalone_": FRACTION}

#: the measures a row carries under their own names (a continual run has no best_/last_ evaluation columns)
ROW_MEASURES = ("final_average_accuracy", "backward_transfer", "average_forgetting", "forward_transfer", "ppl_before",
                "ppl_after")


def kind(name: str) -> str | None:
    """The kind of a metric or of a row column that holds one (`best_f1`, `last_matched_accuracy`,
    `search_best_accuracy`, `final_accuracy_mrpc`); None when unknown."""
    for prefix in ("best_", "last_"):  # `<stage>_best_<metric>` (search_best_accuracy): the split rule below
        if name.startswith(prefix) and name != prefix:
            name = name[len(prefix):]
            break
    if name in KINDS:
        return KINDS[name]
    for prefix, family in PER_TASK.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return family
    parts = name.split("_")
    for cut in range(1, len(parts)):  # `<split>_<base>`: the longest known base
        base = "_".join(parts[cut:])
        if base in KINDS:
            return KINDS[base]
    return None


def is_measure_column(column: str) -> bool:
    """A row column that holds a measure of the run's model (what a comparison table shows)."""
    if column in ("best_step", "last_step"):
        return False
    if column.startswith("best_"):
        return True
    return column in ROW_MEASURES or any(column.startswith(p) and len(column) > len(p) for p in PER_TASK)
