"""`lrbench-data`: fill the local data tree (`$LRBENCH_DATA_DIR`) from the Hugging Face Hub, once, on a machine that
reaches it (a cluster's login node), so that runs on compute nodes without internet read local files only.

    lrbench-data list                                  # what it can fetch and where each file lands
    lrbench-data get glue/mrpc conll2003 wikitext-2    # into $LRBENCH_DATA_DIR, else ./data
    lrbench-data get glue --to /scratch/lrbench-data   # every GLUE task
    lrbench-data get sft/openorca --max-rows 1000      # the first rows of each split, streamed

Each dataset maps the Hub's rows to the files the project's own readers expect, as `Dataset.render`: a pure function
from {hub split: rows (dicts, as `datasets` yields them)} and the features' label names to {relative path: text}.
The download (`datasets.load_dataset`) and the writing are kept apart from it, so the tests feed it rows read from the
shared files and read the result back with the task readers (tests/test_data_cli.py); docs/data.md has the table.

Writing. Every dataset named is downloaded and rendered first, then every file is checked, then written: a temporary
file beside the target, then one rename each. A file that exists with the same bytes is left as it is; one with
other bytes is refused unless `--force`, before anything is written. Any refusal (an unknown name, a folder that
cannot be written, the Hub out of reach with no copy in the local HF cache) is one line on stderr, exit 2, and no
file written.

What the layouts keep and lose, against the files the classic scripts wrote (docs/data.md says it per file):
- GLUE: the Hub keeps the texts, labels and `idx`, not the sources' extra columns (MRPC's Microsoft sentence ids,
  CoLA's source code and original mark, QQP's question ids, STS-B's genre/file/year, MNLI's parses and annotator
  labels): those columns are written empty (CoLA's source: `hub`, its mark `*` for label 0), `idx` goes to the
  index column. Tabs and line breaks inside a text would shift the TSV's columns (read with QUOTE_NONE): each
  becomes one space (the classic files have none).
- CoNLL-2003: the Hub's rows are sentences without document boundaries: no `-DOCSTART-` lines. Otherwise the file
  is the classic one, byte for byte (tested on the shared train and valid files).
- WikiText-2 validation: the Hub's blank rows ("") become the file's blank lines " " again: byte for byte.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_bench import hub
from lowrank_bench.errors import LrbenchError, choices, report
from lowrank_bench.tasks.glue import GLUE
from lowrank_bench.tasks.glue import HUB_DATASET as GLUE_HUB

PROG = "lrbench-data"
DEFAULT_FOLDER = "data"  # with no --to and no LRBENCH_DATA_DIR

Rows = list[dict]
Names = dict[str, list[str]]  # column -> ClassLabel names, in id order


@dataclass(frozen=True)
class Dataset:
    """One name of `lrbench-data get`: which Hub dataset, which of its splits, and how its rows become files."""

    name: str
    hub: str
    config: str | None
    splits: tuple[str, ...]  # the Hub splits read
    files: tuple[str, ...]  # the relative paths written (for `list` and the docs)
    render: Callable[[dict[str, Rows], Names], dict[str, str]]
    revision: str | None = None
    max_rows: int | None = None  # the default --max-rows (OpenOrca: 4.2M rows, the task reads the first 1,000)
    note: str = ""
    label_columns: tuple[str, ...] = field(default=())  # columns whose ClassLabel names `render` needs


# -- text helpers -------------------------------------------------------------------------------------------------
ONE_LINE = str.maketrans("\t\r\n", "   ")


def one_line(text) -> str:
    """A TSV field read with QUOTE_NONE: a tab or line break inside it would shift the columns; each is one space."""
    return str(text).replace("\r\n", " ").translate(ONE_LINE)


def tsv(rows: list[list[str]], bom: bool = False) -> str:
    return ("\ufeff" if bom else "") + "".join("\t".join(one_line(v) for v in row) + "\n" for row in rows)


def csv_text(header: list[str], rows: list[list], lineterminator: str = "\n") -> str:
    """A CSV as pandas and the csv module read it: quotes where a field needs them, "" for a quote inside."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=lineterminator)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def jsonl(rows: Rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def float32_text(value) -> str:
    """The shortest text that gives the Hub's float32 back (3.8, not 3.799999952316284)."""
    import numpy as np

    return str(np.float32(value))


