"""`lrbench-data`: each Hub -> local mapping written by the CLI and read back by the project's own readers.

No Hub here: the download is replaced by rows as `datasets` yields them, taken from the shared files (round trips
against the readers' view of those files, byte for byte where the layout allows) or made by hand. The real download
path is tested only for its refusal when the Hub is out of reach."""
from __future__ import annotations

import csv
import io

import pytest
from omegaconf import OmegaConf

from lowrank_bench import data_cli, perplexity
from lowrank_bench.evaluations import multiple_choice
from lowrank_bench.e2e_metrics import read_table
from lowrank_bench.tasks import e2e as e2e_task
from lowrank_bench.tasks.glue import GlueTask
from lowrank_bench.tasks.ner import NerTask
from lowrank_bench.tasks.sentiment import Sentiment140
from lowrank_bench.tasks.sft import SftTask, candidates_from, read_records, to_turns
from tests.conftest import CONF, DATA


def shared(relative: str):
    """A shared data file, or a skip that says what is missing."""
    if DATA is None:
        pytest.skip("real data absent: set LRBENCH_DATA_DIR to the shared data folder (CI sets it to ../shared/data)")
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} absent from LRBENCH_DATA_DIR={DATA}")
    return path


def run_get(monkeypatch, tmp_path, name, rows, names=None, *extra):
    """`lrbench-data get NAME --to tmp_path` with the download replaced by `rows` ({hub split: rows})."""
    seen = []

    def fake(dataset, max_rows):
        seen.append(dataset.name)
        return rows, dict(names or {})

    monkeypatch.setattr(data_cli, "download", fake)
    code = data_cli.main(["get", name, "--to", str(tmp_path), *extra])
    return code, seen


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- GLUE -----------------------------------------------------------------------------------------------------------
def glue_cfg(subset, data_dir):
    return OmegaConf.create({"family": "glue", "subset": subset, "name": f"glue/{subset}", "data_dir": str(data_dir),
                             "source": "local", "metric": None})


def tsv_rows(path, header: bool):
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""), delimiter="\t",
                           quoting=csv.QUOTE_NONE))
    return [dict(zip(rows[0], r)) for r in rows[1:] if r] if header else [r for r in rows if r]


def hub_rows_of(subset, path):
    """The rows `nyu-mll/glue` holds for one of the classic files (texts, integer label, idx)."""
    if subset == "cola":
        return [{"sentence": r[3], "label": int(r[1]), "idx": i} for i, r in enumerate(tsv_rows(path, False))]
    if subset == "sst2":
        return [{"sentence": r["sentence"], "label": int(r["label"]), "idx": i}
                for i, r in enumerate(tsv_rows(path, True))]
    return [{"sentence1": r["#1 String"], "sentence2": r["#2 String"], "label": int(r["Quality"]), "idx": i}
            for i, r in enumerate(tsv_rows(path, True))]


@pytest.mark.parametrize("subset,folder", [("cola", "CoLA"), ("sst2", "SST-2"), ("mrpc", "MRPC")])
def test_glue_files_written_from_hub_rows_read_back_as_the_shared_files(monkeypatch, tmp_path, subset, folder):
    train, dev = shared(f"glue/{folder}/train.tsv"), shared(f"glue/{folder}/dev.tsv")
    rows = {"train": hub_rows_of(subset, train), "validation": hub_rows_of(subset, dev)}
    code, _ = run_get(monkeypatch, tmp_path, f"glue/{subset}", rows)
    assert code == 0
    assert files_under(tmp_path) == [f"glue/{folder}/dev.tsv", f"glue/{folder}/train.tsv"]
    written, original = GlueTask(glue_cfg(subset, tmp_path / "glue")), GlueTask(glue_cfg(subset, DATA / "glue"))
    for split in ("train", "validation"):
        assert written.raw_split(split) == original.raw_split(split)
    if subset == "sst2":  # nothing of the classic file is missing from the Hub's rows: byte for byte
        assert (tmp_path / "glue/SST-2/train.tsv").read_bytes() == train.read_bytes()
    if subset == "mrpc":
        assert (tmp_path / "glue/MRPC/dev.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t")


