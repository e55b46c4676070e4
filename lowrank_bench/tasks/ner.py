"""Named-entity recognition as token classification: CoNLL-2003 and BioNLP 2004 (JNLPBA), from local CoNLL-format
files or the Hub, scored with seqeval's entity-level micro precision, recall and F1 (conlleval semantics).

Sources. Local files: `task.data_dir`, else `$LRBENCH_DATA_DIR/<task.shared_folder>`; per split the first existing
name of `task.files` (CoNLL: `train.txt`, `valid.txt`/`dev.txt`, `test.txt`). One token per line, whitespace-
separated columns, the tag in the last one, a blank line between sentences; lines starting with a marker of
`task.skip_lines` (`-DOCSTART-`, JNLPBA's `###MEDLINE:`) are not tokens. A test file beside the train and
validation files becomes an extra evaluation split (`test_f1`, ...) by itself; the validation split keeps the plain
names (`f1`, ...), so `task.metric: f1` picks the best evaluation. Without a local folder, the Hub dataset
`task.hub.dataset` (its splits `task.hub.splits`), with the fast offline failure of every task family.
`task.source`: auto (that order; a set LRBENCH_DATA_DIR without the task's folder is an error), local or hub.

Tags are IOB2 inside the project. A source in IOB1 (`task.scheme: iob1`: I-X opens an entity, B-X only separates
two adjacent entities of one type) is converted when read. The label set is the training data's tags (with the Hub
features' names), each type as both B- and I-, ordered O, then by type.

Sub-words. Every tokenizer family gets each word as it appears inside running text after a space, found once per
tokenizer by a probe: byte-level BPE (RoBERTa, GPT-2) needs the space ("Ġword", what `add_prefix_space=True` does
for every word, the first included); WordPiece and SentencePiece take the word alone (SentencePiece adds its own
"▁"). The words are tokenised in one batched call, then framed by the tokenizer's own special tokens. Transformers 5
does not raise for byte-level BPE given `is_split_into_words=True` without `add_prefix_space`: it tokenises each
word as if it continued the previous one ("rejects" -> "re", "ject", "s"), so we never rely on it. A word's label
sits on its first sub-token, the others get -100 (`task.label_all_tokens: true` labels them too, B-X continued as
I-X, as in transformers' run_ner). A word that yields no sub-token at all becomes the unknown token.

Evaluation: one tag per word, the argmax at its first sub-token. Words past `max_length` (the sentence is cut at a
word boundary) are predicted O and keep their gold tags: a truncated entity counts as missed, never dropped. How
many sentences and words that affects is printed when the data is prepared. Metrics: `f1`, `precision`, `recall`
(entities, micro), `accuracy` (words), `per_type` (F1 per entity type; a dict, so not a result column) and
`degenerate` (every word got the same tag).
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.text import Text

from lowrank_bench import distributed, hub, progress
from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.models import Head
from lowrank_bench.tasks.base import Example, Task, cached, fingerprint, local_data_folder, pad_batch, read_text

TAG = re.compile(r"O|[BI]-\S+")
SCHEMES = ("iob1", "iob2")
METRICS = ("f1", "precision", "recall", "accuracy")
MODEL_KEYS = ("input_ids", "attention_mask", "labels")  # token_type_ids: all zero for one sentence, the default
FORMAT = "one token per line with its tag in the last column, a blank line between sentences"


# -- tags ---------------------------------------------------------------------------------------------------------
def check_tag(tag: str, where: str) -> str:
    if not TAG.fullmatch(tag):
        raise LrbenchError(f"{where}: tag {tag!r} is not IOB: expected O, B-<type> or I-<type>")
    return tag


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """I-X that opens an entity (after O or another type) becomes B-X; B-X, which IOB1 uses only between two
    adjacent entities of one type, stays."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def i_starts(tags: list[str]) -> int:
    """Entities opened by I- (not valid IOB2, the sign of an IOB1 source)."""
    return sum(t.startswith("I-") and p[2:] != t[2:] for p, t in zip(["O", *tags], tags))


def label_order(tags) -> list[str]:
    """O, then per entity type (sorted) B- and I-: both, even if the training data never shows one of them."""
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O", *(f"{prefix}-{kind}" for kind in types for prefix in "BI")]


