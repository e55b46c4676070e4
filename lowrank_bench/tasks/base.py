"""The task interface: splits tokenised once (and cached on disk), dynamic-padding collation, the head the model
needs, the training loss and `evaluate(model, split) -> {metric: value}` with the official metric names.

A classification task only has to say where its raw examples come from (`raw_split`) and which metrics it reports
(`compute_metrics`); `ClassificationTask` does the rest. Token classification, generation, continual sequences
and instruction tuning override `encode`, `loss` and `evaluate` on the same interface.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lowrank_bench import distributed, metrics, progress
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import Head
from lowrank_bench.models import cache_dir as models_cache_dir

Example = dict  # raw: {"text": str, "text_pair": str | None, "label": int | float}


def cache_dir() -> Path:
    return models_cache_dir()


#: the data folder a saved run recorded, while it is evaluated again (`recorded_data_dir`)
_recorded: list[str] = []


def data_dir() -> Path | None:
    """$LRBENCH_DATA_DIR, which must exist when set (a typo must not fall back to the Hub in silence); unset, the
    folder a saved run recorded while it is evaluated again (`recorded_data_dir`)."""
    value = os.environ.get("LRBENCH_DATA_DIR")
    if not value:
        return recorded_folder()
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise LrbenchError(f"LRBENCH_DATA_DIR={value}: no such folder (unset it to use the Hub, or point it at the "
                           f"shared data folder)")
    return folder


def recorded_folder() -> Path | None:
    """The folder `recorded_data_dir` holds, if it is still there (gone, the run is read as if none was recorded: a
    task that needs no data still runs, one that does says how to point at its files)."""
    folder = Path(_recorded[-1]) if _recorded else None
    return folder if folder and folder.is_dir() else None


def data_dir_record() -> str | None:
    """What a run's config_resolved.yaml records as `data_dir`: the data folder it reads, absolute, or None."""
    folder = data_dir()
    return str(folder.resolve()) if folder else None


@contextmanager
def recorded_data_dir(value: str | None):
    """While a saved run is evaluated again: with LRBENCH_DATA_DIR unset, its data comes from `value` (the folder its
    config_resolved.yaml records as `data_dir`; None: no folder, as it ran). A set LRBENCH_DATA_DIR wins."""
    if not value:
        yield
        return
    _recorded.append(str(value))
    try:
        yield
    finally:
        _recorded.pop()


def read_text(path: Path) -> str:
    """A data file's text: an empty file or bytes that are not UTF-8 are errors naming the file (and line)."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise LrbenchError(f"{path}: the file is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise LrbenchError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}); save the file as UTF-8") from None


def check_text(path: Path) -> Path:
    """`read_text`'s checks alone, for a reader that parses the file itself (pandas, the csv module)."""
    read_text(path)
    return path


#: `task.source`: where a family with both reads its data
SOURCES = ("auto", "local", "hub")


def data_source(cfg, group: str = "task") -> str | None:
    """`<group>.source` checked: auto (local data when found, else the Hub), local (local files only) or hub (the
    Hub only). None when the config has no such key (eval/mc): the look-up of `local_data_folder` without its
    strictness."""
    if "source" not in cfg:
        return None
    value = cfg.get("source")
    if value is None:
        return "auto"
    if value not in SOURCES:
        raise LrbenchError(f"{group}.source={value}: must be auto, local or hub")
    return value


def shared_data_folder(cfg, shared_subpath: str, expected: str, group: str = "task", hub: bool = True) -> Path | None:
    """With no `<group>.data_dir`: `$LRBENCH_DATA_DIR/<shared_subpath>` when that exists, else None (the Hub).

    A set LRBENCH_DATA_DIR that lacks the folder is an error under `source: auto` too, never a silent fall-back to
    the Hub (`source: hub` is the way to ask for the Hub); so is `source: local` with no local data at all. `hub`:
    whether the family has a Hub copy to point to."""
    source = data_source(cfg, group)
    shared = data_dir()
    if shared and (shared / shared_subpath).is_dir():
        return shared / shared_subpath
    if source is None or source == "auto" and shared is None:
        return None
    instead = f", or {group}.source=hub to read the Hub" if hub else ""
    if shared is None:
        raise LrbenchError(f"{group}.source=local but there is no local data: set {group}.data_dir=<a folder with "
                           f"{expected}>, or LRBENCH_DATA_DIR (read from $LRBENCH_DATA_DIR/{shared_subpath}){instead}")
    raise LrbenchError(f"LRBENCH_DATA_DIR={shared} has no folder {shared_subpath} (expected {expected}); add it or "
                       f"set {group}.data_dir=<folder>{instead}")