PAIRS = [("A first one .", "Its pair , with\ta tab ."), ("Second", "pair\nwith a line break")]


@pytest.mark.parametrize("subset,columns,labels,expected", [
    ("qqp", ("question1", "question2"), [0, 1], [0, 1]),
    ("stsb", ("sentence1", "sentence2"), [3.799999952316284, 0.25], [3.8, 0.25]),
    ("qnli", ("question", "sentence"), [1, 0], [1, 0]),
    ("rte", ("sentence1", "sentence2"), [0, 1], [0, 1]),
    ("wnli", ("sentence1", "sentence2"), [1, 0], [1, 0]),
])
def test_other_glue_tasks_round_trip_through_the_glue_reader(monkeypatch, tmp_path, subset, columns, labels, expected):
    """Hand-made rows (no shared copy): texts, labels (STS-B: the Hub's float32 score), a tab and a line break that
    become one space each."""
    rows = [{columns[0]: a, columns[1]: b, "label": y, "idx": i} for i, ((a, b), y) in enumerate(zip(PAIRS, labels))]
    code, _ = run_get(monkeypatch, tmp_path, f"glue/{subset}", {"train": rows, "validation": rows[::-1]})
    assert code == 0
    task = GlueTask(glue_cfg(subset, tmp_path / "glue"))
    want = [{"text": " ".join(a.split("\n")), "text_pair": b.replace("\t", " ").replace("\n", " "), "label": y}
            for (a, b), y in zip(PAIRS, expected)]
    assert task.raw_split("train") == want
    assert task.raw_split("validation") == want[::-1]


def test_mnli_writes_train_and_both_dev_files_with_label_names(monkeypatch, tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i, "idx": i} for i in range(3)]
    code, _ = run_get(monkeypatch, tmp_path, "glue/mnli",
                      {"train": rows, "validation_matched": rows[:2], "validation_mismatched": rows[2:]})
    assert code == 0
    assert files_under(tmp_path / "glue/MNLI") == ["dev_matched.tsv", "dev_mismatched.tsv", "train.tsv"]
    assert "\tentailment\tentailment\n" in (tmp_path / "glue/MNLI/train.tsv").read_text()
    task = GlueTask(glue_cfg("mnli", tmp_path / "glue"))
    assert [e["label"] for e in task.raw_split("train")] == [0, 1, 2]
    assert task.raw_split("matched") == [{"text": "p0", "text_pair": "h0", "label": 0},
                                         {"text": "p1", "text_pair": "h1", "label": 1}]
    assert task.raw_split("mismatched") == [{"text": "p2", "text_pair": "h2", "label": 2}]


# -- CoNLL-format NER -----------------------------------------------------------------------------------------------
def ner_cfg(name, data_dir):
    cfg = OmegaConf.load(CONF / "task" / "ner" / f"{name}.yaml")
    cfg.data_dir, cfg.source = str(data_dir), "local"
    return cfg


def conll_hub_rows(path, names):
    """The shared file as the Hub's rows: one per sentence, ids for POS, chunk and NER tags (no document marks)."""
    rows, sentence = [], []
    for line in path.read_text(encoding="utf-8").split("\n") + [""]:
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if sentence:
                columns = list(zip(*sentence))
                rows.append({"id": str(len(rows)), "tokens": list(columns[0]),
                             **{c: [names[c].index(v) for v in columns[i + 1]]
                                for i, c in enumerate(("pos_tags", "chunk_tags", "ner_tags"))}})
                sentence = []
            continue
        sentence.append(line.split(" "))
    return rows


def without_docstart(text):
    return text.replace("-DOCSTART- -X- -X- O\n\n", "")


