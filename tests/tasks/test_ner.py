"""NER: CoNLL-format reading and its errors, IOB1 -> IOB2, sub-word alignment for WordPiece and byte-level BPE,
seqeval scores on a hand-computed case, truncated words still scored, the test split found by itself, the Hub
(stand-in and offline), and every method end to end with encoders and decoders."""
from __future__ import annotations

import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench import hub
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import load_tokenizer
from lowrank_bench.results import read_rows
from lowrank_bench.tasks import build, ner
from lowrank_bench.tasks.ner import NerTask, entity_scores, iob1_to_iob2, read_conll
from lowrank_bench.train import run
from tests.conftest import CONF, DATA, compose_cfg, model_cfg, needs_data
from tests.test_cli import FAST, METHODS, lrbench

TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""
VALID = """-DOCSTART- -X- -X- O

Nadim NNP B-NP B-PER
Ladki NNP I-NP I-PER
visited VBD B-VP O
Farrakhan NNP B-NP B-PER
in IN B-PP O
Loughborough NNP B-NP B-LOC
"""


@pytest.fixture(scope="module")
def wordpiece():
    return load_tokenizer(model_cfg("tiny-roberta"))  # the MiniLM WordPiece tokenizer (uncased)


def task_cfg(name: str = "conll2003", **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "task" / "ner" / f"{name}.yaml"), overrides)


def write_conll(folder, test: str | None = None, train: str = TRAIN, valid: str = VALID):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(train, encoding="utf-8")
    (folder / "valid.txt").write_text(valid, encoding="utf-8")
    if test is not None:
        (folder / "test.txt").write_text(test, encoding="utf-8")
    return folder


def sentence_task(tmp_path, words, tags, **overrides) -> NerTask:
    """A task whose validation split is one hand-made sentence (labels from TRAIN: LOC, MISC, ORG, PER)."""
    valid = "\n".join(f"{w} {t}" for w, t in zip(words, tags)) + "\n"
    train = "\n".join(line.split()[0] + " " + line.split()[-1] if line.strip() else ""
                      for line in TRAIN.splitlines()) + "\n"
    return build(task_cfg(data_dir=str(write_conll(tmp_path / "sentence", train=train, valid=valid)), **overrides))


class Oracle(torch.nn.Module):
    """Predicts every sub-token's gold label (O where it has none): a perfect tagger of what it sees."""

    def __init__(self, task: NerTask, split: str):
        super().__init__()
        self.gold = {tuple(e["input_ids"]): e["labels"] for e in task.splits[split]}
        self.num_labels = len(task.labels)

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.num_labels)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            labels = self.gold[tuple(ids[:sum(mask)])]
            for position, label in enumerate(labels):
                logits[row, position, max(label, 0)] = 1.0
        return type("Output", (), {"logits": logits})


# -- configs and reading ------------------------------------------------------------------------------------------
def test_every_ner_config_builds_its_task(tmp_path):
    folder = write_conll(tmp_path / "data")
    for name in ("conll2003", "bionlp2004"):
        task = build(task_cfg(name, data_dir=str(folder)))
        assert isinstance(task, NerTask) and task.name == f"ner/{name}" and task.metric == "f1"
        assert task.eval_splits == ("validation",) and task.folder == folder
        assert compose_cfg(f"task=ner/{name}").task.name == f"ner/{name}"  # `# @package task`
    assert task.skip == ("-DOCSTART-", "###MEDLINE:")
    assert task.cfg.hub.label_names[:3] == ["O", "B-DNA", "I-DNA"]


def test_reads_sentences_skipping_markers_with_the_tag_in_the_last_column(tmp_path):
    path = write_conll(tmp_path) / "train.txt"
    assert read_conll(path, ("-DOCSTART-",)) == [
        {"words": ["EU", "rejects", "German", "call", "."], "tags": ["B-ORG", "O", "B-MISC", "O", "O"]},
        {"words": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"words": ["BRUSSELS", "1996-08-22"], "tags": ["B-LOC", "O"]},
    ]
    jnlpba = tmp_path / "jnlpba.txt"  # tab-separated, two columns, MEDLINE markers
    jnlpba.write_text("###MEDLINE:95369245\n\nIL-2\tB-DNA\ngene\tI-DNA\n\n\n\nNF-kappa\tB-protein\n")
    assert read_conll(jnlpba, ("###MEDLINE:",)) == [{"words": ["IL-2", "gene"], "tags": ["B-DNA", "I-DNA"]},
                                                    {"words": ["NF-kappa"], "tags": ["B-protein"]}]


