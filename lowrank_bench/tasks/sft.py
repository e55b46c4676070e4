"""Instruction tuning (SFT) of decoder LMs on CoLA's six low-sample domains (arXiv 2505.15471; digest §4.2).

`task=sft/<domain>`: generality (databricks-dolly-15k), law (us_terms + Lawyer-Instruct), medicine (iCliniq +
GenMedGPT-5k), math (GSM8K train), finance (FinEval train in English), multitask (OpenOrca). Each domain lists its
datasets (`task.sources`); CoLA's recipe on top is `lowrank_bench/conf/experiment/cola/<model>_<domain>.yaml`.

Where a dataset comes from, first match wins:
1. `task.files`: explicit JSON / JSONL / CSV files, which then *are* the sources (one dataset per file);
2. `task.data_dir`, else `$LRBENCH_DATA_DIR/sft` (a set LRBENCH_DATA_DIR without it is an error, as in every
   family; `task.source=hub` skips this step, `task.source=local` requires a file for every dataset):
   `<folder>/<source.file>.{json,jsonl,csv}`; the file stems are
   those of CoLA's `LLaMA-Factory/data/` (`databricks-dolly-15k`, `Lawyer-Instruct`, `us_terms`, `iCliniq`,
   `GenMedGPT-5k`, `gsm8k_train`, `fineval_train-en`), so `task.data_dir=<CoLA>/LLaMA-Factory/data` reads the
   paper's files;
3. the Hub (`source.hub`, `hub_config`, `hub_split`), with the fast offline failure of every task family. Sources
   with no known Hub copy (us_terms, iCliniq, GenMedGPT-5k, the English FinEval) are local only.
Columns: each role (instruction, input, output, system) takes the first of its candidate column names present
(`task.columns`, per source `source.columns`, defaults in `DEFAULT_COLUMNS`: Alpaca's instruction/input/output,
prompt/response, dolly's context, OpenOrca's question/system_prompt, ...). A file without a column for the
instruction or the output is an error that names the file, the candidates and the columns found.

Selection (LLaMA-Factory's loader, which CoLA used): `max_samples` rows *per dataset*, the first N in file order
(`sample: first`, the paper: no shuffle) or a seeded random N (`sample: seeded`, `sample_seed`); the datasets are
concatenated; a seeded split (`split_seed`, LLaMA-Factory's default seed 42) holds out ceil(val_fraction * n)
examples as the `validation` split (the paper: val_size 0.1).

Rendering. One turn: user = instruction, plus "\n" + input when there is one; optional system; response = output.
`template`:
- `chat`: the tokenizer's chat template (`apply_chat_template`); the prompt is the conversation up to and with the
  generation prompt, the response is what the full conversation adds after it (its end-of-turn tokens included). A
  template whose full rendering does not start with its prompt rendering is refused;
- `llama3`: LLaMA-Factory's `llama3` template, the paper's (`<|begin_of_text|>`, header blocks, `<|eot_id|>`),
  for base Llama-3 checkpoints whatever their tokenizer carries (Llama-3.1/3.2 chat templates add a dated system
  prompt that LLaMA-Factory's does not);
- `plain`: "[system\n\n]### Instruction:\n{user}\n\n### Response:\n" (Alpaca's headers; LLaMA-Factory's own
  plain template is "Human: ...\nAssistant:"), framed by the tokenizer's own special tokens: those it puts before
  a text start the prompt, those it puts after end the response (else its eos token);
- `none`: the user text as it is (after the system text and a blank line, if any), framed like `plain`: for data
  that carries its own format, and for lm-eval's harness prompts in the multiple-choice evaluator;
- `auto` (default): `chat` when the tokenizer has a chat template, else `plain`.
The prompt and the response are tokenised apart (no special tokens added) and concatenated, as LLaMA-Factory does.

Labels: -100 on every prompt token, the response tokens (end-of-turn included) as they are; the causal LM's loss is
the mean next-token cross-entropy over the labelled tokens of the batch (the HF model's shift). With gradient
accumulation the trainer averages the micro-batch means; HF's Trainer (>= 4.46) divides by the token count of the
whole accumulated batch instead.

Truncation to the cutoff c = `max_length` (null: model.max_length): LLaMA-Factory's rule for a prompt of s tokens
and a response of t: t' = min(t, c) if 2t < c, else min(t, c - s) if 2s < c, else min(t, floor(c t / (s + t)));
s' = min(s, c - t'); both are cut at their ends. Examples whose response is empty (in the data, or after this cut)
would train nothing: they are left out, counted and reported (a warning at preparation, `result_counts()` for the
result row), or refused with `empty_response: error`. `packing: true` packs whole examples greedily (longest first,
first fit) into sequences of at most c tokens, labels kept per example; attention then crosses example boundaries,
as in LLaMA-Factory's packing without `neat_packing`.

Evaluation at the trainer's eval points, on the held-out split: `eval_loss` (mean cross-entropy over response
tokens), `perplexity` = exp(eval_loss) and `token_accuracy` (next-token argmax over response tokens), the metric
that picks the best evaluation (higher is better, which the trainer assumes). Multiple-choice benchmarks are
`lowrank_bench.mc_eval` (`eval=mc/<benchmark>`).

`gradient_checkpointing: true` turns on the model's (non-reentrant) activation checkpointing at the first
training step (a task switch until the trainer has one).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.text import Text

from lowrank_bench import distributed, hub, progress
from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.models import Head
from lowrank_bench.tasks.base import Task, data_source, local_data_folder, read_text

TEMPLATES = ("auto", "chat", "llama3", "plain", "none")
SAMPLING = ("first", "seeded")
EMPTY_RESPONSE = ("drop", "error")
EXTENSIONS = (".json", ".jsonl", ".csv")
ROLES = ("instruction", "input", "output", "system")
REQUIRED = ("instruction", "output")
DEFAULT_COLUMNS = {
    "instruction": ("instruction", "prompt", "question", "query"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion"),
    "system": ("system", "system_prompt"),
}
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
IGNORE = -100

# why an example trains nothing, or less than it has (bit flags, kept in the cached encoding)
EMPTY_IN_DATA, EMPTIED_BY_CUTOFF, TRUNCATED = 1, 2, 4


@dataclass(frozen=True)
class Turn:
    user: str
    response: str
    system: str | None = None


# -- templates ---------------------------------------------------------------------------------------------------
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(name: str, tokenizer, setting: str = "task.template") -> str:
    """The concrete template (`chat`, `llama3`, `plain` or `none`) for `name`; one the tokenizer lacks is an error."""
    if name not in TEMPLATES:
        raise LrbenchError(f"{setting}={name!r} is not one of: {choices(TEMPLATES)}")
    if name == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if name == "chat" and not has_chat_template(tokenizer):
        raise LrbenchError(f"{setting}=chat but the tokenizer {tokenizer.name_or_path!r} has no chat template; "
                           f"choose one of: auto, llama3, none, plain")
    if name == "llama3":
        vocab = tokenizer.get_vocab()
        missing = [t for t in LLAMA3_TOKENS if t not in vocab]
        if missing:
            raise LrbenchError(f"{setting}=llama3 but the tokenizer {tokenizer.name_or_path!r} lacks {missing}; "
                               f"choose one of: auto, chat, none, plain")
    return name


def template_id(tokenizer, template: str) -> str:
    """What the rendering depends on beyond the tokenizer's vocabulary: part of the cache key."""
    chat = tokenizer.chat_template if template == "chat" else ""
    return f"{template}:{hashlib.sha1(str(chat).encode()).hexdigest()[:12]}"


