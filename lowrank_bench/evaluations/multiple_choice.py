"""0-shot multiple-choice evaluation of causal LMs: CoLA's protocol (LLaMA-Factory's letter scoring) and lm-eval.

`eval=mc/<benchmark>` (lowrank_bench/conf/eval/mc/): `mmlu` (all 57 subjects), `mmlu_law` and `mmlu_medicine` (the subject groups
of the digest, §4.2), `gsm8k` (GSM8K test rewritten as 4-option multiple choice, CoLA's CSV), `fineval` (English),
`bbh` (BIG-Bench Hard in multiple-choice form). After training (a post-training evaluation, evaluations/__init__.py;
also before it with `eval.before`) or alone on a base model or a run's adapter (mc_eval.py: `python -m
lowrank_bench.mc_eval eval=mc/mmlu model=smollm2-135m [eval.adapter=<run folder>]`).

Items. From `eval.files`, else `eval.data_dir`, else `$LRBENCH_DATA_DIR/mc/<benchmark>`, else the Hub (`eval.hub`:
MMLU only, `cais/mmlu`; the other benchmarks exist as multiple choice only in CoLA's repository, under
`LLaMA-Factory/evaluation/<benchmark>/`). A folder holds one file per subject, `<subject>.csv` or
`<subject>_test.csv` (MMLU's `data/test`), directly or in a `test/` subfolder (CoLA's layout), with an optional
`mapping.json` beside them ({subject: {name, category}}, CoLA's). CSV: a header with `question`, the option
columns `A`, `B`, ... and `answer` (other columns ignored), or no header: question, options, answer (MMLU's raw
files). JSON/JSONL: `question`, options as `A`, `B`, ... or a `choices` list, `answer` as a letter or an index, and
`subject` when one file holds several. Trailing empty options are absent (BBH items have 2 to 7); an answer that is
not the letter of one of the item's options is an error naming the file and row.

Prompt (LLaMA-Factory's `en` evaluation template as CoLA patched it, `eval.system`, `eval.choice_format`,
`eval.answer_prefix`): user message = "The following are multiple choice questions (with answers) about
{subject}. Please provide only the correct option (one uppercase letter).\\n\\n" + question + "\\nA. ..." ... +
"\\nAnswer:", rendered with the SFT template (`eval.template`, default `task.template`, see tasks/sft.py) up to the
assistant's turn. {subject} is the subject's name (mapping.json, else the file name with spaces), or
`eval.subject_name` (CoLA's evaluator: "math" for GSM8K, "finance" for FinEval).

Scoring (`backend: lrbench`, the default): with z the next-token logits after the prompt and t_L the last token of
encode(letter_prefix + L) (LLaMA-Factory: encode("A")[-1], no prefix), the prediction is argmax over the item's
letters L of z[t_L] (the softmax LLaMA-Factory takes first changes nothing). Prompts are batched with left padding
and explicit position ids, so that the scores do not depend on the batch. Accuracy per subject, `mc_accuracy` over
all items (LLaMA-Factory's "Average") and `mc_macro_accuracy` (the mean over subjects).

Deviations: CoLA's code scores the letters A-D only (`CHOICES`), so a BBH item whose answer is E or later is
always wrong; here every option of an item is scored, and `max_letters: 4` reproduces the code (such items are
counted as `mc_unscorable`). The options shown are then A-D too, as in LLaMA-Factory. Questions are not stripped.

`backend: lm_eval`: the same items through lm-evaluation-harness (`lm_eval.simple_evaluate` on
`HFLM(pretrained=<the in-memory model>)`, task configs built here over local JSONL files, so no Hub access):
- `lm_eval.prompt: harness`: lm-eval's MMLU format, the numbers the community reports: "The following are
  multiple choice questions (with answers) about {subject}.\\n\\n{question.strip()}\\nA. ...\\nAnswer:" and the
  continuation " A" (log-likelihood of each letter), no chat template unless `lm_eval.apply_chat_template`;
- `lm_eval.prompt: lrbench`: this module's prompts, the continuation letter_prefix + "A", context and continuation
  tokenised apart (lm-eval moves a trailing newline of the context into the continuation; this does not), so that
  both backends must agree.
A one-token letter's log-likelihood is z[t_L] - logsumexp(z), so its argmax is the default backend's.
"""
from __future__ import annotations