@pytest.mark.parametrize("text,message", [
    ("EU NNP B-NP B-ORG\nrejects VBZ O\n", r"train.txt:2: malformed line with 3 columns; expected 4 as on line 1"),
    ("EU B-ORG\nrejects\n", r"train.txt:2: malformed line with 1 column; expected one token per line"),
    ("EU NNP B-NP B-ORG\n\nrejects VBZ B-VP E-ORG\n", r"train.txt:3: tag 'E-ORG' is not IOB: expected O, B-<type>"),
    ("EU NNP B-NP ORG\n", r"train.txt:1: tag 'ORG' is not IOB"),
    ("", r"train.txt: the file is empty"),
    ("-DOCSTART- -X- -X- O\n\n\n", r"train.txt: empty file: no sentences"),
])
def test_bad_input_names_the_file_and_line(tmp_path, text, message):
    task = build(task_cfg(data_dir=str(write_conll(tmp_path, train=text))))
    with pytest.raises(LrbenchError, match=message):
        task.raw_split("train")


def test_missing_folder_and_files_say_what_is_expected(tmp_path):
    with pytest.raises(LrbenchError, match=r"task.data_dir=.*: no such folder \(expected a folder with train.txt"):
        build(task_cfg(data_dir=str(tmp_path / "nope")))
    (tmp_path / "train.txt").write_text(TRAIN)
    with pytest.raises(LrbenchError, match=r"no validation file in .* \(looked for valid.txt, dev.txt\)"):
        build(task_cfg(data_dir=str(tmp_path)))


def test_iob1_becomes_iob2():
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC"]) == ["B-PER", "I-PER", "O", "B-LOC"]
    # IOB1's B- separates two adjacent entities of one type; a type change opens an entity by itself
    assert iob1_to_iob2(["I-ORG", "B-ORG", "I-ORG", "I-LOC", "I-LOC"]) == ["B-ORG", "B-ORG", "I-ORG", "B-LOC",
                                                                            "I-LOC"]
    assert iob1_to_iob2(["O", "O"]) == ["O", "O"]


def test_iob1_source_is_converted_and_its_label_set_complete(tmp_path, wordpiece):
    iob1 = "U.N. NNP I-NP I-ORG\nofficial NN I-NP O\nEkeus NNP I-NP I-PER\nheads VBZ I-VP O\n"
    task = build(task_cfg(data_dir=str(write_conll(tmp_path, train=iob1)), scheme="iob1"))
    assert task.raw_split("train")[0]["tags"] == ["B-ORG", "O", "B-PER", "O"]
    task.prepare(wordpiece, 32)
    assert task.labels == ["O", "B-ORG", "I-ORG", "B-PER", "I-PER"]  # each type as B- and I-
    assert task.head.kind == "token_classification" and task.head.num_labels == 5


def test_iob1_read_as_iob2_is_flagged(tmp_path, capsys):
    iob1 = "U.N. NNP I-NP I-ORG\nofficial NN I-NP O\n"
    build(task_cfg(data_dir=str(write_conll(tmp_path, train=iob1)))).raw_split("train")
    assert "1 entities open with I- although task.scheme=iob2" in capsys.readouterr().err