def test_conll2003_written_from_hub_rows_is_the_shared_file_without_docstart_lines(monkeypatch, tmp_path):
    train, valid = shared("conll2003/train.txt"), shared("conll2003/valid.txt")
    lines = [line.split(" ") for p in (train, valid) for line in p.read_text(encoding="utf-8").split("\n")
             if line.strip() and not line.startswith("-DOCSTART-")]
    names = {c: sorted({line[i + 1] for line in lines}) for i, c in enumerate(("pos_tags", "chunk_tags", "ner_tags"))}
    rows = {"train": conll_hub_rows(train, names), "validation": conll_hub_rows(valid, names),
            "test": conll_hub_rows(valid, names)}
    assert len(rows["train"]) == 14041
    code, _ = run_get(monkeypatch, tmp_path, "conll2003", rows, names)
    assert code == 0
    assert (tmp_path / "conll2003/train.txt").read_text() == without_docstart(train.read_text(encoding="utf-8"))
    assert (tmp_path / "conll2003/valid.txt").read_text() == without_docstart(valid.read_text(encoding="utf-8"))
    written = NerTask(ner_cfg("conll2003", tmp_path / "conll2003"))
    original = NerTask(ner_cfg("conll2003", DATA / "conll2003"))
    assert written.eval_splits == ("validation", "test")  # the Hub's test split is written, so it is evaluated
    for split in ("train", "validation"):
        assert written.raw_split(split) == original.raw_split(split)


def test_bionlp2004_tag_ids_become_the_configured_names(monkeypatch, tmp_path):
    rows = [{"tokens": ["IL-2", "gene", "expression"], "tags": [1, 2, 0]}, {"tokens": [], "tags": []},
            {"tokens": ["T", "cells"], "tags": [5, 6]}]
    code, _ = run_get(monkeypatch, tmp_path, "bionlp2004", {"train": rows, "validation": rows, "test": rows})
    assert code == 0
    assert (tmp_path / "bionlp2004/train.txt").read_text() == "IL-2 B-DNA\ngene I-DNA\nexpression O\n\nT " \
                                                               "B-cell_type\ncells I-cell_type\n\n"
    task = NerTask(ner_cfg("bionlp2004", tmp_path / "bionlp2004"))
    assert task.raw_split("validation") == [{"words": ["IL-2", "gene", "expression"], "tags": ["B-DNA", "I-DNA", "O"]},
                                            {"words": ["T", "cells"], "tags": ["B-cell_type", "I-cell_type"]}]


# -- E2E ------------------------------------------------------------------------------------------------------------
def test_e2e_devset_written_from_hub_rows_is_the_shared_file_byte_for_byte(monkeypatch, tmp_path):
    dev = shared("e2e/devset.csv")
    records = list(csv.reader(io.StringIO(dev.read_text(encoding="utf-8"), newline="")))[1:]
    rows = [{"meaning_representation": mr, "human_reference": ref} for mr, ref in records]
    code, _ = run_get(monkeypatch, tmp_path, "e2e", {"train": rows, "validation": rows, "test": rows[:10]})
    assert code == 0
    assert (tmp_path / "e2e/devset.csv").read_bytes() == dev.read_bytes()
    cfg = OmegaConf.load(CONF / "task" / "e2e.yaml")
    cfg.data_dir, cfg.source = str(tmp_path / "e2e"), "local"
    task = e2e_task.E2ETask(cfg)
    assert task.split == "official"  # trainset.csv is there now
    assert task.read_pairs("validation") == [{"mr": mr, "ref": ref} for mr, ref in read_table(dev)]
    assert len(task.read_pairs("test")) == 10