def built_in_data(cfg, what: str) -> None:
    """A family whose data comes with the code or an installed package: `task.source`, if given (a continual
    sequence's `every_stage.source`), can only be auto."""
    source = data_source(cfg)
    if source not in (None, "auto"):
        raise LrbenchError(f"task.source={source} does not apply to {cfg.get('name')}, whose data {what}; leave it at "
                           f"auto")


def hub_only(cfg, group: str = "task", hub: bool = True) -> bool:
    """Whether `<group>.source=hub`; refused for data with no Hub copy, and next to a `<group>.data_dir`."""
    if data_source(cfg, group) != "hub":
        return False
    if not hub:
        raise LrbenchError(f"{group}.source=hub: this data has no Hub copy; choose {group}.source=auto or local")
    if cfg.get("data_dir"):
        raise LrbenchError(f"{group}.data_dir={cfg.data_dir} is a local folder but {group}.source=hub reads the Hub "
                           f"only; drop one of them")
    return True


def local_data_folder(cfg, shared_subpath: str, expected: str, group: str = "task", hub: bool = True) -> Path | None:
    """`<group>.data_dir` when set (it must exist), else `$LRBENCH_DATA_DIR/<shared_subpath>` (`shared_data_folder`),
    else None (the Hub, where the family has one). `<group>.source=hub` skips the local look-up. `expected` says what
    the folder should hold, for the error."""
    if hub_only(cfg, group, hub):
        return None
    configured = cfg.get("data_dir")
    if configured:
        folder = Path(str(configured)).expanduser()
        if not folder.is_dir():
            raise LrbenchError(f"{group}.data_dir={configured}: no such folder (expected {expected})")
        return folder
    return shared_data_folder(cfg, shared_subpath, expected, group, hub)


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_id(tokenizer) -> str:
    return f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"


def cached(key: str, build):
    """Load `key` from the on-disk cache, or build it and store it atomically (safe under concurrent runs)."""
    path = cache_dir() / "tokenized" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a corrupt or foreign file: rebuild it
            pass
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def pad_batch(features: list[dict], pad_id: int, label_pad: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding)."""
    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key == "labels" and not isinstance(features[0][key], list):
            dtype = torch.float32 if isinstance(features[0][key], float) else torch.long
            batch[key] = torch.tensor([f[key] for f in features], dtype=dtype)
            continue
        fill = pad_id if key == "input_ids" else (label_pad if key == "labels" else 0)
        batch[key] = torch.tensor([f[key] + [fill] * (longest - len(f[key])) for f in features], dtype=torch.long)
    return batch


class Task:
    name = "task"
    head = Head("sequence_classification")
    metric = "accuracy"  # the metric that picks the best evaluation
    train_split = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    shuffle_train = True  # False: every training pass in file order (continual `train_rows: first`)

    def __init__(self, cfg):
        self.cfg = cfg
        self.splits: dict[str, list[dict]] = {}
        self.pad_id = 0

    # -- what a task adds to its run (declared here; a family overrides what it uses) -----------------------------
    def use_run_folder(self, folder: Path) -> None:
        """The run's folder, for a task that writes files of its own there (E2E's generations)."""

    def result_counts(self) -> dict[str, int]:
        """Counts the task adds to the run's result row (SFT: examples kept, left out, cut)."""
        return {}

    def label_names(self) -> list[str] | None:
        """The classes' names in id order (an exported model's id2label); None where they have none."""
        return None

    # -- data ---------------------------------------------------------------------------------------------------
    def raw_split(self, split: str) -> list[Example]:
        raise NotImplementedError

    def source_id(self) -> str:
        """Where the raw data comes from, for the cache key (a path or a Hub name)."""
        raise NotImplementedError

    def encode(self, tokenizer, examples: list[Example], max_length: int) -> list[dict]:
        raise NotImplementedError

    def prepare(self, tokenizer, max_length: int) -> None:
        """Tokenise every split once; later runs with the same data and tokenizer read the cache."""
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for split in (self.train_split, *self.eval_splits):
            key = fingerprint(self.name, split, self.source_id(), tokenizer_id(tokenizer), max_length, self.encoding_id())
            encoded = cached(key, lambda: self.encode(tokenizer, self.raw_split(split), max_length))
            self.splits[split] = self.subsample(encoded, split)

    def encoding_id(self) -> str:
        return type(self).__name__

    def subsample(self, examples: list[dict], split: str) -> list[dict]:
        limit = self.cfg.get("max_train_samples" if split == self.train_split else "max_eval_samples")
        if not limit or limit >= len(examples):
            return examples
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)  # a fixed subset, the same for every method and seed
        return [examples[i] for i in sorted(order[:limit])]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(features, self.pad_id, label_pad=-100)

    def train_examples(self) -> list[dict]:
        return self.splits[self.train_split]

    @staticmethod
    def batch_size_of(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    # -- training and evaluation --------------------------------------------------------------------------------
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def loader(self, split: str, batch_size: int, shuffle: bool = False, generator=None) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                          generator=generator)

    def eval_loader(self, split: str, batch_size: int) -> DataLoader:
        """This rank's share of the split's evaluation batches, in order (distributed.eval_batches: the batches one
        process makes; all of them in one process). What it yields is gathered with `DataParallel.gather_shares`."""
        batches = distributed.eval_batches(len(self.splits[split]), batch_size)
        return DataLoader(self.splits[split], batch_sampler=[list(b) for b in batches], collate_fn=self.collate)

    def evaluate(self, model, split: str, batch_size: int = 64, device="cpu", autocast=None) -> dict[str, float]:
        raise NotImplementedError

    def evaluate_all(self, model, **kwargs) -> dict[str, float]:
        """Metrics of every evaluation split; with several splits each name is prefixed (MNLI: matched_accuracy)."""
        if len(self.eval_splits) == 1:
            return self.evaluate(model, self.eval_splits[0], **kwargs)
        out = {}
        for split in self.eval_splits:
            out.update({f"{split}_{k}": v for k, v in self.evaluate(model, split, **kwargs).items()})
        return out