# -- sub-word alignment -------------------------------------------------------------------------------------------
def test_wordpiece_alignment_labels_the_first_sub_token(tmp_path, wordpiece):
    words = ["EU", "rejects", "Farrakhan", "1996-08-22", "Lebed", "\u200b"]
    tags = ["B-ORG", "O", "B-PER", "O", "B-PER", "O"]
    task = sentence_task(tmp_path, words, tags)
    task.prepare(wordpiece, 64)
    example = task.splits["validation"][0]
    assert wordpiece.convert_ids_to_tokens(example["input_ids"]) == [
        "[CLS]", "eu", "rejects", "far", "##rak", "##han", "1996", "-", "08", "-", "22", "le", "##bed", "[UNK]",
        "[SEP]"]
    o, org, per = (task.labels.index(t) for t in ("O", "B-ORG", "B-PER"))
    assert example["labels"] == [-100, org, o, per, -100, -100, o, -100, -100, -100, -100, per, -100, o, -100]
    assert example["starts"] == [1, 2, 3, 6, 11, 13]
    # the same sub-tokens as the tokenizer's own pre-split path (fine for WordPiece), which drops the empty word
    reference = wordpiece(words[:-1], is_split_into_words=True)
    assert reference["input_ids"][:-1] == example["input_ids"][:-2]
    word_ids = reference.word_ids()
    assert [word_ids.index(i) for i in range(5)] == example["starts"][:5]


def test_label_all_tokens_continues_b_as_i(tmp_path, wordpiece):
    task = sentence_task(tmp_path, ["Farrakhan", "Loughborough"], ["B-PER", "B-LOC"], label_all_tokens=True)
    task.prepare(wordpiece, 64)
    per, i_per, loc, i_loc = (task.labels.index(t) for t in ("B-PER", "I-PER", "B-LOC", "I-LOC"))
    assert task.splits["validation"][0]["labels"] == [-100, per, i_per, i_per, loc, i_loc, -100]


@needs_data
def test_byte_level_bpe_gives_every_word_its_leading_space(tmp_path):
    """GPT-2's BPE (RoBERTa's too) marks a word start with Ġ: each word is tokenised as after a space, like
    `add_prefix_space=True`, which transformers 5 ignores for a tokenizer loaded by AutoTokenizer from a folder."""
    from transformers import GPT2Tokenizer

    bpe = load_tokenizer(model_cfg("tiny-gpt2-bpe"))
    words = ["EU", "rejects", "Farrakhan", "1996-08-22", "Lebed"]
    task = sentence_task(tmp_path, words, ["B-ORG", "O", "B-PER", "O", "B-PER"])
    task.prepare(bpe, 64)
    example = task.splits["validation"][0]
    assert bpe.convert_ids_to_tokens(example["input_ids"]) == [
        "ĠEU", "Ġrejects", "ĠFar", "rak", "han", "Ġ1996", "-", "08", "-", "22", "ĠLe", "bed"]
    o, org, per = (task.labels.index(t) for t in ("O", "B-ORG", "B-PER"))
    assert example["labels"] == [org, o, per, -100, -100, o, -100, -100, -100, -100, per, -100]
    assert example["starts"] == [0, 1, 2, 5, 10]  # GPT-2 adds no special tokens
    reference = GPT2Tokenizer.from_pretrained(DATA / "tokenizers" / "gpt2", add_prefix_space=True)
    assert reference(words, is_split_into_words=True)["input_ids"] == example["input_ids"]