# -- WikiText-2 -----------------------------------------------------------------------------------------------------
def test_wikitext_valid_tokens_written_from_hub_rows_is_the_shared_file(monkeypatch, tmp_path):
    valid, raw = shared("wikitext-2/valid.txt"), shared("wikitext-2/wiki.test.raw")
    # datasets' rows: each line with its newline, the blank lines (" ") as ""
    valid_rows = [{"text": line if line.strip() else ""}
                  for line in io.StringIO(valid.read_text(encoding="utf-8"), newline="\n")]
    raw_rows = []
    for line in io.StringIO(raw.read_text(encoding="utf-8"), newline="\n"):
        raw_rows += [{"text": ""}, {"text": line}]  # the Hub's raw test has blank rows between paragraphs
    code, _ = run_get(monkeypatch, tmp_path, "wikitext-2",
                      {"wikitext-2-v1/validation": valid_rows, "wikitext-2-raw-v1/test": raw_rows})
    assert code == 0
    assert (tmp_path / "wikitext-2/valid.txt").read_bytes() == valid.read_bytes()
    assert (tmp_path / "wikitext-2/wiki.test.raw").read_bytes() == raw.read_bytes()
    # the file path and the Hub path of CURLoRA's corpus give one string
    local = perplexity.resolve_corpus("wikitext-2-raw-v1/test", "local", tmp_path)
    assert local.path == tmp_path / "wikitext-2/wiki.test.raw"
    assert local.text() == "".join(r["text"] for r in raw_rows)
    assert perplexity.resolve_corpus(None, "auto", tmp_path).text() == valid.read_text(encoding="utf-8")
    stripped = [{"text": r["text"].rstrip("\n")} for r in valid_rows]  # a copy whose rows lost their newline
    assert data_cli.wikitext_tokens(stripped) == valid.read_text(encoding="utf-8")


# -- Sentiment140 ---------------------------------------------------------------------------------------------------
def test_sentiment140_tweets_with_commas_quotes_and_line_breaks_read_back(monkeypatch, tmp_path):
    tweets = [("NA", 0), ('he said "no", then left', 2), ("two\nlines, one tweet", 4), ("  spaced  ", 4)]
    rows = [{"text": t, "sentiment": s, "date": "x", "user": "u", "query": "NO_QUERY"} for t, s in tweets]
    code, _ = run_get(monkeypatch, tmp_path, "sentiment140", {"train": rows[:2], "test": rows})
    assert code == 0
    cfg = OmegaConf.load(CONF / "task" / "sentiment" / "sentiment140.yaml")
    cfg.data_dir, cfg.source, cfg.max_eval_samples = str(tmp_path / "sentiment/sentiment140"), "local", None
    task = Sentiment140(cfg)  # trains on test.csv, evaluates train.csv (CURLoRA's protocol)
    assert task.raw_split("train") == [{"text": t, "text_pair": None, "label": s // 4} for t, s in tweets]
    assert [e["text"] for e in task.raw_split("validation")] == ["NA", 'he said "no", then left']


# -- SFT ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,domain,file,row", [
    ("sft/dolly", "generality", "databricks-dolly-15k",
     {"instruction": "Why?", "context": "Some, \"quoted\"\ncontext", "response": "Because.", "category": "open_qa"}),
    ("sft/lawyer-instruct", "law", "Lawyer-Instruct", {"instruction": "Advise", "input": "", "output": "Sue."}),
    ("sft/gsm8k", "math", "gsm8k_train", {"question": "1+1?", "answer": "2\n#### 2"}),
    ("sft/openorca", "multitask", "OpenOrca",
     {"id": "cot.1", "system_prompt": "Be brief.", "question": "Q", "response": "A"}),
])
def test_sft_rows_are_found_where_the_task_looks_and_read_as_the_hub_rows(monkeypatch, tmp_path, name, domain,
                                                                           file, row):
    rows = [row, {**row, **{k: f"second {k}" for k in row}}]
    code, _ = run_get(monkeypatch, tmp_path, name, {"train": rows})
    assert code == 0
    source = next(s for s in OmegaConf.load(CONF / "task" / "sft" / f"{domain}.yaml").sources if s.file == file)
    path = SftTask.local_file(tmp_path / "sft", source)
    assert path == tmp_path / "sft" / f"{file}.jsonl"
    assert read_records(path) == rows
    assert to_turns(read_records(path), candidates_from(), "file") == to_turns(rows, candidates_from(), "hub")