import csv
import io
import json
import re
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_bench import hub, progress
from lowrank_bench.console import console
from lowrank_bench.devices import autocast_for, pick_device
from lowrank_bench.errors import LrbenchError, choices, input_text
from lowrank_bench.extras import require
from lowrank_bench.tasks.base import local_data_folder
from lowrank_bench.tasks.sft import Turn, encode_text, prompt_text, resolve_template, special_framing

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BACKENDS = ("lrbench", "lm_eval")
LM_EVAL_PROMPTS = ("harness", "lrbench")
FILE_TYPES = (".csv", ".json", ".jsonl")
HARNESS_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclass(frozen=True)
class Item:
    subject: str
    question: str
    options: tuple[str, ...]  # the texts of A, B, ...
    answer: int  # index into options
    where: str  # file and row, for messages


# -- reading items -------------------------------------------------------------------------------------------------
def answer_index(value, n_options: int, where: str) -> int:
    """A letter ("C") or an index (2, "2") -> 0-based index; it must name one of the item's options."""
    text = str(value).strip()
    if text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    else:
        index = -1
    if not 0 <= index < n_options:
        raise LrbenchError(f"{where}: answer {text!r} is not the letter of one of the item's options "
                           f"{list(LETTERS[:n_options])}")
    return index


def present_options(cells: list, where: str) -> tuple[str, ...]:
    """Option texts with the trailing empty ones removed; an empty option before a filled one is an error."""
    texts = ["" if c is None else str(c) for c in cells]
    while texts and not texts[-1].strip():
        texts.pop()
    if len(texts) < 2:
        raise LrbenchError(f"{where}: an item needs at least two options, found {len(texts)}")
    if any(not t.strip() for t in texts):
        raise LrbenchError(f"{where}: option {LETTERS[[not t.strip() for t in texts].index(True)]} is empty")
    return tuple(texts)


def checked_subject(subject: str, where: str) -> str:
    """A subject named by the data (a `subject` column): a name, never a path. It is shown in tables and, slugged
    (`slug`), names lm-eval's task files; `..`, `/` and `\\` are refused here all the same."""
    if not subject.strip() or ".." in subject or any(c in subject for c in "/\\\0") or not subject.isprintable():
        raise LrbenchError(f"{where}: subject {subject!r} is not a subject name (it must not hold '..', '/', '\\' or "
                           "control characters); name it with letters, digits, spaces, '_' or '-', e.g. "
                           "high_school_biology")
    return subject


def slug(text: str) -> str:
    """A file-name-safe form of a subject: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:80] or "subject"


def item_from_record(record: dict, subject: str, where: str) -> Item:
    keys = {k.lower() if k.lower() in ("question", "answer", "choices", "subject") else k: v
            for k, v in record.items()}
    missing = [k for k in ("question", "answer") if k not in keys]
    if missing:
        raise LrbenchError(f"{where}: no {' or '.join(missing)} field; found {list(record)}")
    if "choices" in keys:
        cells = list(keys["choices"])
    else:  # the option columns A, B, ... up to the first letter missing
        cells = []
        for letter in LETTERS:
            if letter not in keys:
                break
            cells.append(keys[letter])
    options = present_options(cells, where)
    return Item(checked_subject(str(keys.get("subject") or subject), where), str(keys["question"]), options,
                answer_index(keys["answer"], len(options), where), where)


def read_csv_items(path: Path, subject: str) -> list[Item]:
    """A CSV with a header (question, A, B, ..., answer), or without one (MMLU: question, options..., answer)."""
    try:
        rows = [r for r in csv.reader(io.StringIO(input_text(path, "items file"), newline="")) if r]
    except csv.Error as err:
        raise LrbenchError(f"items file {path}: not a readable CSV ({err})") from None
    if not rows:
        raise LrbenchError(f"{path}: empty file")
    header = [c.strip() for c in rows[0]]
    lowered = [c.lower() for c in header]
    if "question" in lowered and "answer" in lowered:
        return [item_from_record(dict(zip(header, row)), subject, f"{path} row {i}")
                for i, row in enumerate(rows[1:], start=1)]
    items = []
    for i, row in enumerate(rows, start=1):
        where = f"{path} row {i}"
        options = present_options(row[1:-1], where)
        items.append(Item(subject, row[0], options, answer_index(row[-1], len(options), where), where))
    return items


def read_json_items(path: Path, subject: str) -> list[Item]:
    text = input_text(path, "items file")
    try:
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except ValueError as err:
        raise LrbenchError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(records, list):
        raise LrbenchError(f"{path}: expected a list of items")
    where = [f"{path} item {i}" for i in range(1, len(records) + 1)]
    not_objects = [w for w, r in zip(where, records) if not isinstance(r, dict)]
    if not_objects:
        raise LrbenchError(f"{not_objects[0]}: not an object with question, options and answer")
    return [item_from_record(r, subject, w) for w, r in zip(where, records)]


def read_items(path: Path) -> list[Item]:
    subject = path.stem.removesuffix("_test")
    items = read_csv_items(path, subject) if path.suffix.lower() == ".csv" else read_json_items(path, subject)
    if not items:
        raise LrbenchError(f"{path}: no items")
    return items


def subject_files(folder: Path) -> list[Path]:
    root = folder / "test" if (folder / "test").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in FILE_TYPES and p.name != "mapping.json")
    if not files:
        raise LrbenchError(f"{root}: no {'/'.join(FILE_TYPES)} files (one per subject, e.g. anatomy.csv)")
    return files


def read_mapping(folder: Path | None) -> dict:
    path = folder / "mapping.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        mapping = json.loads(input_text(path, "subject mapping"))
    except ValueError as err:
        raise LrbenchError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise LrbenchError(f"{path}: expected {{subject: {{name, category}}}}, as CoLA's mapping.json")
    return mapping


def read_hub_items(cfg) -> list[Item]:
    """MMLU's Hub layout (cais/mmlu): question, subject, choices (a list), answer (an index)."""
    rows = hub.load_dataset(path=cfg.hub, name=cfg.hub_config, split=cfg.hub_split, shown=cfg.hub,
                            override="eval.data_dir",
                            local_copy="A local copy is a folder of <subject>.csv files (question, A, B, C, D, answer).")
    return [item_from_record(dict(r), str(r.get("subject", cfg.name)), f"{cfg.hub} row {i}")
            for i, r in enumerate(rows, start=1)]