# -- reading ------------------------------------------------------------------------------------------------------
def read_conll(path: Path, skip: tuple[str, ...]) -> list[Example]:
    """Sentences `{"words", "tags"}` of a CoNLL-format file; a malformed line (or an empty file, or bytes that are not
    UTF-8) raises, naming file:line."""
    text = read_text(path)
    sentences, words, tags = [], [], []
    width = first = None
    for number, line in enumerate(text.split("\n"), start=1):
        columns = line.split()
        if not columns:
            if words:
                sentences.append({"words": words, "tags": tags})
                words, tags = [], []
            continue
        if skip and line.lstrip().startswith(skip):
            continue
        if len(columns) < 2:
            raise LrbenchError(f"{path}:{number}: malformed line with 1 column; expected {FORMAT}")
        if width is None:
            width, first = len(columns), number
        elif len(columns) != width:
            raise LrbenchError(f"{path}:{number}: malformed line with {len(columns)} columns; expected {width} as "
                               f"on line {first} (the tag in the last column)")
        words.append(columns[0])
        tags.append(check_tag(columns[-1], f"{path}:{number}"))
    if words:
        sentences.append({"words": words, "tags": tags})
    if not sentences:
        raise LrbenchError(f"{path}: empty file: no sentences; expected {FORMAT}")
    return sentences


# -- sub-words ----------------------------------------------------------------------------------------------------
def word_prefix(tokenizer) -> str:
    """"" or " ": what a word needs in front so that, tokenised alone, it gives the sub-tokens it has inside running
    text after a space. Probed, not looked up by tokenizer class."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    anchor, inside = ids("a"), ids("a the")
    if inside[:len(anchor)] == anchor:
        for prefix in ("", " "):
            if ids(prefix + "the") == inside[len(anchor):]:
                return prefix
    raise LrbenchError(f"the tokenizer {tokenizer.name_or_path!r} tokenises a word alone unlike inside a sentence, "
                       "with or without a leading space: pre-split words cannot be aligned with its sub-tokens")


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sentence ([CLS] ... [SEP], <s> ... </s>, BOS, or none)."""
    bare, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise LrbenchError(f"the tokenizer {tokenizer.name_or_path!r} changes a sentence's tokens when it adds its "
                       "special tokens: cannot frame pre-split words")


def word_pieces(tokenizer, sentences: list[list[str]]) -> list[list[list[int]]]:
    """The sub-token ids of every word of every sentence, in one batched call."""
    prefix = word_prefix(tokenizer)
    flat = [prefix + word for words in sentences for word in words]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    unk = tokenizer.unk_token_id
    ids = [piece or ([unk] if unk is not None else []) for piece in ids]
    out, start = [], 0
    for words in sentences:
        out.append(ids[start:start + len(words)])
        start += len(words)
    return out


def align(pieces: list[list[int]], label_ids: list[int], budget: int, continuation: dict[int, int] | None):
    """Sub-token ids, their labels and each word's first position (-1: not in the input), at most `budget` ids.
    The sentence is cut at a word boundary. `continuation` (label_all_tokens) labels a word's other sub-tokens,
    B-X as I-X; None leaves them -100."""
    ids, labels, starts = [], [], []
    for i, (piece, label) in enumerate(zip(pieces, label_ids)):
        if len(ids) + len(piece) > budget:
            starts += [-1] * (len(pieces) - i)
            break
        if not piece:
            starts.append(-1)
            continue
        starts.append(len(ids))
        rest = -100 if continuation is None or label == -100 else continuation.get(label, label)
        ids += piece
        labels += [label] + [rest] * (len(piece) - 1)
    return ids, labels, starts