# -- GLUE (nyu-mll/glue) -> glue/<Folder>/{train,dev}.tsv, as download_glue_data.py wrote them -------------------------
#: the classic header of each task (CoLA has none: source, label, original mark, sentence)
GLUE_HEADERS = {
    "sst2": ["sentence", "label"],
    "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
             "score"],
    "mnli": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
    "qnli": ["index", "question", "sentence", "label"],
    "rte": ["index", "sentence1", "sentence2", "label"],
    "wnli": ["index", "sentence1", "sentence2", "label"],
}
INDEX_COLUMNS = ("index", "id")


def glue_label(subset: str, value) -> str:
    spec = GLUE[subset]
    if spec.regression:
        return float32_text(value)
    index = int(value)
    if not 0 <= index < spec.num_labels:  # the Hub's test splits: -1 (no label)
        raise LrbenchError(f"{GLUE_HUB}/{subset}: label {value!r} outside 0..{spec.num_labels - 1}")
    return spec.label_names[index] if spec.label_names else str(index)


def glue_tsv(subset: str, rows: Rows) -> str:
    """One split's rows (`nyu-mll/glue` columns: the texts of `Spec.hub_text`, `label`, `idx`) as the classic TSV
    that `GlueTask.read_tsv` reads: its columns named by `Spec.tsv_text`/`tsv_label`, the others empty or `idx`."""
    spec = GLUE[subset]
    a, b = spec.hub_text
    if subset == "cola":  # header-less: source, label, original mark, sentence
        return tsv([["hub", glue_label(subset, r["label"]), "*" if int(r["label"]) == 0 else "", r[a]] for r in rows])
    header = GLUE_HEADERS[subset]
    out = [header]
    for r in rows:
        values = {spec.tsv_text[0]: r[a], spec.tsv_label: glue_label(subset, r["label"])}
        if b is not None:
            values[spec.tsv_text[1]] = r[b]
        if subset == "mnli":
            values["label1"] = values["gold_label"]
        line = []
        for column in header:
            if column in values:
                line.append(values[column])
            else:
                line.append(str(r.get("idx", "")) if column in INDEX_COLUMNS else "")
        out.append(line)
    return tsv(out, bom=subset == "mrpc")  # the classic MRPC files start with a UTF-8 BOM


def glue_dataset(subset: str) -> Dataset:
    spec = GLUE[subset]
    hub_splits = {"train": "train.tsv", **{hub: tsv_name for tsv_name, hub in spec.splits.values()}}

    def render(rows: dict[str, Rows], names: Names) -> dict[str, str]:
        return {f"glue/{spec.folder}/{hub_splits[split]}": glue_tsv(subset, rows[split]) for split in hub_splits}

    return Dataset(f"glue/{subset}", GLUE_HUB, subset, tuple(hub_splits),
                   tuple(f"glue/{spec.folder}/{f}" for f in hub_splits.values()), render,
                   note="the Hub's test splits have no labels: not written")


# -- CoNLL-format NER (lowrank_bench/conf/task/ner/*.yaml `hub` blocks) -> <folder>/{train,valid,test}.txt ------------------------
def tag_names(column: str, values: list, names: Names, where: str) -> list[str]:
    if values and isinstance(values[0], str):
        return list(values)
    if column not in names:
        raise LrbenchError(f"{where}: the column {column!r} holds ids without names")
    return [names[column][int(v)] for v in values]


def conll_text(rows: Rows, tokens: str, columns: tuple[str, ...], names: Names, where: str) -> str:
    """Sentences as CoNLL lines `token [POS chunk] tag`, space-separated, a blank line after each sentence (the
    reader's format: the tag in the last column). Ids become their names (`names`); an empty sentence is left out."""
    out = []
    for number, row in enumerate(rows, start=1):
        words = [str(w) for w in row[tokens]]
        if not words:
            continue
        cells = [tag_names(c, list(row[c]), names, f"{where} row {number}") for c in columns]
        if any(len(c) != len(words) for c in cells):
            raise LrbenchError(f"{where} row {number}: {len(words)} tokens but {[len(c) for c in cells]} tags")
        out += [" ".join(line) + "\n" for line in zip(words, *cells)]
        out.append("\n")
    return "".join(out)


