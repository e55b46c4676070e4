"""GLUE: local TSV reading (real shared data when present), malformed input, metrics, MNLI's two dev sets."""
from __future__ import annotations

import math
from collections import Counter
from contextlib import nullcontext

import pytest
from omegaconf import OmegaConf

from lowrank_bench.errors import LrbenchError
from lowrank_bench.tasks import build
from lowrank_bench.tasks.glue import GLUE, GlueTask
from tests.conftest import CONF, DATA, base_model, needs_data


def glue_cfg(subset: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "task" / "glue" / f"{subset}.yaml"), overrides)


def test_every_glue_config_builds_its_task(monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)  # the shared folder holds three of the nine
    for subset in GLUE:
        task = build(glue_cfg(subset, data_dir=None))
        assert isinstance(task, GlueTask) and task.name == f"glue/{subset}"
    assert build(glue_cfg("stsb")).head.regression
    assert build(glue_cfg("mnli")).eval_splits == ("matched", "mismatched")
    assert build(glue_cfg("mnli")).head.num_labels == 3


@needs_data
@pytest.mark.parametrize("subset,train,dev,dev_counts", [
    ("mrpc", 3667, 408, {1: 279, 0: 129}),   # the shared copy has 3,667 train rows (3,668 is often quoted)
    ("sst2", 67349, 872, {1: 444, 0: 428}),
    ("cola", 8551, 1043, {1: 721, 0: 322}),
])
def test_reads_the_classic_glue_layout(subset, train, dev, dev_counts):
    task = build(glue_cfg(subset, data_dir=str(DATA / "glue")))
    rows = task.raw_split("train")
    val = task.raw_split("validation")
    assert (len(rows), len(val)) == (train, dev)
    assert Counter(r["label"] for r in val) == dev_counts
    if subset == "mrpc":
        assert rows[0]["text"].startswith("Amrozi accused his brother")
        assert rows[0]["text_pair"].startswith("Referring to him as only")