def special_framing(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text on its own (BERT: [CLS] / [SEP]; Llama-3:
    <|begin_of_text|> / none; GPT-2 and SmolLM2: none / none), found by a probe."""
    framed = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start:start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare):]
    return [], []


def end_of_response(tokenizer) -> list[int]:
    """What closes a response under the plain template: the tokenizer's trailing specials, else its eos."""
    trailing = special_framing(tokenizer)[1]
    if trailing:
        return trailing
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def messages(turn: Turn, with_response: bool) -> list[dict]:
    out = [{"role": "system", "content": turn.system}] if turn.system else []
    out.append({"role": "user", "content": turn.user})
    if with_response:
        out.append({"role": "assistant", "content": turn.response})
    return out


def prompt_text(tokenizer, template: str, turn: Turn) -> str:
    """The text before the response: what a model reads before it answers (special tokens written as text)."""
    if template == "chat":
        return tokenizer.apply_chat_template(messages(turn, False), tokenize=False, add_generation_prompt=True)
    if template == "llama3":
        system = (f"<|start_header_id|>system<|end_header_id|>\n\n{turn.system}<|eot_id|>" if turn.system else "")
        return (f"<|begin_of_text|>{system}<|start_header_id|>user<|end_header_id|>\n\n{turn.user}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    lead = "".join(tokenizer.convert_ids_to_tokens(special_framing(tokenizer)[0]))
    system = f"{turn.system}\n\n" if turn.system else ""
    if template == "none":
        return f"{lead}{system}{turn.user}"
    return f"{lead}{system}### Instruction:\n{turn.user}\n\n### Response:\n"


def chat_response_text(tokenizer, turn: Turn) -> str:
    prompt = prompt_text(tokenizer, "chat", turn)
    full = tokenizer.apply_chat_template(messages(turn, True), tokenize=False)
    if not full.startswith(prompt):
        raise LrbenchError(f"the chat template of {tokenizer.name_or_path!r} renders a conversation that does not "
                           f"start with its own generation prompt, so the response cannot be told apart; use "
                           f"task.template=plain or task.template=llama3")
    return full[len(prompt):]


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def turn_ids(tokenizer, template: str, turn: Turn) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids), tokenised apart; the response ends with the template's end of turn."""
    prompt = encode_text(tokenizer, prompt_text(tokenizer, template, turn))
    if template == "chat":
        return prompt, encode_text(tokenizer, chat_response_text(tokenizer, turn))
    if template == "llama3":
        return prompt, encode_text(tokenizer, turn.response + "<|eot_id|>")
    return prompt, encode_text(tokenizer, turn.response) + end_of_response(tokenizer)


# -- truncation and packing -----------------------------------------------------------------------------------------
def cutoff_lengths(prompt_len: int, response_len: int, cutoff: int) -> tuple[int, int]:
    """LLaMA-Factory's split of the cutoff between prompt and response (module docstring)."""
    if 2 * response_len < cutoff:
        budget = cutoff
    elif 2 * prompt_len < cutoff:
        budget = cutoff - prompt_len
    else:
        budget = cutoff * response_len // (prompt_len + response_len)
    response = min(budget, response_len)
    return min(max(cutoff - response, 0), prompt_len), response


def encode_turn(tokenizer, template: str, turn: Turn, cutoff: int) -> dict:
    prompt, response = turn_ids(tokenizer, template, turn)
    keep_prompt, keep_response = cutoff_lengths(len(prompt), len(response), cutoff)
    flags = EMPTY_IN_DATA if not turn.response.strip() else 0
    if keep_response == 0:
        flags |= EMPTIED_BY_CUTOFF
    if (keep_prompt, keep_response) != (len(prompt), len(response)):
        flags |= TRUNCATED
    ids = prompt[:keep_prompt] + response[:keep_response]
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE] * keep_prompt + response[:keep_response], "flags": flags}