def ner_dataset(name: str, hub: str, revision: str | None, tokens: str, columns: tuple[str, ...],
                files: dict[str, str], fixed_names: Names | None = None) -> Dataset:
    def render(rows: dict[str, Rows], names: Names) -> dict[str, str]:
        merged = {**names, **(fixed_names or {})}
        return {f"{name}/{files[s]}": conll_text(rows[s], tokens, columns, merged, f"{hub} {s}") for s in files}

    return Dataset(name, hub, None, tuple(files), tuple(f"{name}/{f}" for f in files.values()), render, revision,
                   note="sentences without -DOCSTART- lines", label_columns=columns)


BIONLP_TAGS = ["O", "B-DNA", "I-DNA", "B-protein", "I-protein", "B-cell_type", "I-cell_type", "B-cell_line",
               "I-cell_line", "B-RNA", "I-RNA"]  # tner/bionlp2004's ids, as lowrank_bench/conf/task/ner/bionlp2004.yaml lists them


# -- E2E (tuetschek/e2e_nlg) -> e2e/{trainset,devset,testset_w_refs}.csv --------------------------------------------
E2E_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}


def e2e_csv(rows: Rows) -> str:
    """`mr,ref`, one row per reference, quoted where needed, CRLF: the official CSVs' own form (the shared devset.csv
    comes out byte for byte). A line break inside a text becomes a space: the reader takes one row per line."""
    return csv_text(["mr", "ref"], [[" ".join(str(r["meaning_representation"]).splitlines()),
                                     " ".join(str(r["human_reference"]).splitlines())] for r in rows], "\r\n")


def e2e_render(rows: dict[str, Rows], names: Names) -> dict[str, str]:
    return {f"e2e/{E2E_FILES[s]}": e2e_csv(rows[s]) for s in E2E_FILES}


# -- WikiText-2 (Salesforce/wikitext) -> wikitext-2/valid.txt, wikitext-2/wiki.test.raw ----------------------------
def wikitext_tokens(rows: Rows) -> str:
    """`wiki.valid.tokens`: `datasets` keeps each line with its newline and turns the blank lines (" ") into "" rows;
    this puts them back (a copy whose rows lost their newline gets it back too)."""
    return "".join(line(r["text"]) if r["text"].strip() else " \n" for r in rows)


def line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def wikitext_raw(rows: Rows) -> str:
    """CURLoRA's corpus as a file: the non-empty rows joined (`"".join(s for s in rows if s != "")`), so that the
    file read back is the string the Hub path builds (perplexity.hub_text)."""
    return "".join(line(r["text"]) for r in rows if r["text"].strip())


def wikitext_render(rows: dict[str, Rows], names: Names) -> dict[str, str]:
    return {"wikitext-2/valid.txt": wikitext_tokens(rows["wikitext-2-v1/validation"]),
            "wikitext-2/wiki.test.raw": wikitext_raw(rows["wikitext-2-raw-v1/test"])}


# -- Sentiment140 (stanfordnlp/sentiment140) -> sentiment/sentiment140/{train,test}.csv -----------------------------
def sentiment140_csv(rows: Rows) -> str:
    """The columns the reader needs (`text`, `sentiment` in 0/2/4), quoted where needed (tweets hold commas, quotes
    and line breaks; pandas' default quoting reads them back)."""
    return csv_text(["text", "sentiment"], [[r["text"], int(r["sentiment"])] for r in rows])


def sentiment140_render(rows: dict[str, Rows], names: Names) -> dict[str, str]:
    return {f"sentiment/sentiment140/{s}.csv": sentiment140_csv(rows[s]) for s in ("train", "test")}