def write_mrpc(folder, rows):
    (folder / "MRPC").mkdir(parents=True, exist_ok=True)
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for name in ("train.tsv", "dev.tsv"):
        (folder / "MRPC" / name).write_text(header + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def test_malformed_label_names_the_file_and_line(tmp_path):
    write_mrpc(tmp_path, [["1", "1", "2", "a b", "c d"], ["yes", "3", "4", "e f", "g h"]])
    task = build(glue_cfg("mrpc", data_dir=str(tmp_path)))
    with pytest.raises(LrbenchError, match=r"train.tsv:3: malformed label 'yes'; expected one of \['0', '1'\]"):
        task.raw_split("train")


def test_short_row_is_a_clear_error(tmp_path):
    write_mrpc(tmp_path, [["1", "1", "2", "only one sentence"]])
    with pytest.raises(LrbenchError, match=r"train.tsv:2: malformed row with 4 column\(s\), expected at least 5"):
        build(glue_cfg("mrpc", data_dir=str(tmp_path))).raw_split("train")


def test_an_empty_file_and_one_that_is_not_utf8_name_the_file_and_line(tmp_path):
    write_mrpc(tmp_path, [["1", "1", "2", "a b", "c d"]])
    train = tmp_path / "MRPC" / "train.tsv"
    train.write_bytes(b"")
    task = build(glue_cfg("mrpc", data_dir=str(tmp_path)))
    with pytest.raises(LrbenchError, match=r"train.tsv: the file is empty"):
        task.raw_split("train")
    train.write_bytes("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta b\tc d\n".encode()
                      + b"0\t3\t4\tna\xefve caf\xe9\tx\n")  # Latin-1 bytes on line 3
    with pytest.raises(LrbenchError, match=r"train.tsv:3: not UTF-8 \(byte 0xef\)"):
        task.raw_split("train")


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(LrbenchError, match="expected the glue_data/ layout"):
        build(glue_cfg("rte", data_dir=str(tmp_path)))
    (tmp_path / "RTE").mkdir()
    with pytest.raises(LrbenchError, match="missing data file .*RTE/train.tsv"):
        build(glue_cfg("rte", data_dir=str(tmp_path))).raw_split("train")


def test_hub_fallback_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    task = build(glue_cfg("rte"))
    assert task.folder is None
    with pytest.raises(LrbenchError, match="task.data_dir"):
        task.raw_split("train")


def test_mnli_reports_matched_and_mismatched_separately(tmp_path):
    folder = tmp_path / "MNLI"
    folder.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n"
    rows = {"train.tsv": ["0\t1\t1\tfic\tA man sleeps.\tA person rests.\tentailment"],
            "dev_matched.tsv": ["0\t1\t1\tfic\tA man sleeps.\tNobody sleeps.\tcontradiction",
                                "1\t1\t1\tfic\tA dog runs.\tAn animal moves.\tentailment"],
            "dev_mismatched.tsv": ["0\t1\t1\ttel\tIt rains.\tIt might be cold.\tneutral"]}
    for name, lines in rows.items():
        (folder / name).write_text(header + "\n".join(lines) + "\n")
    model, tok = base_model("tiny-roberta", num_labels=3)
    task = build(glue_cfg("mnli", data_dir=str(tmp_path)))
    assert [r["label"] for r in task.raw_split("matched")] == [2, 0]
    task.prepare(tok, 32)
    metrics = task.evaluate_all(model, batch_size=8)
    assert {k for k, v in metrics.items() if isinstance(v, float)} == {"matched_accuracy", "mismatched_accuracy",
                                                                        "matched_mismatched_accuracy"}
    correct = total = 0
    for split in ("matched", "mismatched"):  # the model's own predictions, scored here
        preds, labels = task.predict(model, split, 8, "cpu", nullcontext)
        correct, total = correct + sum(p == y for p, y in zip(preds, labels)), total + len(labels)
    assert metrics["matched_mismatched_accuracy"] == correct / total
    assert sum(map(sum, metrics["matched_confusion"])) == 2 and len(metrics["mismatched_confusion"]) == 3
    assert {"matched_degenerate", "mismatched_degenerate"} <= set(metrics)
    assert metrics["matched_accuracy"] in (0.0, 0.5, 1.0) and metrics["mismatched_accuracy"] in (0.0, 1.0)


def test_mnli_concatenated_accuracy_pools_the_examples_not_the_two_accuracies(tmp_path, monkeypatch):
    """BiDoRA's MNLI number (run_glue_bilevel.py:426-461): both dev sets predicted into one list and scored once,
    (correct_m + correct_mm) / (n_m + n_mm). With 3 of 4 matched and 0 of 1 mismatched right that is 3/5 = 0.6, where
    the mean of the two accuracies would be (0.75 + 0) / 2 = 0.375."""
    folder = tmp_path / "MNLI"
    folder.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n"
    row = "0\t1\t1\tfic\tA man sleeps.\tA person rests.\t{}"
    labels = {"matched": ["entailment", "neutral", "contradiction", "entailment"], "mismatched": ["neutral"]}
    (folder / "train.tsv").write_text(header + row.format("entailment") + "\n")
    for split, names in labels.items():
        (folder / f"dev_{split}.tsv").write_text(header + "\n".join(row.format(n) for n in names) + "\n")
    task = build(glue_cfg("mnli", data_dir=str(tmp_path)))
    scripted = {"matched": [0, 1, 2, 2], "mismatched": [0]}  # 3 of 4 right (labels 0 1 2 0), 0 of 1 (label 1)
    monkeypatch.setattr(GlueTask, "predict",
                        lambda self, model, split, *a: (scripted[split], [r["label"] for r in self.raw_split(split)]))
    metrics = task.evaluate_all(None, batch_size=8)
    assert (metrics["matched_accuracy"], metrics["mismatched_accuracy"]) == (0.75, 0.0)
    assert metrics["matched_mismatched_accuracy"] == 3 / 5
    assert metrics["matched_mismatched_accuracy"] != (0.75 + 0.0) / 2
    from lowrank_bench.tasks.glue import concatenated_accuracy

    assert concatenated_accuracy([[[2, 0], [0, 1]], [[0, 0], [5, 2]]]) == 5 / 10  # 3 of 3, 2 of 7
    assert math.isnan(concatenated_accuracy([[[0]]]))
    preset = OmegaConf.load(CONF / "experiment" / "bidora" / "roberta_base_mnli.yaml")
    assert preset.task.metric == "matched_mismatched_accuracy"  # the BiDoRA MNLI presets pick the best by it


@pytest.mark.parametrize("subset,preds,labels,expected", [
    ("cola", [1, 0, 1, 1], [1, 0, 0, 1], {"matthews_correlation": 0.5773502691896258, "accuracy": 0.75}),
    ("mrpc", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75, "f1": 0.8}),
    ("stsb", [0.1, 0.4, 0.35, 0.8], [0.0, 1.0, 2.0, 3.0], {"pearson": 0.9133691346759315, "spearmanr": 0.8}),
    ("rte", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75}),
])
def test_official_metrics(subset, preds, labels, expected):
    got = build(glue_cfg(subset, data_dir=None, source="hub")).compute_metrics(preds, labels)  # nothing read
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12)