# -- MMLU -----------------------------------------------------------------------------------------------------------
def test_mmlu_items_read_from_the_written_folder_equal_the_hub_items(monkeypatch, tmp_path):
    rows = [{"question": "Which, \"really\"?\nPick one.", "subject": "anatomy", "choices": ["a", "b, c", "d", "e"],
             "answer": 1},
            {"question": "Q2", "subject": "virology", "choices": ["w", "x", "y", "z"], "answer": 3},
            {"question": "Q3", "subject": "anatomy", "choices": ["1", "2", "3", "4"], "answer": 0}]
    code, _ = run_get(monkeypatch, tmp_path, "mc/mmlu", {"test": rows})
    assert code == 0
    assert files_under(tmp_path) == ["mc/mmlu/anatomy.csv", "mc/mmlu/virology.csv"]
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "eval" / "mc" / "_base.yaml"),
                          OmegaConf.load(CONF / "eval" / "mc" / "mmlu_medicine.yaml"))
    cfg.pop("defaults")
    cfg.data_dir, cfg.subjects = str(tmp_path / "mc/mmlu"), ["anatomy", "virology"]
    subjects, _ = multiple_choice.load_items(cfg)
    hub = [multiple_choice.item_from_record(r, r["subject"], "hub") for r in rows]

    def key(i):
        return i.subject, i.question, i.options, i.answer

    assert [key(i) for s in subjects.values() for i in s] == [key(i) for i in sorted(hub, key=lambda i: i.subject)]


# -- the table agrees with the readers' configs ----------------------------------------------------------------------
def test_every_hub_name_and_file_agrees_with_the_task_configs():
    for name in ("conll2003", "bionlp2004"):
        cfg, dataset = OmegaConf.load(CONF / "task" / "ner" / f"{name}.yaml"), data_cli.DATASETS[name]
        assert (dataset.hub, dataset.revision) == (cfg.hub.dataset, cfg.hub.revision)
        assert [f"{name}/{cfg.files[s][0]}" for s in cfg.hub.splits] == list(dataset.files)
        assert list(cfg.hub.splits.values()) == list(dataset.splits)
    assert data_cli.BIONLP_TAGS == list(OmegaConf.load(CONF / "task/ner/bionlp2004.yaml").hub.label_names)
    assert data_cli.DATASETS["e2e"].hub == e2e_task.HUB_DATASET
    assert data_cli.E2E_FILES == e2e_task.FILES
    s140 = OmegaConf.load(CONF / "task/sentiment/sentiment140.yaml")
    assert data_cli.DATASETS["sentiment140"].revision == s140.hub_revision
    assert data_cli.DATASETS["wikitext-2"].hub == perplexity.WIKITEXT_HUB
    assert set(data_cli.DATASETS["wikitext-2"].files) == {perplexity.DEFAULT_FILE,
                                                          perplexity.CORPORA["wikitext-2-raw-v1/test"][0]}
    for path in (CONF / "task" / "sft").glob("[!_]*.yaml"):
        for source in OmegaConf.load(path).sources:
            if source.hub:
                match = [d for d in data_cli.DATASETS.values() if d.hub == source.hub]
                assert match, f"{source.hub} ({path.name}) has no lrbench-data mapping"
                assert match[0].files == (f"sft/{source.file}.jsonl",)
                assert match[0].config == source.hub_config and match[0].splits == (source.hub_split,)
    mmlu = OmegaConf.load(CONF / "eval/mc/mmlu.yaml")
    assert (data_cli.DATASETS["mc/mmlu"].hub, data_cli.DATASETS["mc/mmlu"].config) == (mmlu.hub, mmlu.hub_config)


def test_list_names_every_dataset_and_its_files(capsys):
    assert data_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for dataset in data_cli.DATASETS.values():
        assert dataset.name in out and all(f in out for f in dataset.files)
    assert "sentiment/amazon-" in out  # said to have no Hub mapping


# -- refusals: one line, exit 2, nothing written ----------------------------------------------------------------------
def one_line_refusal(capsys, code):
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lrbench-data error: ") and err.count("\n") == 1, err
    return err