# -- SFT sources (lowrank_bench/conf/task/sft/*.yaml) -> sft/<file>.jsonl ----------------------------------------------------------
def sft_dataset(name: str, hub: str, config: str | None, file: str, max_rows: int | None = None,
                note: str = "") -> Dataset:
    """The Hub's rows as they are, one JSON object a line: the SFT reader maps the columns to its roles itself."""
    def render(rows: dict[str, Rows], names: Names) -> dict[str, str]:
        return {f"sft/{file}.jsonl": jsonl(rows["train"])}

    return Dataset(name, hub, config, ("train",), (f"sft/{file}.jsonl",), render, max_rows=max_rows, note=note)


# -- MMLU (cais/mmlu, config all, test) -> mc/mmlu/<subject>.csv ----------------------------------------------------
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mmlu_files(rows: Rows, folder: str = "mc/mmlu") -> dict[str, str]:
    """One CSV per subject (question, A, B, ..., answer as a letter): what `mc_eval.read_items` reads, the same items
    as `read_hub_items` builds from these rows."""
    by_subject: dict[str, list] = {}
    for number, r in enumerate(rows, start=1):
        subject = str(r["subject"])
        if not subject or "/" in subject or subject.startswith("."):
            raise LrbenchError(f"cais/mmlu row {number}: subject {subject!r} cannot name a file")
        options = list(r["choices"])
        answer = int(r["answer"])
        if not 0 <= answer < len(options):
            raise LrbenchError(f"cais/mmlu row {number}: answer {answer} outside its {len(options)} options")
        by_subject.setdefault(subject, []).append((r["question"], options, LETTERS[answer]))
    out = {}
    for subject, items in sorted(by_subject.items()):
        width = max(len(o) for _, o, _ in items)
        header = ["question", *LETTERS[:width], "answer"]
        out[f"{folder}/{subject}.csv"] = csv_text(
            header, [[q, *o, *[""] * (width - len(o)), a] for q, o, a in items])
    return out


# -- the table ------------------------------------------------------------------------------------------------------
def build_table() -> dict[str, Dataset]:
    datasets = [glue_dataset(subset) for subset in GLUE]
    datasets += [
        ner_dataset("conll2003", "eriktks/conll2003", "refs/convert/parquet", "tokens",
                    ("pos_tags", "chunk_tags", "ner_tags"),
                    {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}),
        ner_dataset("bionlp2004", "tner/bionlp2004", "refs/convert/parquet", "tokens", ("tags",),
                    {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}, {"tags": BIONLP_TAGS}),
        Dataset("e2e", "tuetschek/e2e_nlg", None, tuple(E2E_FILES), tuple(f"e2e/{f}" for f in E2E_FILES.values()),
                e2e_render),
        Dataset("wikitext-2", "Salesforce/wikitext", None, ("wikitext-2-v1/validation", "wikitext-2-raw-v1/test"),
                ("wikitext-2/valid.txt", "wikitext-2/wiki.test.raw"), wikitext_render,
                note="valid.txt: wikitext-2-v1 validation (tokenised); wiki.test.raw: wikitext-2-raw-v1 test"),
        Dataset("sentiment140", "stanfordnlp/sentiment140", None, ("train", "test"),
                ("sentiment/sentiment140/train.csv", "sentiment/sentiment140/test.csv"), sentiment140_render,
                revision="refs/pr/6", note="the Parquet conversion (the main branch is a loading script)"),
        sft_dataset("sft/dolly", "databricks/databricks-dolly-15k", None, "databricks-dolly-15k"),
        sft_dataset("sft/lawyer-instruct", "Alignment-Lab-AI/Lawyer-Instruct", None, "Lawyer-Instruct"),
        sft_dataset("sft/gsm8k", "openai/gsm8k", "main", "gsm8k_train",
                    note="question -> worked solution, not CoLA's multiple-choice gsm8k_train.json"),
        sft_dataset("sft/openorca", "Open-Orca/OpenOrca", None, "OpenOrca", max_rows=1000,
                    note="the first 1,000 rows (the task's default max_samples), streamed; --max-rows 0: all 4.2M"),
        Dataset("mc/mmlu", "cais/mmlu", "all", ("test",), ("mc/mmlu/<subject>.csv",),
                lambda rows, names: mmlu_files(rows["test"]),
                note="57 subjects; eval=mc/mmlu, mc/mmlu_law and mc/mmlu_medicine read them"),
    ]
    return {d.name: d for d in datasets}