# -- metrics ------------------------------------------------------------------------------------------------------
def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """seqeval's default mode (conlleval's chunking: an I-X after O opens an entity), micro-averaged."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    report = classification_report(gold, pred, output_dict=True, zero_division=0) if any(
        t != "O" for s in gold + pred for t in s) else {}
    return {"f1": float(f1_score(gold, pred, zero_division=0)),
            "precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "accuracy": float(accuracy_score(gold, pred)),
            "per_type": {k: float(v["f1-score"]) for k, v in report.items() if not k.endswith(" avg")},
            "degenerate": len({t for s in pred for t in s}) <= 1}


# -- the cache ----------------------------------------------------------------------------------------------------
def pack(features: list[dict]) -> dict[str, object]:
    """Features as a few flat tensors: torch's weights-only unpickler takes seconds over CoNLL-2003's 14,041
    sentences as nested lists, milliseconds as tensors."""
    def flat(key):
        return torch.tensor([v for f in features for v in f[key]], dtype=torch.long)

    names = sorted({t for f in features for t in f["tags"]})
    index = {t: i for i, t in enumerate(names)}
    return {"input_ids": flat("input_ids"), "labels": flat("labels"), "starts": flat("starts"),
            "tags": torch.tensor([index[t] for f in features for t in f["tags"]], dtype=torch.long),
            "tag_names": names,
            "tokens": torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long),
            "words": torch.tensor([len(f["tags"]) for f in features], dtype=torch.long)}


def unpack(packed: dict[str, object]) -> list[dict]:
    columns = {k: packed[k].tolist() for k in ("input_ids", "labels", "starts", "tags")}
    names = packed["tag_names"]
    out, token, word = [], 0, 0
    for tokens, words in zip(packed["tokens"].tolist(), packed["words"].tolist()):
        ids = columns["input_ids"][token:token + tokens]
        out.append({"input_ids": ids, "attention_mask": [1] * tokens,
                    "labels": columns["labels"][token:token + tokens],
                    "starts": columns["starts"][word:word + words],
                    "tags": [names[t] for t in columns["tags"][word:word + words]]})
        token, word = token + tokens, word + words
    return out


def warn(message: str) -> None:
    console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True)


class NerTask(Task):
    """The head (`token_classification`, one output per label) is known once `prepare` has read the label set."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.name
        self.metric = self.option("metric", METRICS)
        self.scheme = self.option("scheme", SCHEMES)
        self.label_all_tokens = bool(cfg.get("label_all_tokens"))
        self.skip = tuple(str(s) for s in cfg.get("skip_lines") or ())
        self.labels: list[str] = []
        self.folder = self.local_folder()
        self.paths = self.local_files() if self.folder else {}
        self.eval_splits = self.evaluation_splits()
        self.cut: dict[str, tuple[int, int]] = {}  # split -> (sentences, words) not wholly in the input
        self.raw: dict[str, list[Example]] = {}
        self.feature_names: list[str] = []  # the Hub's tag names, which the training data may not all show

    def option(self, key: str, valid) -> str:
        value = self.cfg.get(key)
        if value not in valid:
            raise LrbenchError(f"task.{key}={value!r} is not one of: {choices(valid)}")
        return value

    @property
    def head(self) -> Head:
        if not self.labels:
            raise RuntimeError(f"{self.name}: the head is known once prepare() has read the label set")
        return Head("token_classification", len(self.labels))

    # -- where the data is ------------------------------------------------------------------------------------
    def local_folder(self) -> Path | None:
        return local_data_folder(self.cfg, self.cfg.get("shared_folder") or self.name, self.layout())

    def layout(self) -> str:
        files = {split: "|".join(names) for split, names in self.cfg.files.items()}
        return (f"a folder with {files.get('train')} and {files.get('validation')}, optionally {files.get('test')}, "
                f"in CoNLL format: {FORMAT}")

    def local_files(self) -> dict[str, Path]:
        """train and validation, which must exist, then any other split whose file is there (test)."""
        paths = {}
        for split, names in self.cfg.files.items():
            found = [self.folder / n for n in names if (self.folder / n).is_file()]
            if found:
                paths[split] = found[0]
            elif split in (self.train_split, "validation"):
                raise LrbenchError(f"{self.name}: no {split} file in {self.folder} (looked for "
                                   f"{', '.join(names)}); expected {self.layout()}")
        return {self.train_split: paths.pop(self.train_split), "validation": paths.pop("validation"), **paths}

    def evaluation_splits(self) -> tuple[str, ...]:
        """validation first (its metrics keep the plain names), then any other split of the source."""
        splits = list(self.paths or self.cfg.hub.splits)
        if "validation" not in splits:
            raise LrbenchError(f"{self.name}: task.hub.splits names no validation split (found {splits})")
        return ("validation", *(s for s in splits if s not in (self.train_split, "validation")))

    def source_id(self) -> str:
        if self.folder is None:
            spec = self.cfg.hub
            return repr((spec.dataset, spec.get("revision"), dict(spec.splits), spec.tokens, spec.tags,
                         list(spec.label_names or [])))
        return repr([(split, str(p), p.stat().st_size, p.stat().st_mtime_ns) for split, p in self.paths.items()])

    def raw_split(self, split: str) -> list[Example]:
        """Sentences with IOB2 tags, whichever the source's scheme."""
        if split not in self.raw:
            sentences = read_conll(self.paths[split], self.skip) if self.folder else self.read_hub(split)
            where = str(self.paths[split]) if self.folder else f"{self.cfg.hub.dataset} {split}"
            if self.scheme == "iob1":
                sentences = [{"words": s["words"], "tags": iob1_to_iob2(s["tags"])} for s in sentences]
            elif (count := sum(i_starts(s["tags"]) for s in sentences)):
                warn(f"{where}: {count} entities open with I- although task.scheme=iob2 (conlleval reads them as "
                     "entities); if the source is IOB1, set task.scheme=iob1")
            self.raw[split] = sentences
        return self.raw[split]

    def read_hub(self, split: str) -> list[Example]:
        spec = self.cfg.hub
        name, source = str(spec.dataset), str(spec.splits[split])
        ds = hub.load_dataset(name, split=source, revision=spec.get("revision"), shown=name,
                              local_copy=f"A local folder holds {self.layout()}.")
        names = self.hub_names(ds)
        self.feature_names = list(names or self.feature_names)
        sentences = []
        for row, (words, raw) in enumerate(zip(ds[spec.tokens], ds[spec.tags]), start=1):
            where = f"{name} {source} row {row}"
            if len(words) != len(raw):
                raise LrbenchError(f"{where}: {len(words)} tokens but {len(raw)} tags")
            if not words:  # the Hub's CoNLL-2003 once had an empty example
                continue
            if names is not None:
                bad = [v for v in raw if not 0 <= int(v) < len(names)]
                if bad:
                    raise LrbenchError(f"{where}: tag id {bad[0]} outside the {len(names)} label names")
                raw = [names[int(v)] for v in raw]
            sentences.append({"words": [str(w) for w in words], "tags": [check_tag(str(t), where) for t in raw]})
        if not sentences:
            raise LrbenchError(f"{name} {source}: no sentences")
        return sentences

    def hub_names(self, ds) -> list[str] | None:
        """Tag names for tag ids: `task.hub.label_names`, else the features' ClassLabel names; None: string tags."""
        spec = self.cfg.hub
        if spec.get("label_names"):
            return [check_tag(str(t), f"task.hub.label_names of {spec.dataset}") for t in spec.label_names]
        features = getattr(ds, "features", None)  # datasets' Features: a dict of column -> feature
        feature = features.get(spec.tags) if features is not None else None
        names = getattr(getattr(feature, "feature", None), "names", None)  # a sequence of ClassLabel
        if names:
            return [check_tag(str(t), f"{spec.dataset} features") for t in names]
        column = ds[spec.tags]
        if any(isinstance(v, int) for tags in column for v in tags):
            raise LrbenchError(f"{spec.dataset}: the column {spec.tags!r} holds tag ids without names; list them in "
                               "task.hub.label_names, in id order")
        return None

    # -- tokenising -------------------------------------------------------------------------------------------
    def encoding_id(self) -> str:
        return repr((type(self).__name__, 2, self.labels, self.label_all_tokens, self.scheme, self.skip))

    def prepare(self, tokenizer, max_length: int) -> None:
        """The label set (cached), then the splits (base class: tokenised once, cached), then the truncation report."""
        key = fingerprint(self.name, "labels", self.source_id(), self.scheme, self.skip)
        self.labels = cached(key, self.read_labels)
        super().prepare(tokenizer, max_length)
        self.report(max_length)

    def label_names(self) -> list[str]:
        return list(self.labels)  # known once prepared (the training data's tags)

    def read_labels(self) -> list[str]:
        tags = {t for s in self.raw_split(self.train_split) for t in s["tags"]}
        return label_order(tags | set(self.feature_names))

    def encode(self, tokenizer, examples: list[Example], max_length: int) -> dict[str, object]:
        """Every sentence as features (`pack`ed for the cache): input ids, labels, each word's first position (-1:
        cut) and the gold tags of every word."""
        before, after = special_tokens(tokenizer)
        budget = max_length - len(before) - len(after)
        if budget < 1:
            raise LrbenchError(f"max_length={max_length} leaves no room for words beside the tokenizer's "
                               f"{len(before) + len(after)} special tokens")
        label_of = {t: i for i, t in enumerate(self.labels)}
        continuation = None
        if self.label_all_tokens:
            continuation = {i: label_of.get("I-" + t[2:], i) for t, i in label_of.items() if t.startswith("B-")}
        out = []
        for sentence, pieces in zip(examples, word_pieces(tokenizer, [e["words"] for e in examples])):
            ids, labels, starts = align(pieces, [label_of.get(t, -100) for t in sentence["tags"]], budget,
                                        continuation)
            input_ids = before + ids + after
            out.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
                        "labels": [-100] * len(before) + labels + [-100] * len(after),
                        "starts": [s + len(before) if s >= 0 else -1 for s in starts], "tags": sentence["tags"]})
        return pack(out)

    def subsample(self, examples, split: str) -> list[dict]:
        # every split passes here, freshly encoded or read from the cache: unpacked first, then the fixed subset
        return super().subsample(unpack(examples), split)

    def report(self, max_length: int) -> None:
        """Say how many sentences lost words to `max_length`, and how many gold tags the model cannot predict."""
        for split, examples in self.splits.items():
            cut = [e["starts"].count(-1) for e in examples]
            self.cut[split] = (sum(n > 0 for n in cut), sum(cut))
            if self.cut[split][0]:
                scored = "predicted O and still scored" if split != self.train_split else "not trained on"
                warn(f"{self.name} {split}: {self.cut[split][0]} of {len(examples)} sentences longer than "
                     f"max_length={max_length} sub-tokens were truncated; their {self.cut[split][1]} words past the "
                     f"limit are {scored}")
            unknown = sum(t not in self.labels for e in examples for t in e["tags"])
            if unknown and split != self.train_split:
                warn(f"{self.name} {split}: {unknown} words carry a tag the training data never shows "
                     f"(labels: {', '.join(self.labels)}); their entities count as missed")

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch([{k: f[k] for k in MODEL_KEYS} for f in features], self.pad_id, label_pad=-100)

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, split: str, batch_size: int, device, autocast) -> tuple[list, list]:
        """Gold and predicted tags per word, every word of every sentence (O for those not in the input)."""
        was_training = model.training
        model.eval()
        examples, gold, pred = self.splits[split], [], []
        for rows in progress.track(distributed.eval_batches(len(examples), batch_size), f"evaluating {self.name}"):
            chunk = examples[rows.start:rows.stop]
            batch = {k: v.to(device) for k, v in self.collate(chunk).items() if k != "labels"}
            with autocast():
                best = model(**batch).logits.argmax(-1).tolist()
            for example, row in zip(chunk, best):
                gold.append(example["tags"])
                pred.append([self.labels[row[p]] if p >= 0 else "O" for p in example["starts"]])
        model.train(was_training)
        dp = distributed.current()  # every rank's share: the whole split, in order
        return dp.gather_shares(gold), dp.gather_shares(pred)

    def evaluate(self, model, split: str, batch_size: int = 64, device="cpu", autocast=None) -> dict:
        gold, pred = self.predict(model, split, batch_size, device, autocast or nullcontext)
        return entity_scores(gold, pred)

    def evaluate_all(self, model, **kwargs) -> dict:
        """The validation split under the plain names (`f1`: the best evaluation), the others prefixed (`test_f1`)."""
        main, *others = self.eval_splits
        out = self.evaluate(model, main, **kwargs)
        for split in others:
            out.update({f"{split}_{k}": v for k, v in self.evaluate(model, split, **kwargs).items()})
        return out