def test_tokenised_once_then_cached(tmp_path, monkeypatch):
    write_mrpc(tmp_path, [["1", "1", "2", "a b", "c d"], ["0", "3", "4", "e f", "g h"]])
    _, tok = base_model("tiny-roberta")
    first = build(glue_cfg("mrpc", data_dir=str(tmp_path)))
    first.prepare(tok, 32)
    calls = []
    second = build(glue_cfg("mrpc", data_dir=str(tmp_path)))
    monkeypatch.setattr(second, "raw_split", lambda split: calls.append(split) or [])
    second.prepare(tok, 32)
    assert calls == [] and second.splits["train"] == first.splits["train"]
    assert second.collate(second.splits["train"])["input_ids"].shape[0] == 2


@pytest.mark.parametrize("subset, preds, labels, undefined", [
    ("cola", [1, 1, 1, 1], [1, 0, 0, 1], "matthews_correlation"),  # a constant predictor: 0/0, not 0.0
    ("stsb", [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0], "pearson"),
])
def test_a_correlation_with_a_constant_side_is_undefined(subset, preds, labels, undefined):
    import math

    from lowrank_bench.results import best_and_last

    got = build(glue_cfg(subset, data_dir=None, source="hub")).compute_metrics(preds, labels)  # nothing read
    assert math.isnan(got[undefined])
    summary = best_and_last([{"step": 1, "train_loss": 0.5, **got}], undefined)
    assert summary[f"best_{undefined}"] is None and summary[f"last_{undefined}"] is None  # a blank cell, not 0.0


@pytest.mark.parametrize("source, env_has_folder, expected", [
    ("auto", True, "local"), ("auto", False, "error"), ("auto", None, "hub"),
    ("local", True, "local"), ("local", False, "error"), ("local", None, "error"),
    ("hub", True, "hub"), ("hub", False, "hub"), ("hub", None, "hub"),
])
def test_task_source_decides_between_local_files_and_the_hub(tmp_path, monkeypatch, source, env_has_folder,
                                                             expected):
    """env_has_folder: LRBENCH_DATA_DIR set and holding glue/MRPC (True), set without it (False), unset (None)."""
    shared = tmp_path / "data"
    write_mrpc(shared / "glue" if env_has_folder else tmp_path / "elsewhere", [("1", "1", "2", "a", "b")])
    shared.mkdir(exist_ok=True)
    if env_has_folder is None:
        monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("LRBENCH_DATA_DIR", str(shared))
    if expected == "error":
        with pytest.raises(LrbenchError, match="glue/MRPC") as error:
            build(glue_cfg("mrpc", data_dir=None, source=source))
        assert "task.data_dir" in str(error.value) and "task.source=hub" in str(error.value)
        return
    task = build(glue_cfg("mrpc", data_dir=None, source=source))
    assert task.folder == (shared / "glue" / "MRPC" if expected == "local" else None)


def test_source_local_takes_task_data_dir_and_hub_refuses_it(tmp_path):
    folder = tmp_path / "glue_data"
    write_mrpc(folder, [("1", "1", "2", "a", "b")])
    assert build(glue_cfg("mrpc", data_dir=str(folder), source="local")).folder == folder / "MRPC"
    with pytest.raises(LrbenchError, match="task.source=hub reads the Hub only"):
        build(glue_cfg("mrpc", data_dir=str(folder), source="hub"))
    with pytest.raises(LrbenchError, match="task.source=bogus: must be auto, local or hub"):
        build(glue_cfg("mrpc", source="bogus"))
