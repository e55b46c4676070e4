"""E2E NLG (Novikova et al., 2017): restaurant meaning representations (MRs) to text, with a causal LM, scored by
the five official metrics (`lowrank_bench.e2e_metrics`: BLEU, NIST, METEOR, ROUGE_L, CIDEr). `task=e2e`.

Data: the official CSVs (`mr,ref`, one row per reference, several references per MR): `trainset.csv`, `devset.csv`
(evaluated as `validation`) and `testset_w_refs.csv` (`test`) in `task.data_dir`, else in `$LRBENCH_DATA_DIR/e2e`,
else the Hub copy (`tuetschek/e2e_nlg`: `meaning_representation`, `human_reference`); `task.source` auto (that
order; a set LRBENCH_DATA_DIR without an `e2e` folder is an error), local or hub. `task.split`:
- `official`: train on the train set, evaluate `task.eval_on` (validation or test);
- `dev_by_mr`: the offline stand-in when only `devset.csv` is at hand: its distinct MRs are shuffled with
  `task.split_seed`, the first `task.eval_mrs` are evaluated and the references of all the others train;
- `auto`: `official` when the train set is there (or the Hub is used), `dev_by_mr` otherwise. The run's task name
  says which (`e2e` or `e2e/dev_by_mr`), so that the two never share a row label.

Training example (LoRA's `gpt2_encode.py --add_bos --add_eos`): MR tokens, the separator (the tokenizer's EOS token,
`<|endoftext|>` for GPT-2, unless `task.separator` gives a text), then the tokens of " " + reference and EOS. A
tokenizer with a chat template (an instruct model: SmolLM2-135M-Instruct) gets its own format instead, unless
`task.separator` is set: the prompt is the conversation with the MR as the user's turn up to the generation prompt,
the target what the conversation with the reference as the assistant's turn adds after it (its end of turn
included), tokenised apart as in tasks/sft.py; generation ends at the token that closes the assistant's turn. (The
EOS separator would clash there: SmolLM2's EOS is its end of turn, after which it writes "assistant ..." or
nothing.) The loss is the next-token cross-entropy on the target only (the prompt and padding are labelled -100),
mean over those tokens, with label smoothing eps (`task.label_smoothing`, LoRA's `label_smooth` 0.1):
    loss = (1 - eps) * -log p(y) + eps * mean_v -log p(v),
computed here from the logits (LoRA's `GPT2LMModel` forward computes the same). A sequence longer than
`task.max_length` (null: `model.max_length`) loses the end of its reference.

Evaluation: one generation per distinct MR (prompt: as in training), batched with left padding through
`model.generate` of whatever the trainer holds (a PeftModel forwards to the adapted HF model), beam search as in
LoRA's `gpt2_beam.py` (`task.generation`: beam 10, length penalty 0.8, no-repeat-ngram 4, at most 64 new tokens),
cut at the first EOS, decoded without special tokens, made one line. Each evaluation writes, in `<run>/e2e/`, the
official scorer's inputs: `<split>-references.txt` (grouped, a blank line between MRs), `<split>-hypotheses-<k>.txt`
(one line per MR; k counts the evaluations, on from the files already there, so a resumed run does not overwrite)
and `<split>-mrs.txt`; when more than half the hypotheses are empty, a warning says so (all five metrics are then
near 0); `lrbench-e2e-metrics` on the two text files gives the run's numbers again. The run folder is
the one the runner gives (`use_run_folder`), else Hydra's job folder (rank 0 only under data
parallel); with neither, nothing is written (the metrics are still computed).

Metric for the best evaluation: BLEU. A metric that could not be computed (METEOR without Java) is absent from the
evaluation, `<metric>_error` says why, and later evaluations of the run skip it (so that the best and the last
evaluation report the same metrics).

Differences from LoRA's E2E pipeline (microsoft/LoRA examples/NLG):
- MRs and references are the official CSV text; LoRA trains on pre-tokenised files (`name : The Vaults | Type : pub
  | price : more than £ 30 | ...`, references with spaces around punctuation) and scores pre-tokenised references;
- decoding is transformers' beam search: LoRA's own loop decodes all 64 steps and also stops on token 628 ("\\n\\n");
  `early_stopping: never` is the closest setting, and only the EOS token ends a hypothesis here;
- LoRA scores BLEU/NIST with the scorer's Python port (`measure_scores.py -p`); we reproduce the default, the Perl
  mteval-v13a, whose NIST differs when the number of references varies (see `e2e_metrics`).
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lowrank_bench import distributed, e2e_metrics, hub, progress
from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.models import Head
from lowrank_bench.tasks.base import (Task, cached, check_text, fingerprint, local_data_folder, pad_batch,
                                      tokenizer_id)
from lowrank_bench.tasks.sft import Turn, chat_response_text, encode_text, has_chat_template, prompt_text, template_id

FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
HUB_DATASET = "tuetschek/e2e_nlg"
HUB_COLUMNS = ("meaning_representation", "human_reference")
SPLITS = ("auto", "official", "dev_by_mr")
EVAL_ON = ("validation", "test")
EARLY_STOPPING = {"never": "never", "true": True, "false": False}

Pair = dict  # {"mr": str, "ref": str}


@dataclass(frozen=True)
class Decoding:
    """`task.generation`: beam search settings, checked once (their values: lowrank_bench/conf/task/e2e.yaml)."""

    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    max_new_tokens: int
    early_stopping: str
    batch_size: int | None  # MRs per generate call; None: the trainer's eval batch size

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LrbenchError(f"task.generation.max_new_tokens={self.max_new_tokens}: nothing would be generated; "
                               "choose >= 1 (LoRA's E2E recipe: 64)")
        if self.num_beams < 1:
            raise LrbenchError(f"task.generation.num_beams={self.num_beams}; choose >= 1 (1 is greedy, LoRA: 10)")
        if self.no_repeat_ngram_size < 0:
            raise LrbenchError(f"task.generation.no_repeat_ngram_size={self.no_repeat_ngram_size}; choose >= 0 "
                               "(0 disables it, LoRA: 4)")
        if str(self.early_stopping).lower() not in EARLY_STOPPING:
            raise LrbenchError(f"task.generation.early_stopping={self.early_stopping!r}; valid: "
                               f"{choices(EARLY_STOPPING)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LrbenchError(f"task.generation.batch_size={self.batch_size}; choose >= 1, or null for "
                               "trainer.eval_batch_size")

    @classmethod
    def from_cfg(cls, cfg) -> "Decoding":
        values = dict(cfg)
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise LrbenchError(f"unknown task.generation setting(s) {unknown}; valid: "
                               f"{choices(cls.__dataclass_fields__)}")
        missing = sorted(set(cls.__dataclass_fields__) - set(values))
        if missing:
            raise LrbenchError(f"task.generation lacks {missing}; lowrank_bench/conf/task/e2e.yaml gives every setting")
        return cls(**values)

    def generate_kwargs(self, end_id: int, pad_id: int) -> dict:
        return {"num_beams": self.num_beams, "length_penalty": self.length_penalty, "do_sample": False,
                "no_repeat_ngram_size": self.no_repeat_ngram_size, "max_new_tokens": self.max_new_tokens,
                "early_stopping": EARLY_STOPPING[str(self.early_stopping).lower()], "num_return_sequences": 1,
                "eos_token_id": end_id, "pad_token_id": pad_id}


# -- data -----------------------------------------------------------------------------------------------------------
def group_by_mr(pairs: list[Pair]) -> dict[str, list[str]]:
    """The references of each MR, MRs in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for pair in pairs:
        groups.setdefault(pair["mr"], []).append(pair["ref"])
    return groups