def test_unreachable_hub_is_one_line_exit_2_and_nothing_written(monkeypatch, tmp_path, capsys):
    """The real download path: conftest points HF_ENDPOINT at a closed local port and HF_HOME at an empty folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "data"
    code = data_cli.main(["get", "glue/sst2", "conll2003", "--to", str(target)])
    err = one_line_refusal(capsys, code)
    assert "cannot be reached" in err and "nyu-mll/glue" in err and "lrbench-data get glue/sst2" in err
    assert not target.exists()


def test_unknown_dataset_names_the_valid_choices_before_any_download(monkeypatch, tmp_path, capsys):
    code, seen = run_get(monkeypatch, tmp_path, "glue/mrcp", {})
    err = one_line_refusal(capsys, code)
    assert "unknown dataset 'glue/mrcp'" in err and "glue/mrpc" in err and "wikitext-2" in err
    assert seen == [] and files_under(tmp_path) == []


def test_a_folder_that_cannot_be_written_is_refused_before_any_download(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for to in (blocker, blocker / "data"):
        monkeypatch.setattr(data_cli, "download", lambda d, n: pytest.fail("downloaded"))
        code = data_cli.main(["get", "e2e", "--to", str(to)])
        assert "--to" in one_line_refusal(capsys, code)
    assert files_under(tmp_path) == ["a-file"]


E2E_ROWS = {s: [{"meaning_representation": "name[A]", "human_reference": f"A {s}."}] for s in data_cli.E2E_FILES}


def test_a_different_existing_file_is_kept_without_force_and_nothing_else_is_written(monkeypatch, tmp_path, capsys):
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e/devset.csv").write_text("mr,ref\nmine,mine\n")
    code, _ = run_get(monkeypatch, tmp_path, "e2e", E2E_ROWS)
    err = one_line_refusal(capsys, code)
    assert "devset.csv exists with other contents" in err and "--force" in err
    assert files_under(tmp_path) == ["e2e/devset.csv"]
    assert (tmp_path / "e2e/devset.csv").read_text() == "mr,ref\nmine,mine\n"
    assert run_get(monkeypatch, tmp_path, "e2e", E2E_ROWS, None, "--force")[0] == 0
    assert "A validation." in (tmp_path / "e2e/devset.csv").read_text()
    assert run_get(monkeypatch, tmp_path, "e2e", E2E_ROWS)[0] == 0  # the same bytes again: left as they are
    assert "unchanged" in capsys.readouterr().out


def test_a_failed_write_leaves_no_file_and_no_temporary_file(monkeypatch, tmp_path, capsys):
    real, calls = data_cli.tempfile.mkstemp, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(data_cli.tempfile, "mkstemp", failing)
    code, _ = run_get(monkeypatch, tmp_path, "e2e", E2E_ROWS)
    assert "No space left on device" in one_line_refusal(capsys, code)
    assert files_under(tmp_path) == []


def test_default_folder_is_lrbench_data_dir_else_data(monkeypatch, tmp_path):
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "shared"))
    assert data_cli.target_folder(None) == tmp_path / "shared"
    monkeypatch.delenv("LRBENCH_DATA_DIR")
    assert str(data_cli.target_folder(None)) == "data"
    assert data_cli.target_folder(str(tmp_path)) == tmp_path


def test_a_hub_that_answers_but_fails_to_load_is_one_line_naming_the_dataset(monkeypatch, tmp_path, capsys):
    import datasets

    from lowrank_bench import hub

    def broken(**kwargs):
        raise ConnectionError("read timed out\nsecond line of a long report")

    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", broken)
    code = data_cli.main(["get", "wikitext-2", "--to", str(tmp_path / "data")])
    err = one_line_refusal(capsys, code)
    assert "Salesforce/wikitext (wikitext-2-v1, validation) could not be loaded: ConnectionError: read timed out" in err
    assert not (tmp_path / "data").exists()