DATASETS = build_table()
GROUPS = {"glue": [f"glue/{s}" for s in GLUE], "sft": [n for n in DATASETS if n.startswith("sft/")],
          "all": list(DATASETS)}

#: what the project reads locally that no Hub dataset gives (docs/data.md says where each comes from)
NO_HUB_MAPPING = {
    "sentiment/amazon-{books,dvd,electronics,kitchen}": "Blitzer's multi-domain reviews: no Hub copy the project "
                                                        "relies on",
    "sft/{us_terms,iCliniq,GenMedGPT-5k,fineval_train-en}.json": "CoLA's LLaMA-Factory/data files",
    "mc/{gsm8k,fineval,bbh}": "CoLA's LLaMA-Factory/evaluation multiple-choice conversions",
    "e2e-metrics-example": "the official scorer's example inputs (tuetschek/e2e-metrics)",
    "tokenizers/gpt2": "a tokenizer, not a data set (microsoft/LoRA)",
}


def resolve_names(names: list[str]) -> list[Dataset]:
    out: list[str] = []
    for name in names:
        wanted = GROUPS.get(name, [name])
        for n in wanted:
            if n not in DATASETS:
                raise LrbenchError(f"unknown dataset {name!r}; valid: {choices([*DATASETS, *GROUPS])}")
            if n not in out:
                out.append(n)
    return [DATASETS[n] for n in out]


# -- download -------------------------------------------------------------------------------------------------------
def unreachable(dataset: Dataset) -> LrbenchError:
    return LrbenchError(f"the Hub ({hub.host()}) cannot be reached and {dataset.hub} is not in the local Hugging Face "
                        f"cache: run `{PROG} get {dataset.name}` on a machine with internet (a login node), then point "
                        f"LRBENCH_DATA_DIR at the folder it fills")


def download(dataset: Dataset, max_rows: int | None) -> tuple[dict[str, Rows], Names]:
    """The rows of every split the dataset needs, and the ClassLabel names of its label columns. With the Hub out
    of reach, a copy in the local HF cache still loads (offline mode, no retries); otherwise one line, at once."""
    import datasets

    online = hub.reachable()
    rows: dict[str, Rows] = {}
    names: Names = {}
    for split in dataset.splits:
        config, hub_split = split.split("/") if "/" in split else (dataset.config, split)
        kwargs = {"path": dataset.hub, "name": config, "split": hub_split, "revision": dataset.revision}
        try:
            if online and max_rows:  # streamed: only the first rows travel
                table = datasets.load_dataset(**kwargs, streaming=True)
                rows[split] = [dict(r) for r in table.take(max_rows)]
            elif online:
                table = datasets.load_dataset(**kwargs)
                rows[split] = table.to_list()
            else:
                with hub.offline():  # a copy in the local HF cache still loads, without the client's retries
                    table = datasets.load_dataset(**kwargs)
                rows[split] = (table.select(range(min(max_rows, len(table)))) if max_rows else table).to_list()
        except Exception as err:  # noqa: BLE001 - datasets raises many types; each becomes one line
            if not online:
                raise unreachable(dataset) from None
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise LrbenchError(f"{dataset.hub} ({config or 'default'}, {hub_split}"
                               f"{', revision ' + dataset.revision if dataset.revision else ''}) could not be loaded: "
                               f"{type(err).__name__}: {first}; nothing was written") from None
        features = getattr(table, "features", None) or {}
        for column in dataset.label_columns:
            feature = features.get(column)
            label_names = getattr(getattr(feature, "feature", None), "names", None)
            if label_names:
                names[column] = list(label_names)
    return rows, names


# -- writing --------------------------------------------------------------------------------------------------------
def target_folder(to: str | None) -> Path:
    value = to or os.environ.get("LRBENCH_DATA_DIR") or DEFAULT_FOLDER
    return Path(value).expanduser()