def test_sentencepiece_words_take_their_own_word_start_marker():
    """A SentencePiece (Metaspace) tokenizer, trained here in milliseconds: each word alone already starts with ▁,
    so no space is added, and the words' pieces are exactly those of the sentence as running text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = ["EU rejects German call to boycott British lamb .", "Peter Blackburn", "BRUSSELS 1996-08-22"]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(sentences * 20, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1),
                                                                                               ("</s>", 2)])
    spm = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>")
    words = ["EU", "rejects", "Blackburn", "1996-08-22"]
    assert ner.word_prefix(spm) == "" and ner.special_tokens(spm) == ([1], [2])
    pieces = ner.word_pieces(spm, [words])[0]
    assert all(spm.convert_ids_to_tokens(p)[0].startswith("▁") for p in pieces)
    assert [i for p in pieces for i in p] == spm(" ".join(words), add_special_tokens=False)["input_ids"]


# -- metrics ------------------------------------------------------------------------------------------------------
def test_seqeval_scores_on_a_hand_computed_case():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC", "O"], ["O", "I-ORG", "I-ORG", "O"]]
    # entities: gold PER 0-1, LOC 3, ORG 0-2; predicted PER 0-1 (right), LOC 3 (I- after O opens an entity in
    # conlleval: right), ORG 1-2 (wrong boundary). 2 of 3 right each way; words: 7 of 9 tags equal
    scores = entity_scores(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(7 / 9)
    assert scores["per_type"] == {"LOC": 1.0, "ORG": 0.0, "PER": 1.0} and scores["degenerate"] is False
    nothing = entity_scores(gold, [["O"] * 5, ["O"] * 4])
    assert (nothing["f1"], nothing["recall"], nothing["degenerate"]) == (0.0, 0.0, True)


def test_truncated_words_are_predicted_o_and_still_scored(tmp_path, wordpiece, capsys):
    words = ["EU", "rejects", "Farrakhan", "and", "Peter", "Blackburn"]
    task = sentence_task(tmp_path, words, ["B-ORG", "O", "B-PER", "O", "B-PER", "I-PER"])
    task.prepare(wordpiece, 8)  # [CLS] eu rejects far ##rak ##han and [SEP]: Peter Blackburn cut
    example = task.splits["validation"][0]
    assert example["starts"] == [1, 2, 3, 6, -1, -1] and len(example["input_ids"]) == 8
    assert task.cut["validation"] == (1, 2)
    assert "1 of 1 sentences longer than max_length=8 sub-tokens were truncated; their 2 words past the limit are " \
           "predicted O and still scored" in capsys.readouterr().err
    scores = task.evaluate(Oracle(task, "validation"), "validation")
    assert (scores["precision"], scores["recall"]) == (1.0, pytest.approx(2 / 3))  # the cut PER is missed
    assert scores["per_type"] == {"ORG": 1.0, "PER": pytest.approx(2 / 3)}


# -- splits, caching, the Hub -------------------------------------------------------------------------------------
def test_a_test_file_beside_them_becomes_an_evaluation_split(tmp_path, wordpiece):
    without = build(task_cfg(data_dir=str(write_conll(tmp_path / "a"))))
    assert without.eval_splits == ("validation",)
    task = build(task_cfg(data_dir=str(write_conll(tmp_path / "b", test=VALID + "\nEU NNP B-NP B-ORG\n"))))
    assert task.eval_splits == ("validation", "test")
    task.prepare(wordpiece, 32)
    assert (len(task.splits["validation"]), len(task.splits["test"])) == (1, 2)
    scores = task.evaluate_all(oracle_of(task, "validation", "test"), batch_size=1)
    assert {k for k in scores if not k.startswith("test_")} == {"f1", "precision", "recall", "accuracy",
                                                                 "per_type", "degenerate"}
    assert {k for k in scores if k.startswith("test_")} == {f"test_{k}" for k in scores if not k.startswith("test_")}
    assert scores["f1"] == scores["test_f1"] == 1.0 and set(scores["test_per_type"]) == {"LOC", "ORG", "PER"}


def oracle_of(task: NerTask, *splits: str) -> Oracle:
    oracle = Oracle(task, splits[0])
    for split in splits[1:]:
        oracle.gold.update(Oracle(task, split).gold)
    return oracle


def test_label_set_and_features_are_cached(tmp_path, wordpiece, monkeypatch):
    folder = write_conll(tmp_path)
    first = build(task_cfg(data_dir=str(folder)))
    first.prepare(wordpiece, 32)
    second = build(task_cfg(data_dir=str(folder)))
    monkeypatch.setattr(second, "raw_split", lambda split: pytest.fail(f"read {split} again"))
    second.prepare(wordpiece, 32)
    assert second.labels == first.labels and second.splits == first.splits
    batch = second.collate(second.splits["train"])
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["labels"][1, -1] == -100  # padded


def test_hub_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    task = build(task_cfg())
    assert task.folder is None and task.eval_splits == ("validation", "test")
    started = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)'eriktks/conll2003' is not in the local .*task.data_dir=.*"
                                           r"train.txt and valid.txt\|dev.txt"):
        task.raw_split("train")
    assert time.perf_counter() - started < 10


def test_hub_names_from_the_features_or_the_config(monkeypatch, wordpiece):
    """A stand-in for the Hub: ClassLabel names (CoNLL-2003), or ids named in the YAML (T-NER's BioNLP 2004)."""
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    rows = {"train": {"tokens": [["Peter", "Blackburn"], [], ["Paris"]], "ner_tags": [[1, 2], [], [3]]},
            "validation": {"tokens": [["Nadim", "visited", "Paris"]], "ner_tags": [[1, 0, 3]]},
            "test": {"tokens": [["Rome"]], "ner_tags": [[3]]}}
    calls = []

    def load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return datasets.Dataset.from_dict(rows[split], features=features)

    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = build(task_cfg())
    task.prepare(wordpiece, 32)
    assert task.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert [e["tags"] for e in task.splits["train"]] == [["B-PER", "I-PER"], ["B-LOC"]]  # the empty row left out
    assert calls[0] == ("eriktks/conll2003", "train", "refs/convert/parquet")
    bio = build(task_cfg("bionlp2004"))
    rows["train"] = {"tokens": [["IL-2", "gene"]], "tags": [[1, 2]]}
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.Value("int32"))})
    assert bio.raw_split("train") == [{"words": ["IL-2", "gene"], "tags": ["B-DNA", "I-DNA"]}]
    rows["train"]["tags"] = [[1, 11]]
    bio.raw.clear()
    with pytest.raises(LrbenchError, match=r"tner/bionlp2004 train row 1: tag id 11 outside the 11 label names"):
        bio.raw_split("train")