def local_folder(cfg) -> Path | None:
    return local_data_folder(cfg, f"mc/{cfg.benchmark}", "<subject>.csv files", group="eval")


def load_items(cfg) -> tuple[dict[str, list[Item]], dict]:
    """Items by subject (sorted), each subject's first `max_items`; and the mapping.json entries, if any."""
    folder = None
    if cfg.files:
        paths = [Path(str(p)).expanduser() for p in cfg.files]
        for path in paths:
            if path.is_dir():
                raise LrbenchError(f"eval.files: {path} is a folder; give its files, or eval.data_dir={path}")
            if not path.is_file():
                raise LrbenchError(f"eval.files: no such file {path}")
            if path.suffix.lower() not in FILE_TYPES:
                raise LrbenchError(f"eval.files: {path} is not one of {', '.join(FILE_TYPES)}")
        items = [i for p in paths for i in read_items(p)]
    else:
        folder = local_folder(cfg)
        if folder is not None:
            items = [i for p in subject_files(folder) for i in read_items(p)]
        elif cfg.hub:
            items = read_hub_items(cfg)
        else:
            raise LrbenchError(f"eval={cfg.name}: no local items and no Hub copy; set eval.data_dir=<folder of "
                               f"per-subject CSVs> (CoLA: LLaMA-Factory/evaluation/{cfg.benchmark}), eval.files=[...] "
                               f"or put them in $LRBENCH_DATA_DIR/mc/{cfg.benchmark}")
    by_subject: dict[str, list[Item]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    if cfg.subjects:
        unknown = [s for s in cfg.subjects if s not in by_subject]
        if unknown:
            raise LrbenchError(f"eval.subjects: {unknown} not in the items; valid: {choices(by_subject)}")
        by_subject = {s: by_subject[s] for s in cfg.subjects}
    limit = cfg.max_items
    return {s: by_subject[s][:limit] if limit else by_subject[s] for s in sorted(by_subject)}, read_mapping(folder)


# -- prompts -------------------------------------------------------------------------------------------------------
def shown_options(item: Item, max_letters: int | None) -> tuple[str, ...]:
    return item.options[:max_letters] if max_letters else item.options


def user_message(cfg, item: Item, subject_name: str) -> str:
    options = "".join(cfg.choice_format.format(letter=LETTERS[i], text=text)
                      for i, text in enumerate(shown_options(item, cfg.max_letters)))
    return cfg.system.replace("{subject}", subject_name) + item.question + options + cfg.answer_prefix


def harness_context(item: Item, subject_name: str) -> str:
    """lm-eval's MMLU prompt (its `_default_template_yaml`), for any number of options."""
    options = "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(item.options))
    return HARNESS_DESCRIPTION.replace("{subject}", subject_name) + item.question.strip() + options + "\nAnswer:"


def letter_token_ids(tokenizer, count: int, prefix: str = "") -> list[int]:
    """LLaMA-Factory's choice: the last token of each letter encoded alone (with `prefix`, e.g. lm-eval's " ")."""
    ids = [encode_text(tokenizer, prefix + letter)[-1] for letter in LETTERS[:count]]
    if len(set(ids)) != count:
        raise LrbenchError(f"the tokenizer {tokenizer.name_or_path!r} maps the letters A-{LETTERS[count - 1]} "
                           f"(prefix {prefix!r}) to {len(set(ids))} distinct tokens; set eval.letter_prefix")
    return ids


# -- the default backend: letter logits ----------------------------------------------------------------------------
def next_token_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Logits of the token after the last position; only that position is projected when the model allows."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False}
    try:
        return model(**kwargs, logits_to_keep=1).logits[:, -1]
    except TypeError:  # a model without `logits_to_keep`
        return model(**kwargs).logits[:, -1]


@torch.no_grad()
def letter_scores(model, prompts: list[list[int]], letter_ids: list[int], pad_id: int, batch_size: int,
                  device="cpu", autocast=None, advance=lambda n: None) -> torch.Tensor:
    """(n prompts, n letters) next-token logits of the letters: left padding, explicit positions, prompts batched
    by length (the results do not depend on the batching). `advance(n)` after each batch of n prompts."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), len(letter_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with (autocast or nullcontext)():
            logits = next_token_logits(model, ids.to(device), mask.to(device), positions.to(device))
        out[chunk] = logits[:, letter_ids].float().cpu()
        advance(len(chunk))
    model.train(was_training)
    return out


def predictions(scores: torch.Tensor, option_counts: list[int]) -> list[int]:
    """argmax over each item's own letters."""
    return [int(row[:n].argmax()) for row, n in zip(scores, option_counts)]


# -- accuracy ------------------------------------------------------------------------------------------------------
def accuracy_report(subjects: dict[str, list[Item]], preds: dict[str, list[int]], mapping: dict,
                    max_letters: int | None) -> tuple[dict, dict]:
    """(the result-row numbers, the details by subject and category)."""
    per_subject, categories = {}, {}
    total = correct = unscorable = 0
    for subject, items in subjects.items():
        hits = [p == item.answer for p, item in zip(preds[subject], items)]
        unscorable += sum(1 for item in items if max_letters and item.answer >= max_letters)
        per_subject[subject] = {"items": len(items), "correct": sum(hits), "accuracy": sum(hits) / len(items),
                                "predictions": "".join(LETTERS[p] for p in preds[subject])}
        category = mapping.get(subject, {}).get("category")
        if category:
            bucket = categories.setdefault(category, {"items": 0, "correct": 0})
            bucket["items"] += len(items)
            bucket["correct"] += sum(hits)
        total += len(items)
        correct += sum(hits)
    for bucket in categories.values():
        bucket["accuracy"] = bucket["correct"] / bucket["items"]
    scores = {"mc_accuracy": correct / total,
              "mc_macro_accuracy": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject),
              "mc_items": total, "mc_subjects": len(per_subject)}
    if max_letters:
        scores["mc_unscorable"] = unscorable
    return scores, {"subjects": per_subject, "categories": categories}