def split_mrs(mrs: list[str], eval_mrs: int, seed: int) -> set[str]:
    """The MRs held out for evaluation: the first `eval_mrs` of a seeded shuffle."""
    order = list(mrs)
    random.Random(seed).shuffle(order)
    return set(order[:eval_mrs])


def end_token(tokenizer) -> int:
    """The token that ends a reference: EOS, or SEP for BERT-style tokenizers (the tiny test models)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise LrbenchError(f"the tokenizer {tokenizer.name_or_path} has no EOS (or SEP) token to end a reference; name "
                       "one in the model's tokenizer block, e.g. special_tokens: {eos_token: ...}")


def turn_end(tokenizer) -> int:
    """The token that closes the assistant's turn under the chat template (SmolLM2: <|im_end|>, Llama 3: <|eot_id|>):
    the first special token of a rendered response; else the end token."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    response = encode_text(tokenizer, chat_response_text(tokenizer, Turn("name[x]", "x")))
    return next((t for t in response if t in special), end_token(tokenizer))


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (labels != -100), label-smoothed."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def pack(features: list[dict]) -> dict[str, torch.Tensor]:
    """Training examples as three flat tensors: the cache loads them in milliseconds, where a list of lists of ints
    takes seconds (42k pairs: tens of seconds) through torch's safe unpickler."""
    return {"ids": torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long),
            "lengths": torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long),
            "prompt_lengths": torch.tensor([f["labels"].count(-100) for f in features], dtype=torch.long)}


