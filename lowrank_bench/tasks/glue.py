"""GLUE (Wang et al., 2019): all nine tasks, from the Hub (`datasets`) or a local `glue_data/` folder.

Local layout (as written by the classic `download_glue_data.py`): `<data_dir>/<Folder>/{train,dev}.tsv`
(MNLI: `dev_matched.tsv`, `dev_mismatched.tsv`). With `task.data_dir` unset we look in `$LRBENCH_DATA_DIR/glue`,
then fall back to the Hub (`nyu-mll/glue`). `task.source`: auto (that order; a set LRBENCH_DATA_DIR without the
task's folder is an error), local (local files only) or hub (the Hub only).

Official metrics: CoLA Matthews correlation; STS-B Pearson and Spearman (regression head); MRPC and QQP F1 and
accuracy; MNLI matched and mismatched accuracy, reported separately; the rest accuracy.

MNLI also reports `matched_mismatched_accuracy`: the accuracy over the two dev sets concatenated,
(correct_m + correct_mm) / (n_m + n_mm), NOT the mean of the two accuracies (9,815 and 9,832 examples: the two
differ slightly). It is what BiDoRA reports for MNLI: its code predicts both sets into one list and scores it once
(t2ance/BiDoRA examples/NLU/examples/text-classification/run_glue_bilevel.py:250-251, 426-461). The main metric
stays `matched_accuracy` (LoRA's and GLUE's); `task.metric=matched_mismatched_accuracy` picks the best evaluation
by it (the BiDoRA MNLI presets do).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_bench import hub, metrics
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.models import Head
from lowrank_bench.tasks.base import ClassificationTask, Example, check_label, hub_only, read_text, shared_data_folder

HUB_DATASET = "nyu-mll/glue"
NLI2 = ("entailment", "not_entailment")
#: class names of the tasks whose TSV labels are ids, as the Hub dataset's ClassLabel names them
CLASS_NAMES = {"cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
               "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
               "wnli": ("not_entailment", "entailment")}


@dataclass(frozen=True)
class Spec:
    folder: str
    hub_text: tuple[str, str | None]
    tsv_text: tuple  # column names, or indices for header-less CoLA
    tsv_label: str | int
    label_names: tuple[str, ...] | None = None  # string labels in the TSV, in the Hub's id order
    num_labels: int = 2
    metric: str = "accuracy"
    splits: dict = field(default_factory=lambda: {"validation": ("dev.tsv", "validation")})

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


GLUE = {
    "cola": Spec("CoLA", ("sentence", None), (3, None), 1, metric="matthews_correlation"),
    "sst2": Spec("SST-2", ("sentence", None), ("sentence", None), "label"),
    "mrpc": Spec("MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality"),
    "qqp": Spec("QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate"),
    "stsb": Spec("STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", num_labels=1,
                 metric="pearson"),
    "mnli": Spec("MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                 ("entailment", "neutral", "contradiction"), 3, "matched_accuracy",
                 {"matched": ("dev_matched.tsv", "validation_matched"),
                  "mismatched": ("dev_mismatched.tsv", "validation_mismatched")}),
    "qnli": Spec("QNLI", ("question", "sentence"), ("question", "sentence"), "label", NLI2),
    "rte": Spec("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", NLI2),
    "wnli": Spec("WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label"),
}


class GlueTask(ClassificationTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.subset not in GLUE:
            raise LrbenchError(f"unknown GLUE task {cfg.subset!r}; valid: {choices(GLUE)}")
        self.spec = GLUE[cfg.subset]
        self.name = f"glue/{cfg.subset}"
        self.head = Head("sequence_classification", self.spec.num_labels, self.spec.regression)
        self.metric = cfg.get("metric") or self.spec.metric
        self.eval_splits = tuple(self.spec.splits)
        self.folder = self.local_folder()

    def label_names(self) -> list[str] | None:
        names = self.spec.label_names or CLASS_NAMES.get(self.cfg.subset)  # STS-B (a score): none
        return list(names) if names else None

    # -- where the data is ------------------------------------------------------------------------------------
    def local_folder(self) -> Path | None:
        """`task.source` (base.shared_data_folder): hub skips this; local requires the folder; auto takes it when
        found, and a set LRBENCH_DATA_DIR must hold it."""
        if hub_only(self.cfg):
            return None
        configured = self.cfg.get("data_dir")
        if configured:
            folder = Path(str(configured)).expanduser() / self.spec.folder
            if not folder.is_dir():
                raise LrbenchError(f"task.data_dir={configured}: no folder {folder} (expected the glue_data/ layout "
                                   f"<data_dir>/{self.spec.folder}/{{train,dev}}.tsv)")
            return folder
        return shared_data_folder(self.cfg, f"glue/{self.spec.folder}", f"{{train,dev}}.tsv of {self.name}")

    def files(self, split: str) -> Path:
        name = "train.tsv" if split == "train" else self.spec.splits[split][0]
        path = self.folder / name
        if not path.is_file():
            raise LrbenchError(f"missing data file {path} for {self.name} (split {split})")
        return path

    def source_id(self) -> str:
        if self.folder is None:
            return HUB_DATASET
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(self.folder.glob("*.tsv"))]
        return repr(stats)

    def raw_split(self, split: str) -> list[Example]:
        return self.read_tsv(self.files(split)) if self.folder else self.read_hub(split)

    # -- readers ----------------------------------------------------------------------------------------------
    def read_tsv(self, path: Path) -> list[Example]:
        spec = self.spec
        rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
        if isinstance(spec.tsv_label, int):  # header-less (CoLA)
            header, body, first = None, rows, 1
            index = {c: c for c in (*spec.tsv_text, spec.tsv_label) if c is not None}
        else:
            header, body, first = rows[0], rows[1:], 2
            missing = [c for c in (*spec.tsv_text, spec.tsv_label) if c is not None and c not in header]
            if missing:
                raise LrbenchError(f"{path}: malformed header, missing column(s) {missing}; found {header}")
            index = {c: header.index(c) for c in (*spec.tsv_text, spec.tsv_label) if c is not None}
        width = max(index.values()) + 1
        examples = []
        for line, row in enumerate(body, start=first):
            if not row:
                continue
            if len(row) < width:
                raise LrbenchError(f"{path}:{line}: malformed row with {len(row)} column(s), expected at least {width}")
            examples.append(self.example(row[index[spec.tsv_text[0]]],
                                         row[index[spec.tsv_text[1]]] if spec.tsv_text[1] is not None else None,
                                         row[index[spec.tsv_label]], f"{path}:{line}"))
        return examples

    def example(self, text: str, pair: str | None, raw_label: str, where: str) -> Example:
        spec = self.spec
        if spec.regression:
            try:
                label = float(raw_label)
            except ValueError:
                raise LrbenchError(f"{where}: malformed score {raw_label!r}; expected a number") from None
        elif spec.label_names:
            label = spec.label_names.index(check_label(raw_label, set(spec.label_names), where))
        else:
            label = int(check_label(raw_label, {str(i) for i in range(spec.num_labels)}, where))
        return {"text": text, "text_pair": pair, "label": label}

    def read_hub(self, split: str) -> list[Example]:
        hub_split = "train" if split == "train" else self.spec.splits[split][1]
        ds = hub.load_dataset(HUB_DATASET, self.cfg.subset, split=hub_split, shown=f"{HUB_DATASET}/{self.cfg.subset}")
        a, b = self.spec.hub_text
        return [{"text": r[a], "text_pair": r[b] if b else None,
                 "label": float(r["label"]) if self.spec.regression else int(r["label"])} for r in ds]

    # -- metrics ----------------------------------------------------------------------------------------------
    def evaluate_all(self, model, **kwargs) -> dict[str, float]:
        out = super().evaluate_all(model, **kwargs)
        if self.cfg.subset == "mnli":
            out["matched_mismatched_accuracy"] = concatenated_accuracy(
                [out[f"{split}_confusion"] for split in self.eval_splits])
        return out

    def compute_metrics(self, preds: list, labels: list) -> dict[str, float]:
        name = self.cfg.subset
        if name == "cola":
            # accuracy beside GLUE's MCC: a continual sequence's matrix holds every task's accuracy
            return {"matthews_correlation": metrics.matthews(preds, labels), "accuracy": metrics.accuracy(preds, labels)}
        if name == "stsb":
            return {"pearson": metrics.pearson(preds, labels), "spearmanr": metrics.spearman(preds, labels)}
        if name in ("mrpc", "qqp"):
            return {"accuracy": metrics.accuracy(preds, labels), "f1": metrics.f1(preds, labels)}
        return {"accuracy": metrics.accuracy(preds, labels)}


def concatenated_accuracy(confusions: list[list[list[int]]]) -> float:
    """The accuracy of several evaluation sets scored as one: correct over examples, summed over the sets, from
    their confusion matrices (integers, so exact); an empty total is undefined (NaN)."""
    correct = sum(row[i] for c in confusions for i, row in enumerate(c))
    total = sum(sum(row) for c in confusions for row in c)
    return correct / total if total else float("nan")