# -- the evaluator -------------------------------------------------------------------------------------------------
def check_settings(cfg) -> None:
    if cfg.backend not in BACKENDS:
        raise LrbenchError(f"eval.backend={cfg.backend!r} is not one of: {choices(BACKENDS)}")
    if cfg.lm_eval.prompt not in LM_EVAL_PROMPTS:
        raise LrbenchError(f"eval.lm_eval.prompt={cfg.lm_eval.prompt!r} is not one of: {choices(LM_EVAL_PROMPTS)}")
    if cfg.max_letters is not None and not 2 <= int(cfg.max_letters) <= len(LETTERS):
        raise LrbenchError(f"eval.max_letters={cfg.max_letters}: choose 2 <= max_letters <= {len(LETTERS)}, or null")
    if int(cfg.batch_size) < 1:
        raise LrbenchError(f"eval.batch_size={cfg.batch_size}: choose a positive batch size")


class MultipleChoiceEval:
    """The items of one benchmark, read and rendered once; `score(model)` as often as needed."""

    def __init__(self, cfg, tokenizer, task_template: str | None = None):
        check_settings(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.template = resolve_template(cfg.template or task_template or "auto", tokenizer, "eval.template")
        self.subjects, self.mapping = load_items(cfg)
        self.names = {s: self.subject_name(s) for s in self.subjects}
        self.prompts = self.render_prompts()
        widest = max(len(shown_options(i, cfg.max_letters)) for items in self.subjects.values() for i in items)
        self.letter_ids = letter_token_ids(tokenizer, widest, cfg.letter_prefix)
        self.details: dict[str, dict] = {}

    def render_prompts(self) -> dict[str, list[str]]:
        """Every item's prompt, rendered once; a chat template that cannot render one is refused here, in a line."""
        from jinja2 import TemplateError

        try:
            return {s: [prompt_text(self.tokenizer, self.template, Turn(user_message(self.cfg, item, self.names[s]),
                                                                          "")) for item in items]
                    for s, items in self.subjects.items()}
        except TemplateError as err:
            raise LrbenchError(f"eval.template={self.template}: the chat template of the tokenizer "
                               f"{self.tokenizer.name_or_path!r} does not render ({type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}); fix its "
                               "chat_template, or choose eval.template=plain, llama3 or none") from None
        except (KeyError, IndexError, ValueError) as err:  # a placeholder in eval.system or eval.choice_format
            raise LrbenchError(f"eval.choice_format={self.cfg.choice_format!r} does not format ({err!r}); it may use "
                               "{letter} and {text}") from None

    def subject_name(self, subject: str) -> str:
        if self.cfg.subject_name:
            return str(self.cfg.subject_name)
        return str(self.mapping.get(subject, {}).get("name") or subject.replace("_", " "))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, model, device="cpu", autocast=None, when: str = "after") -> dict:
        """The result-row numbers (`mc_accuracy`, ...; `..._before` when `when` is "before")."""
        start = time.perf_counter()
        if self.cfg.backend == "lm_eval":
            preds = self.lm_eval_predictions(model, device, autocast)
        else:
            preds = self.letter_predictions(model, device, autocast, when)
        scores, details = accuracy_report(self.subjects, preds, self.mapping, self.cfg.max_letters)
        seconds = time.perf_counter() - start
        self.details[when] = {**scores, **details, "seconds": seconds}
        label = f"{self.cfg.name} ({self.cfg.backend}{', before training' if when == 'before' else ''})"
        console.print(f"{label}: accuracy {scores['mc_accuracy']:.4f} over {scores['mc_items']} items, "
                      f"{scores['mc_subjects']} subject(s), in {seconds:.1f} s")
        suffix = "_before" if when == "before" else ""
        return {f"{k}{suffix}": v for k, v in scores.items()}

    def letter_predictions(self, model, device, autocast, when: str = "after") -> dict[str, list[int]]:
        preds = {}
        description = f"scoring {self.cfg.name}" + (" before training" if when == "before" else "")
        items_count = sum(len(items) for items in self.subjects.values())
        with progress.bar(description, items_count) as advance:
            for subject, items in self.subjects.items():
                prompts = [encode_text(self.tokenizer, p) for p in self.prompts[subject]]
                scores = letter_scores(model, prompts, self.letter_ids, self.pad_id, int(self.cfg.batch_size),
                                       device, autocast, advance)
                preds[subject] = predictions(scores, [len(shown_options(i, self.cfg.max_letters)) for i in items])
        return preds

    def before(self, model, trainer_cfg) -> dict:
        """With `eval.before`: the model as loaded, before any adapter, scored on the trainer's device, then put back
        on the CPU (so that what follows is the same with or without this)."""
        if not self.cfg.before:
            return {}
        device = pick_device(trainer_cfg.device)
        _, autocast = autocast_for(device, trainer_cfg.precision)
        model.to(device)
        try:
            return self.score(model, device, autocast, when="before")
        finally:
            model.to("cpu")

    def after(self, model, device, autocast) -> dict:
        return self.score(model, device, autocast)

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / f"mc_{self.cfg.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": self.cfg.name, "backend": self.cfg.backend,
                                    "template": self.template, **self.details}, indent=2))
        return path

    # -- lm-eval backend ------------------------------------------------------------------------------------------
    def lm_eval_predictions(self, model, device, autocast) -> dict[str, list[int]]:
        lm_eval = require("lm_eval", "mc", "eval.backend=lm_eval", "; or use eval.backend=lrbench")
        simple_evaluate = lm_eval.simple_evaluate
        TaskManager = require("lm_eval.tasks", "mc", "eval.backend=lm_eval").TaskManager
        lc = self.cfg.lm_eval
        with tempfile.TemporaryDirectory() as tmp:
            tasks = [self.lm_eval_task(subject, Path(tmp)) for subject in self.subjects]
            lm = lm_eval_model(model, self.tokenizer, int(lc.batch_size), exact_split=lc.prompt == "lrbench")
            with (autocast or nullcontext)():
                # our task configs only: indexing lm-eval's thousands of task files takes 10-40 s. No seeds: 0-shot
                # scoring draws nothing, and a run's random state must not change here
                out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False),
                                      bootstrap_iters=0, log_samples=True,
                                      apply_chat_template=bool(lc.apply_chat_template), random_seed=None,
                                      numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
        preds = {}
        for subject in self.subjects:
            samples = sorted(out["samples"][self.lm_eval_name(subject)], key=lambda s: s["doc_id"])
            preds[subject] = [max(range(len(s["filtered_resps"])), key=lambda j: s["filtered_resps"][j][0])
                              for s in samples]
        return preds

    def lm_eval_name(self, subject: str) -> str:
        """The task's name in lm-eval, and its file's stem: a slug of the subject (the subject is data), numbered so
        that two subjects with one slug stay apart."""
        return f"lrbench_{slug(str(self.cfg.name))}_{list(self.subjects).index(subject):03d}_{slug(subject)}"

    def lm_eval_docs(self, subject: str) -> tuple[list[dict], str]:
        """lm-eval documents (context, letters, target) and the text between context and letter."""
        items, name = self.subjects[subject], self.names[subject]
        if self.cfg.lm_eval.prompt == "lrbench":
            contexts, delimiter = self.prompts[subject], self.cfg.letter_prefix
        else:
            lead = "" if self.cfg.lm_eval.apply_chat_template else "".join(
                self.tokenizer.convert_ids_to_tokens(special_framing(self.tokenizer)[0]))
            contexts, delimiter = [lead + harness_context(item, name) for item in items], " "
        docs = []
        for context, item in zip(contexts, items):
            n = len(shown_options(item, self.cfg.max_letters)) if self.cfg.lm_eval.prompt == "lrbench" \
                else len(item.options)
            docs.append({"context": context, "letters": list(LETTERS[:n]), "target": min(item.answer, n - 1)})
        return docs, delimiter

    def lm_eval_task(self, subject: str, folder: Path) -> dict:
        docs, delimiter = self.lm_eval_docs(subject)
        path = folder / f"{self.lm_eval_name(subject)}.jsonl"  # never a path from the data
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        return {"task": self.lm_eval_name(subject), "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test",
                "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "letters",
                "doc_to_target": "target", "target_delimiter": delimiter, "num_fewshot": 0,
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def lm_eval_model(model, tokenizer, batch_size: int, exact_split: bool):
    """lm-eval's HFLM over the in-memory model. `exact_split`: the context and the continuation are tokenised
    apart, as the default backend does (lm-eval would move the context's trailing whitespace into the
    continuation). Special tokens are never added: every context carries its own."""
    HFLM = require("lm_eval.models.huggingface", "mc", "eval.backend=lm_eval").HFLM

    class ExactSplitHFLM(HFLM):
        def _encode_pair(self, context, continuation):
            return self.tok_encode(context), self.tok_encode(continuation, add_special_tokens=False)

    prefix = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id,
                               tokenizer.pad_token_id) if t is not None), None)
    cls = ExactSplitHFLM if exact_split else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, add_bos_token=False,
               prefix_token_id=prefix)


# -- the post-training evaluation of a run (evaluations/__init__.py) -----------------------------------------------
def build(cfg, tokenizer, head=None) -> MultipleChoiceEval | None:
    """The evaluator a run's config asks for (`eval=mc/<benchmark>`), or None. The items are read here, so that a
    bad item fails before anything slow. `head`: the task's, which must be the causal LM's own."""
    eval_cfg = cfg.get("eval")
    if not eval_cfg:
        return None
    if head is not None and head.kind != "causal_lm":
        raise LrbenchError(f"eval={eval_cfg.name} scores a causal LM's next-token letters, but task {cfg.task.name} "
                           f"trains a {head.kind} head: use it with task=sft/<domain>, or alone: "
                           f"python -m lowrank_bench.mc_eval eval=mc/{eval_cfg.name} model=...")
    return MultipleChoiceEval(eval_cfg, tokenizer, cfg.task.get("template"))