def pack(examples: list[dict], cutoff: int) -> list[dict]:
    """Whole examples into sequences of at most `cutoff` tokens: longest first, each into the first that fits."""
    bins: list[dict] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        target = next((b for b in bins if len(b["input_ids"]) + len(example["input_ids"]) <= cutoff), None)
        if target is None:
            bins.append({k: list(v) for k, v in example.items()})
        else:
            for key in target:
                target[key] += example[key]
    return bins


# -- reading -------------------------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """Rows of a JSON (a list of objects), JSON Lines or CSV file, every CSV cell as written (strings)."""
    suffix = path.suffix.lower()
    text = read_text(path)  # an empty file, or bytes that are not UTF-8: file:line
    try:
        if suffix == ".csv":
            import io

            import pandas as pd

            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False).to_dict("records")
        if suffix == ".jsonl":
            return [json_line(path, number, line) for number, line in enumerate(text.splitlines(), start=1)
                    if line.strip()]
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise LrbenchError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
    except ValueError as err:
        raise LrbenchError(f"{path}: malformed {suffix[1:].upper()} ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LrbenchError(f"{path}: a JSON file must hold a list of objects (one per example)")
    return rows


def json_line(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise LrbenchError(f"{path}:{number}: malformed JSON line ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict):
        raise LrbenchError(f"{path}:{number}: a JSON Lines file holds one object per line (one example)")
    return row


def column_map(found: list[str], candidates: dict[str, tuple[str, ...]], where: str) -> dict[str, str]:
    """Role -> the first of its candidate columns that is present; instruction and output must be."""
    mapping = {}
    for role in ROLES:
        column = next((c for c in candidates[role] if c in found), None)
        if column is None and role in REQUIRED:
            raise LrbenchError(f"{where}: no column for the {role} (looked for {list(candidates[role])}); found "
                               f"{found}; map it with task.columns.{role}=<column>")
        if column is not None:
            mapping[role] = column
    return mapping


def text_of(value) -> str:
    return "" if value is None else str(value)


def to_turns(rows: list[dict], candidates: dict[str, tuple[str, ...]], where: str) -> list[Turn]:
    if not rows:
        raise LrbenchError(f"{where}: no rows")
    mapping = column_map(list(rows[0]), candidates, where)
    turns = []
    for row in rows:
        instruction, extra = text_of(row.get(mapping["instruction"])), text_of(row.get(mapping.get("input")))
        user = f"{instruction}\n{extra}" if extra.strip() else instruction
        turns.append(Turn(user, text_of(row.get(mapping["output"])), text_of(row.get(mapping.get("system"))) or None))
    return turns


def select_rows(rows: list, limit: int | None, mode: str, seed: int) -> list:
    """`max_samples` of one dataset: the first N rows, or a seeded random N kept in file order."""
    if not limit or limit >= len(rows):
        return rows
    if mode == "first":
        return rows[:limit]
    chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in chosen]


def holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices: a seeded permutation, ceil(fraction n) held out; each kept in data order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = math.ceil(fraction * n)
    return sorted(order[n_val:]), sorted(order[:n_val])


def warn(message: str) -> None:
    console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True)


@dataclass(frozen=True)
class Source:
    name: str
    path: Path | None  # a local file; None: the Hub
    hub: str | None
    hub_config: str | None
    hub_split: str | None
    columns: dict[str, tuple[str, ...]]

    def identity(self) -> str:
        if self.path is not None:
            stat = self.path.stat()
            return repr((str(self.path), stat.st_size, stat.st_mtime_ns))
        return repr((self.hub, self.hub_config, self.hub_split))


def candidates_from(*overrides) -> dict[str, tuple[str, ...]]:
    """DEFAULT_COLUMNS with configured names put first (a string or a list per role; later overrides win)."""
    merged = dict(DEFAULT_COLUMNS)
    for override in overrides:
        for role, names in dict(override or {}).items():
            if role not in ROLES:
                raise LrbenchError(f"task.columns.{role}: unknown role; valid: {choices(ROLES)}")
            names = [names] if isinstance(names, str) else list(names)
            merged[role] = tuple(names)
    return merged


class SftTask(Task):
    """One or more instruction datasets -> causal-LM training with the loss on response tokens only."""

    head = Head("causal_lm")
    metric = "token_accuracy"
    train_split = "train"
    eval_splits = ("validation",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.name
        self.check_settings()
        self.sources = self.resolve_sources()
        self.template: str | None = None  # resolved against the tokenizer in `prepare`
        self.template_key = ""
        self.max_length = 0
        self._raw: dict[str, list[Turn]] | None = None
        self.counts: dict[str, Counter] = {}
        self._checkpointing_on = False

    # -- settings ---------------------------------------------------------------------------------------------
    def check_settings(self) -> None:
        c = self.cfg
        for key, valid in (("template", TEMPLATES), ("sample", SAMPLING), ("empty_response", EMPTY_RESPONSE)):
            if c[key] not in valid:
                raise LrbenchError(f"task.{key}={c[key]!r} is not one of: {choices(valid)}")
        if not 0 < float(c.val_fraction) < 1:
            raise LrbenchError(f"task.val_fraction={c.val_fraction}: the trainer evaluates on the held-out split; "
                               f"choose 0 < val_fraction < 1")
        if c.max_samples is not None and int(c.max_samples) < 1:
            raise LrbenchError(f"task.max_samples={c.max_samples}: choose a positive number of rows per dataset, "
                               f"or null for all")

    def resolve_sources(self) -> list[Source]:
        c = self.cfg
        task_columns = c.get("columns")
        source = data_source(c) or "auto"
        if c.files:
            if source == "hub":
                raise LrbenchError(f"task.files lists local files but task.source=hub reads the Hub only; drop one "
                                   f"of them")
            paths = [Path(str(p)).expanduser() for p in c.files]
            for path in paths:
                if not path.is_file():
                    raise LrbenchError(f"task.files: no such file {path}")
                if path.suffix.lower() not in EXTENSIONS:
                    raise LrbenchError(f"task.files: {path} is not one of {', '.join(EXTENSIONS)}")
            return [Source(p.stem, p, None, None, "train", candidates_from(task_columns)) for p in paths]
        folder = self.local_folder()
        sources = []
        for s in c.sources:
            path = self.local_file(folder, s)
            if path is None and source == "local":
                raise LrbenchError(f"{self.name}: task.source=local but dataset {s.name!r} has no local file in "
                                   f"{folder} (looked for {s.file}{{{','.join(EXTENSIONS)}}})")
            if path is None and source == "hub" and not s.get("hub"):
                raise LrbenchError(f"{self.name}: task.source=hub but dataset {s.name!r} has no Hub copy; choose "
                                   f"task.source=auto or local and put {s.file}.json in task.data_dir")
            if path is None and not s.get("hub"):
                where = f"task.data_dir={folder}" if folder else "no task.data_dir"
                raise LrbenchError(f"{self.name}: dataset {s.name!r} has no Hub copy and no local file ({where}); put "
                                   f"{s.file}.json (CoLA: LLaMA-Factory/data/{s.file}.json) in task.data_dir, or "
                                   f"list your own files in task.files=[...]")
            hub_split = s.hub_split if s.get("hub") else None  # a Hub copy names its split in the YAML
            sources.append(Source(s.name, path, s.get("hub"), s.get("hub_config"), hub_split,
                                  candidates_from(s.get("columns"), task_columns)))
        return sources

    def local_folder(self) -> Path | None:
        return local_data_folder(self.cfg, "sft", "the domain's JSON/JSONL/CSV files")

    @staticmethod
    def local_file(folder: Path | None, source) -> Path | None:
        if folder is None or not source.get("file"):
            return None
        candidates = (folder / f"{source.file}{ext}" for ext in EXTENSIONS)
        return next((path for path in candidates if path.is_file()), None)

    def source_id(self) -> str:
        c = self.cfg
        return repr(([s.identity() for s in self.sources], [sorted(s.columns.items()) for s in self.sources],
                     c.max_samples, c.sample, c.sample_seed, float(c.val_fraction), c.split_seed))

    def encoding_id(self) -> str:
        return f"{type(self).__name__}:v1:{self.template_key}"

    # -- raw data ---------------------------------------------------------------------------------------------
    def raw_split(self, split: str) -> list[Turn]:
        if self._raw is None:
            self._raw = self.read_all()
        return self._raw[split]

    def read_all(self) -> dict[str, list[Turn]]:
        c = self.cfg
        turns: list[Turn] = []
        for source in self.sources:
            limit = int(c.max_samples) if c.max_samples else None
            if source.path is not None:
                rows = select_rows(read_records(source.path), limit, c.sample, c.sample_seed)
                turns += to_turns(rows, source.columns, str(source.path))
            else:
                rows = select_rows(self.read_hub(source, limit), limit, c.sample, c.sample_seed)
                turns += to_turns(rows, source.columns, f"{source.hub} ({source.hub_split})")
        train, validation = holdout(len(turns), float(c.val_fraction), c.split_seed)
        return {"train": [turns[i] for i in train], "validation": [turns[i] for i in validation]}

    def read_hub(self, source: Source, limit: int | None) -> list[dict]:
        """The Hub dataset's rows; with `sample: first` only the first `limit`, streamed (OpenOrca has 4M)."""
        first = limit if limit and self.cfg.sample == "first" else None
        return list(hub.load_dataset(path=source.hub, name=source.hub_config, split=source.hub_split, first=first,
                                     shown=source.hub,
                                     local_copy=f"A local copy is a JSON/JSONL/CSV file named {source.name} with "
                                                "instruction and output columns (or prompt/response)."))

    # -- encoding ---------------------------------------------------------------------------------------------
    def prepare(self, tokenizer, max_length: int) -> None:
        self.template = resolve_template(self.cfg.template, tokenizer)
        self.template_key = template_id(tokenizer, self.template)
        self.max_length = int(max_length)
        super().prepare(tokenizer, max_length)

    def encode(self, tokenizer, examples: list[Turn], max_length: int) -> list[dict]:
        return [encode_turn(tokenizer, self.template, turn, max_length) for turn in examples]

    def subsample(self, examples: list[dict], split: str) -> list[dict]:
        """Every split passes here, freshly encoded or from the cache: count and leave out the empty responses,
        then the base class's `max_*_samples` subset, then packing."""
        counts = Counter({"examples": len(examples)})
        kept = []
        for example in examples:
            flags = example["flags"]
            counts["empty_in_data"] += bool(flags & EMPTY_IN_DATA)
            counts["emptied_by_cutoff"] += bool(flags & EMPTIED_BY_CUTOFF and not flags & EMPTY_IN_DATA)
            counts["truncated"] += bool(flags & TRUNCATED)
            if not flags & (EMPTY_IN_DATA | EMPTIED_BY_CUTOFF):
                kept.append({k: v for k, v in example.items() if k != "flags"})
        self.counts[split] = counts
        self.report_empty(split, counts)
        kept = super().subsample(kept, split)
        if not kept:
            raise LrbenchError(f"{self.name}: the {split} split has no example with a response to train on")
        return pack(kept, self.max_length) if self.cfg.packing else kept

    def report_empty(self, split: str, counts: Counter) -> None:
        empty = counts["empty_in_data"] + counts["emptied_by_cutoff"]
        if not empty:
            return
        message = (f"{self.name}: {empty} of {counts['examples']} {split} example(s) have an empty response "
                   f"({counts['empty_in_data']} in the data, {counts['emptied_by_cutoff']} after the cutoff of "
                   f"{self.max_length} tokens)")
        if self.cfg.empty_response == "error":
            raise LrbenchError(message + "; fix the data or raise task.max_length, or set task.empty_response=drop")
        warn(message + "; left out of training and evaluation")

    def result_counts(self) -> dict[str, int]:
        """Counts for the result row: examples kept per split, responses left out, examples cut."""
        out = {}
        for split, counts in self.counts.items():
            out[f"sft_{split}_examples"] = counts["examples"] - counts["empty_in_data"] - counts["emptied_by_cutoff"]
            out[f"sft_{split}_empty_responses"] = counts["empty_in_data"] + counts["emptied_by_cutoff"]
            out[f"sft_{split}_truncated"] = counts["truncated"]
        return out

    # -- training and evaluation ------------------------------------------------------------------------------
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.gradient_checkpointing and not self._checkpointing_on:
            enable_gradient_checkpointing(model)
            self._checkpointing_on = True
        return model(**batch, use_cache=False).loss

    @torch.no_grad()
    def evaluate(self, model, split: str, batch_size: int = 64, device="cpu", autocast=None) -> dict[str, float]:
        """Response-token cross-entropy, perplexity and next-token accuracy over the split."""
        was_training = model.training
        model.eval()
        sums = []  # per batch: (summed NLL, right next tokens, scored tokens)
        for batch in progress.track(self.eval_loader(split, self.cfg.eval_batch_size or batch_size),
                                    f"evaluating {self.name}"):
            batch = {k: v.to(device) for k, v in batch.items()}
            with (autocast or nullcontext)():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
            labels = batch["labels"][:, 1:]
            scored = labels != IGNORE
            chosen = logits[:, :-1][scored].float()  # only the labelled positions, then fp32
            sums.append((torch.nn.functional.cross_entropy(chosen, labels[scored], reduction="sum").item(),
                         (chosen.argmax(-1) == labels[scored]).sum().item(), int(scored.sum())))
        model.train(was_training)
        nll, correct, tokens = 0.0, 0, 0
        for batch_nll, batch_correct, batch_tokens in distributed.current().gather_shares(sums):
            nll, correct, tokens = nll + batch_nll, correct + batch_correct, tokens + batch_tokens  # in split order
        loss = nll / max(tokens, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1)}


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on the HF model inside `model` (a PEFT wrapper's base model too):
    works with a frozen embedding, no `enable_input_require_grads` needed."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(hf_model, "gradient_checkpointing_enable"):
        raise LrbenchError(f"task.gradient_checkpointing=true but {type(hf_model).__name__} does not support it; "
                           f"set it to false")
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False