@needs_data
def test_reads_the_shared_conll2003():
    task = build(task_cfg())  # the folder comes from $LRBENCH_DATA_DIR
    assert task.folder == DATA / "conll2003" and task.eval_splits == ("validation",)  # no test.txt there
    train, valid = task.raw_split("train"), task.raw_split("validation")
    assert (len(train), len(valid)) == (14041, 3250)
    assert train[0] == {"words": ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
                        "tags": ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]}
    assert task.read_labels() == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


# -- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_decoders_tag_tokens_end_to_end(tmp_path, model):
    folder = write_conll(tmp_path / "data", test=VALID)
    cfg = compose_cfg(f"model={model}", "method=lora", "task=ner/conll2003", f"task.data_dir={folder}",
                      "trainer.max_steps=2", "trainer.progress=false", "save_adapter=false")
    summary = run(cfg, tmp_path / "run")
    assert summary["task"] == "ner/conll2003" and summary["metric"] == "f1"
    assert 0.0 <= summary["best_f1"] <= 1.0 and "best_test_f1" in summary
    assert summary["head_params"] == 32 * 9 + 9  # classifier (GPT-2) or score (Llama): hidden 32 -> 9 labels
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert isinstance(record["per_type"], dict) and isinstance(record["test_per_type"], dict)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())  # per-type F1 of the best and last evals
    assert written["last_per_type"] == record["per_type"] and written["last_test_per_type"] == record["test_per_type"]
    assert written["best_per_type"].keys() <= {"LOC", "MISC", "ORG", "PER"}


@needs_data
def test_every_method_runs_end_to_end(tmp_path):
    csv_path = tmp_path / "ner.csv"
    result = lrbench("-m", f"method={','.join(METHODS)}", "model=tiny-roberta", "task=ner/conll2003",
                     "task.max_train_samples=64", "task.max_eval_samples=32", *FAST, "trainer.max_steps=2",
                     "save_adapter=false", env={"LRBENCH_RESULTS_CSV": str(csv_path)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(csv_path)
    assert [r["method"] for r in rows] == METHODS
    assert all(r["task"] == "ner/conll2003" and r["metric"] == "f1" and 0.0 <= float(r["best_f1"]) <= 1.0
               and int(r["trainable_params"]) > 0 for r in rows)
    assert "best_per_type" not in rows[0]  # a dict, not a result column