def check_writable(folder: Path) -> None:
    """Before any download: the folder (or its nearest existing parent, where it will be made) can be written."""
    if folder.exists() and not folder.is_dir():
        raise LrbenchError(f"--to {folder}: a file, not a folder; give a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    try:  # a probe file, gone at once: permissions, a read-only mount, root on /proc all answer here
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        raise LrbenchError(f"--to {folder}: cannot write in {existing}; choose a folder you can write (--to DIR or "
                           f"LRBENCH_DATA_DIR)") from None


def plan(folder: Path, files: dict[str, str], force: bool) -> tuple[dict[Path, bytes], list[Path]]:
    """(what to write, what is already there with the same bytes); a different existing file without `force`, or a
    path that is a folder, is refused before anything is written."""
    writes, same, conflicts = {}, [], []
    for relative, text in files.items():
        path = folder / relative
        data = text.encode("utf-8")
        if path.is_dir():
            raise LrbenchError(f"{path} is a folder; move it away (a data file goes there)")
        if path.is_file():
            if path.read_bytes() == data:
                same.append(path)
                continue
            if not force:
                conflicts.append(path)
                continue
        writes[path] = data
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise LrbenchError(f"{conflicts[0]}{more} exists with other contents; nothing was written: pass --force to "
                           f"replace, or choose another --to")
    return writes, same


def write_all(writes: dict[Path, bytes]) -> None:
    """Each file to a temporary file beside it, then every rename: a failure on the way removes the temporary files
    and leaves the targets as they were."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((Path(temp), path))
            with os.fdopen(handle, "wb") as out:
                out.write(data)
    except OSError as err:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        raise LrbenchError(f"cannot write {err.filename or path}: {err.strerror}; nothing was written") from None
    for temp, path in temps:
        os.replace(temp, path)


def get(names: list[str], to: str | None = None, force: bool = False, max_rows: int | None = None,
        fetch: Callable[[Dataset, int | None], tuple[dict[str, Rows], Names]] | None = None) -> list[str]:
    """Download, render, check, write; returns one line per file. `fetch` replaces `download` (tests give rows)."""
    fetch = fetch or download
    datasets = resolve_names(names)
    if max_rows is not None and max_rows < 0:
        raise LrbenchError(f"--max-rows {max_rows}: choose a positive number of rows, or 0 for all")
    folder = target_folder(to)
    check_writable(folder)
    files: dict[str, str] = {}
    for dataset in datasets:
        limit = dataset.max_rows if max_rows is None else (max_rows or None)
        rows, names_ = fetch(dataset, limit)
        files.update(dataset.render(rows, names_))
    writes, same = plan(folder, files, force)
    write_all(writes)
    return ([f"wrote {p} ({len(d):,} bytes)" for p, d in writes.items()]
            + [f"unchanged {p}" for p in same])


def listing() -> str:
    lines = [f"{'name':<20} {'Hub dataset':<36} files (under --to, default $LRBENCH_DATA_DIR or ./{DEFAULT_FOLDER})"]
    for d in DATASETS.values():
        hub = d.hub + (f" {d.config}" if d.config else "")
        lines.append(f"{d.name:<20} {hub:<36} {', '.join(d.files)}" + (f"  [{d.note}]" if d.note else ""))
    lines.append("groups: " + "; ".join(f"{g} = {', '.join(v) if g != 'all' else 'everything above'}"
                                         for g, v in GROUPS.items()))
    lines.append("no Hub mapping (local files only, see docs/data.md): "
                 + "; ".join(f"{k} ({v})" for k, v in NO_HUB_MAPPING.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Fill the local data tree ($LRBENCH_DATA_DIR) from the Hugging Face Hub, in the "
                               "layout the task readers expect (docs/data.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="what can be fetched and where each file lands")
    fetch = sub.add_parser("get", help="download datasets and write their local files")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="datasets or groups (see `list`)")
    fetch.add_argument("--to", default=None, help=f"the data folder (default: $LRBENCH_DATA_DIR, else ./"
                                                  f"{DEFAULT_FOLDER})")
    fetch.add_argument("--force", action="store_true", help="replace existing files whose contents differ")
    fetch.add_argument("--max-rows", type=int, default=None,
                       help="the first N rows of each split, streamed (0: all; default: all, OpenOrca 1,000)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(listing())
        return 0
    try:
        lines = get(args.names, args.to, args.force, args.max_rows)
    except LrbenchError as err:
        return report(err, PROG)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