class ClassificationTask(Task):
    """Single sentences or sentence pairs -> one label (or one score, for regression)."""

    def encode(self, tokenizer, examples: list[Example], max_length: int) -> list[dict]:
        if not examples:
            return []
        pairs = examples[0].get("text_pair") is not None
        enc = tokenizer(
            [e["text"] for e in examples],
            [e["text_pair"] for e in examples] if pairs else None,
            truncation=True, max_length=max_length,
        )
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [dict({k: enc[k][i] for k in keys}, labels=e["label"]) for i, e in enumerate(examples)]

    @torch.no_grad()
    def predict(self, model, split: str, batch_size: int, device, autocast) -> tuple[list, list]:
        was_training = model.training
        model.eval()
        preds, labels = [], []
        for batch in progress.track(self.eval_loader(split, batch_size), f"evaluating {self.name}"):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            preds += (logits.squeeze(-1) if self.head.regression else logits.argmax(-1)).tolist()
            labels += batch["labels"].tolist()
        model.train(was_training)
        dp = distributed.current()  # every rank's share: the whole split, in order
        return dp.gather_shares(preds), dp.gather_shares(labels)

    def evaluate(self, model, split: str, batch_size: int = 64, device="cpu", autocast=None) -> dict:
        """The official metrics, and for classifiers the confusion matrix (rows: true labels) and whether every
        prediction was the same class (`degenerate`: a constant predictor, whatever its accuracy)."""
        preds, labels = self.predict(model, split, batch_size, device, autocast or nullcontext)
        out = self.compute_metrics(preds, labels)
        if not self.head.regression:
            out["confusion"] = metrics.confusion(preds, labels, self.head.num_labels)
            out["predicted"] = [sum(p == c for p in preds) for c in range(self.head.num_labels)]  # the histogram
            out["degenerate"] = metrics.is_degenerate(preds)
        return out

    def compute_metrics(self, preds: list, labels: list) -> dict[str, float]:
        return {"accuracy": metrics.accuracy(preds, labels)}


def check_label(value, valid, where: str):
    if value not in valid:
        raise LrbenchError(f"{where}: malformed label {value!r}; expected one of {sorted(valid)}")
    return value