def unpack(packed: dict[str, torch.Tensor]) -> list[dict]:
    ids, start, features = packed["ids"].tolist(), 0, []
    for length, prompt in zip(packed["lengths"].tolist(), packed["prompt_lengths"].tolist()):
        sequence = ids[start:start + length]
        start += length
        features.append({"input_ids": sequence, "attention_mask": [1] * length,
                         "labels": [-100] * prompt + sequence[prompt:]})
    return features


def position_limit(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


class E2ETask(Task):
    head = Head("causal_lm")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.metric = cfg.metric
        if self.metric not in e2e_metrics.METRICS:
            raise LrbenchError(f"task.metric={self.metric!r}; valid: {', '.join(e2e_metrics.METRICS)}")
        self.decoding = Decoding.from_cfg(cfg.generation)
        self.label_smoothing = float(cfg.label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LrbenchError(f"task.label_smoothing={self.label_smoothing}; choose 0 <= eps < 1 (LoRA: 0.1)")
        self.eval_on = self.option("eval_on", EVAL_ON)
        self.folder = self.local_folder()
        self.split = self.resolve_split(self.option("split", SPLITS))
        self.name = cfg.name if self.split == "official" else f"{cfg.name}/dev_by_mr"
        self.eval_splits = (self.eval_on,) if self.split == "official" else ("validation",)
        self.check_eval_mrs()
        self.output_dir: Path | None = None  # the run folder, given by the runner (see the module docstring)
        self.tokenizer = None
        self.end_id = 0
        self.separator: list[int] = []
        self.chat = False  # the tokenizer's chat template frames MR and reference (module docstring)
        self.failed: dict[str, str] = {}  # metric -> why, skipped for the rest of the run

    def option(self, key: str, valid) -> str:
        value = self.cfg.get(key)
        if value not in valid:
            raise LrbenchError(f"task.{key}={value!r} is not one of: {choices(valid)}")
        return value

    # -- where the data is ----------------------------------------------------------------------------------------
    def local_folder(self) -> Path | None:
        return local_data_folder(self.cfg, "e2e", f"the official E2E CSVs: {', '.join(FILES.values())}")

    def resolve_split(self, split: str) -> str:
        has_train = self.folder is None or (self.folder / FILES["train"]).is_file()
        if split == "auto":
            return "official" if has_train else "dev_by_mr"
        if split == "official" and not has_train:
            raise LrbenchError(f"task.split=official needs {self.folder / FILES['train']}, which is missing; "
                               f"task.split=dev_by_mr splits {FILES['validation']} by MR instead")
        return split

    def check_eval_mrs(self) -> None:
        """At least two evaluated MRs: the official scorer reads a references file with one group as
        single-reference."""
        limit = self.cfg.get("max_eval_samples")
        if limit is not None and limit < 2:
            raise LrbenchError(f"task.max_eval_samples={limit}: choose >= 2 MRs, or null for all (the official scorer "
                               "reads a references file with a single group as single-reference)")
        if self.split != "dev_by_mr":
            return
        eval_mrs = self.cfg.get("eval_mrs")
        if not isinstance(eval_mrs, int) or eval_mrs < 2:
            raise LrbenchError(f"task.eval_mrs={eval_mrs!r}: choose an integer >= 2 (the official scorer reads a "
                               "references file with a single group as single-reference)")

    def file(self, split: str) -> Path:
        path = self.folder / FILES[split]
        if not path.is_file():
            raise LrbenchError(f"missing data file {path} for {self.name} (split {split})")
        return check_text(path)  # empty, or not UTF-8: file:line, before the csv module meets it

    def source_id(self) -> str:
        if self.folder is None:
            return HUB_DATASET
        paths = [self.folder / name for name in FILES.values() if (self.folder / name).is_file()]
        return repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])

    def encoding_id(self) -> str:
        keys = ("split", "eval_on", "eval_mrs", "split_seed", "separator")
        framing = template_id(self.tokenizer, "chat") if self.chat else "separator"
        return repr((type(self).__name__, 3, self.split, framing, {k: self.cfg.get(k) for k in keys}))

    def read_pairs(self, split: str) -> list[Pair]:
        if self.folder is not None:
            return [{"mr": mr, "ref": ref} for mr, ref in e2e_metrics.read_table(self.file(split))]
        return self.read_hub(split)

    def read_hub(self, split: str) -> list[Pair]:
        ds = hub.load_dataset(HUB_DATASET, split=split, shown=HUB_DATASET,
                              local_copy=f"An E2E folder holds {', '.join(FILES.values())} (columns mr,ref); "
                                         f"with only {FILES['validation']}, use task.split=dev_by_mr.")
        mr_column, ref_column = HUB_COLUMNS
        pairs = []
        for row, record in enumerate(ds):
            mr, ref = e2e_metrics.clean_field(record[mr_column]), e2e_metrics.clean_field(record[ref_column])
            if not ref:
                raise LrbenchError(f"{HUB_DATASET} {split} row {row + 1}: empty reference for MR {mr!r}")
            pairs.append({"mr": mr, "ref": ref})
        return pairs

    def raw_split(self, split: str) -> list[Pair]:
        if self.split == "official":
            return self.read_pairs(split)
        pairs = self.read_pairs("validation")
        mrs = list(group_by_mr(pairs))
        eval_mrs = self.cfg.eval_mrs
        if eval_mrs >= len(mrs):
            raise LrbenchError(f"task.eval_mrs={eval_mrs} leaves nothing to train on: {FILES['validation']} has "
                               f"{len(mrs)} MRs; choose 2 <= eval_mrs < {len(mrs)}")
        held_out = split_mrs(mrs, eval_mrs, int(self.cfg.split_seed))
        return [p for p in pairs if (p["mr"] in held_out) == (split != self.train_split)]

    # -- tokenisation ---------------------------------------------------------------------------------------------
    def prepare(self, tokenizer, max_length: int) -> None:
        """Training pairs and evaluation groups tokenised once (cached by content); the tokenizer kept for decoding."""
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        text = self.cfg.get("separator")
        self.chat = not text and has_chat_template(tokenizer)
        self.end_id = turn_end(tokenizer) if self.chat else end_token(tokenizer)
        self.separator = tokenizer(text, add_special_tokens=False)["input_ids"] if text else [self.end_id]
        for split in (self.train_split, *self.eval_splits):
            key = fingerprint(self.name, split, self.source_id(), tokenizer_id(tokenizer), max_length,
                              self.encoding_id())
            if split == self.train_split:
                encoded = unpack(cached(key, lambda: pack(self.encode(tokenizer, self.raw_split(split), max_length))))
            else:
                encoded = cached(key, lambda: self.encode_groups(tokenizer, self.raw_split(split), max_length))
            self.splits[split] = self.subsample(encoded, split)

    def prompt(self, tokenizer, mr: str) -> list[int]:
        if self.chat:
            return encode_text(tokenizer, prompt_text(tokenizer, "chat", Turn(mr, "")))
        return encode_text(tokenizer, mr) + self.separator

    def target(self, tokenizer, pair: Pair) -> list[int]:
        if self.chat:
            return encode_text(tokenizer, chat_response_text(tokenizer, Turn(pair["mr"], pair["ref"])))
        return encode_text(tokenizer, " " + pair["ref"]) + [self.end_id]

    def encode(self, tokenizer, examples: list[Pair], max_length: int) -> list[dict]:
        """Prompt (MR + separator, or the chat template's user turn) + target (" " + reference + EOS, or the
        assistant's turn); labels on the target only."""
        features = []
        for pair in examples:
            prompt = self.prompt(tokenizer, pair["mr"])
            self.check_prompt(prompt, max_length, pair["mr"])
            target = self.target(tokenizer, pair)
            ids = (prompt + target)[:max_length]
            labels = ([-100] * len(prompt) + target)[:max_length]
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        return features

    @staticmethod
    def check_prompt(prompt: list[int], max_length: int, mr: str) -> None:
        if len(prompt) >= max_length:
            raise LrbenchError(f"an MR takes {len(prompt)} tokens, which leaves no room for its reference within "
                               f"max_length={max_length} (task.max_length, or model.max_length); raise it. MR: {mr!r}")

    def encode_groups(self, tokenizer, examples: list[Pair], max_length: int) -> list[dict]:
        """One evaluation example per MR: its prompt and all its references (as one line each)."""
        groups = []
        for mr, refs in group_by_mr(examples).items():
            prompt = self.prompt(tokenizer, mr)
            self.check_prompt(prompt, max_length, mr)
            groups.append({"mr": mr, "prompt_ids": prompt, "references": [e2e_metrics.one_line(r) for r in refs]})
        return groups

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(features, self.pad_id, label_pad=-100)

    # -- training ---------------------------------------------------------------------------------------------------
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return reference_loss(logits, batch["labels"], self.label_smoothing)

    # -- generation -------------------------------------------------------------------------------------------------
    def left_padded(self, prompts: list[list[int]], device) -> dict[str, torch.Tensor]:
        longest = max(len(p) for p in prompts)
        ids = [[self.pad_id] * (longest - len(p)) + p for p in prompts]
        mask = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
        return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}

    def check_positions(self, model, prompts: list[list[int]]) -> None:
        limit = position_limit(model)
        need = max(len(p) for p in prompts) + self.decoding.max_new_tokens
        if limit and need > limit:
            raise LrbenchError(f"the longest MR prompt ({need - self.decoding.max_new_tokens} tokens) plus "
                               f"task.generation.max_new_tokens={self.decoding.max_new_tokens} exceeds the model's "
                               f"{limit} positions; lower max_new_tokens")

    def continuations(self, generated: torch.Tensor, prompt_length: int) -> list[list[int]]:
        """The new tokens of each sequence, up to (without) the first EOS."""
        out = []
        for row in generated[:, prompt_length:].tolist():
            out.append(row[:row.index(self.end_id)] if self.end_id in row else row)
        return out

    @torch.no_grad()
    def generate_ids(self, model, prompts: list[list[int]], batch_size: int, device="cpu",
                     autocast=None) -> list[list[int]]:
        """Beam search for every prompt, in left-padded batches of `batch_size`, through `model.generate`; under data
        parallel each rank generates its share of the batches (distributed.eval_batches) and every rank returns all
        the continuations, in the prompts' order."""
        self.check_positions(model, prompts)
        kwargs = self.decoding.generate_kwargs(self.end_id, self.pad_id)
        was_training = model.training
        model.eval()
        out: list[list[int]] = []
        batches = distributed.eval_batches(len(prompts), batch_size)
        try:
            with progress.bar(f"generating {self.name}", sum(len(b) for b in batches)) as advance:
                for rows in batches:
                    batch = self.left_padded(prompts[rows.start:rows.stop], device)
                    with (autocast or nullcontext)():
                        generated = model.generate(**batch, **kwargs)
                    out += self.continuations(generated, batch["input_ids"].shape[1])
                    advance(len(batch["input_ids"]))
        finally:
            model.train(was_training)
        return distributed.current().gather_shares(out)

    def generate_texts(self, model, prompts: list[list[int]], batch_size: int, device="cpu",
                       autocast=None) -> list[str]:
        ids = self.generate_ids(model, prompts, batch_size, device, autocast)
        return [e2e_metrics.one_line(self.tokenizer.decode(t, skip_special_tokens=True)) for t in ids]

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, model, split: str, batch_size: int = 64, device="cpu", autocast=None) -> dict:
        """The five official metrics of one generation per MR; the paths of the files written for rescoring."""
        groups = self.splits[split]
        hypotheses = self.generate_texts(model, [g["prompt_ids"] for g in groups],
                                         self.decoding.batch_size or batch_size, device, autocast)
        empty = self.warn_if_empty(hypotheses)
        references = [g["references"] for g in groups]
        wanted = [m for m in e2e_metrics.METRICS if m not in self.failed]
        scores = e2e_metrics.score(references, hypotheses, wanted)
        self.remember_failures(scores)
        skipped = {e2e_metrics.error_key(m): f"skipped: failed at an earlier evaluation of this run ({why})"
                   for m, why in self.failed.items() if m not in wanted}
        return {**scores, **skipped, "degenerate": empty, **self.save(split, groups, hypotheses)}

    def warn_if_empty(self, hypotheses: list[str]) -> bool:
        """Whether more than half the generated texts are empty (the row's `degenerate`), with a warning then."""
        empty = sum(not h.strip() for h in hypotheses)
        if empty * 2 > len(hypotheses):
            console.print(f"[bold yellow]warning:[/] {self.name}: {empty} of {len(hypotheses)} generated texts are "
                          "empty, so every metric is near 0: the model ends its answer at once (train it longer; "
                          f"prompts: {'the chat template' if self.chat else 'MR + separator'})", soft_wrap=True)
        return empty * 2 > len(hypotheses)

    def remember_failures(self, scores: dict) -> None:
        for metric in e2e_metrics.METRICS:
            message = scores.get(e2e_metrics.error_key(metric))
            if message:
                self.failed[metric] = message
                console.print(f"[bold yellow]warning:[/] {self.name}: {metric} not computed: {message}",
                              soft_wrap=True)

    def use_run_folder(self, folder: Path) -> None:
        self.output_dir = folder

    def run_folder(self) -> Path | None:
        if self.output_dir is not None:
            return Path(self.output_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return None  # data parallel: rank 0 writes
        try:
            from hydra.core.hydra_config import HydraConfig

            return Path(HydraConfig.get().runtime.output_dir)
        except Exception:  # not inside a Hydra job (a library call): nowhere to write
            return None

    def save(self, split: str, groups: list[dict], hypotheses: list[str]) -> dict[str, str]:
        """The official scorer's inputs for this evaluation, in `<run>/e2e/`; their paths."""
        run = self.run_folder()
        if run is None:
            return {}
        folder = run / "e2e"
        folder.mkdir(parents=True, exist_ok=True)
        number = len(list(folder.glob(f"{split}-hypotheses-*.txt"))) + 1  # a resumed run numbers on
        references = folder / f"{split}-references.txt"
        hypotheses_file = folder / f"{split}-hypotheses-{number:03d}.txt"
        e2e_metrics.write_references(references, [g["references"] for g in groups])
        e2e_metrics.write_hypotheses(hypotheses_file, hypotheses)
        (folder / f"{split}-mrs.txt").write_text("".join(e2e_metrics.one_line(g["mr"]) + "\n" for g in groups),
                                                 encoding="utf-8")
        return {"references_file": str(references), "hypotheses_file": str(hypotheses_file)}
