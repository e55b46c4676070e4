"""Perplexity of a causal language model on a text corpus: the forgetting probe of continual-learning runs.

For scored tokens t (each predicted from the tokens to its left inside its window):

    NLL = 1/n * sum_t -log p(x_t | window context),   perplexity = exp(NLL),   n = number of scored tokens

Two modes; the mode also picks how the text is turned into tokens (`corpus_ids`):
- `strided` (protocol `standard`: the text as is), the sliding window of the Hugging Face guide "Perplexity of
  fixed-length models": windows of at most `context` tokens start every `stride` tokens, and a window scores only
  the tokens that no earlier window scored; the rest of it is context (label -100). With stride < context every
  token after the first is scored exactly once (n = N - 1). With stride == context the windows are disjoint and
  the first token of each window has no left context, so it is never scored (n = N - number of windows).
- `single_window` (protocol `curlora`), CURLoRA's measure (Fawi, arXiv 2408.14572; `calculate_perplexity` in the
  released code): one forward pass over the first `max_tokens` tokens (10,000 there), n = min(N, max_tokens) - 1.

Differences from the reference code, on purpose:
- The NLL is summed here from float32 log-probabilities over exactly the tokens scored; the guide's
  `loss * trg_len` counts one token too many in the first window (its first token cannot be scored).
- No special tokens are added (`add_special_tokens=False`): a corpus is one stream, not a sentence. CURLoRA's
  code tokenises with the default, which prepends a BOS token for Llama/Mistral tokenizers (none for GPT-2), so
  there its first scored token is predicted from BOS; here from the first text token.
- GPT-2's window: the code scores `max_length=10000` tokens with the comment "only max_len for GPT2 and RoBERTa"
  (`code/utils.py:30`; `max_len` is 256 for GPT-2, `utils.py:21`); the GPT-2 preset sets `max_tokens: 256`.

Corpora (`resolve_corpus`): a text file, or the named corpus `wikitext-2-raw-v1/test`, CURLoRA's
(`load_dataset("wikitext", "wikitext-2-raw-v1", split="test")`, blank rows dropped, the rest joined with no separator:
`code/utils.py:12,16-18`), read from `$LRBENCH_DATA_DIR/wikitext-2/wiki.test.raw` (that text with its blank lines
already dropped) or from the Hub's rows. Without a corpus the offline default is
`$LRBENCH_DATA_DIR/wikitext-2/valid.txt` (the *tokenised* validation split: `<unk>`, " , " spacing).
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_bench import distributed, progress
from lowrank_bench.hub import load_dataset
from lowrank_bench.errors import LrbenchError, choices

MODES = {"strided": "standard", "single_window": "curlora"}  # mode -> text protocol
PROTOCOLS = ("standard", "curlora")
DEFAULT_MAX_CONTEXT = 1024


# -- corpora ------------------------------------------------------------------------------------------------------
WIKITEXT_HUB = "Salesforce/wikitext"  # where the Hub's `wikitext` (CURLoRA's load_dataset name) lives now
# name -> (file under $LRBENCH_DATA_DIR, (Hub dataset, config, split))
CORPORA = {"wikitext-2-raw-v1/test": ("wikitext-2/wiki.test.raw", (WIKITEXT_HUB, "wikitext-2-raw-v1", "test"))}
DEFAULT_FILE = "wikitext-2/valid.txt"  # corpus null: the offline sequences' tokenised validation split
SOURCES = ("auto", "local", "hub")


@dataclass(frozen=True)
class Corpus:
    """Where the perplexity text comes from: a file, or a Hub dataset's rows. `label` names it in the run's row."""

    label: str
    path: Path | None = None
    hub: tuple[str, str, str] | None = None

    def text(self) -> str:
        return read_corpus(self.path) if self.path is not None else hub_text(*self.hub)


def resolve_corpus(corpus: str | None, source: str = "auto", shared: Path | None = None) -> Corpus:
    """`corpus`: a named corpus (CORPORA), a text file, or None (`$LRBENCH_DATA_DIR/wikitext-2/valid.txt`).
    `source` (named corpora only): auto = the shared file when it is there, else the Hub; local; hub."""
    if source not in SOURCES:
        raise LrbenchError(f"task.perplexity.source={source!r}; valid: {choices(SOURCES)}")
    if corpus is None:
        if shared is None:
            raise LrbenchError(f"task.perplexity.corpus is not set and LRBENCH_DATA_DIR is unset: give "
                               f"task.perplexity.corpus=/path/to/{DEFAULT_FILE} (or one of: {choices(CORPORA)}), "
                               "or task.perplexity.mode=none")
        return Corpus(str(shared / DEFAULT_FILE), path=shared / DEFAULT_FILE)
    corpus = str(corpus)
    if corpus not in CORPORA:
        if source == "hub":
            raise LrbenchError(f"task.perplexity.source=hub with task.perplexity.corpus={corpus}, a file: the Hub "
                               f"serves named corpora only; valid: {choices(CORPORA)}")
        return Corpus(corpus, path=Path(corpus).expanduser())
    relative, hub = CORPORA[corpus]
    local = shared / relative if shared is not None else None
    if source != "hub" and local is not None and local.is_file():
        return Corpus(f"{corpus}: {local}", path=local)
    if source == "local":
        where = local if local is not None else f"$LRBENCH_DATA_DIR/{relative} (LRBENCH_DATA_DIR is unset)"
        raise LrbenchError(f"task.perplexity.corpus={corpus} with task.perplexity.source=local: no file {where}; "
                           "set LRBENCH_DATA_DIR to the shared data folder, or task.perplexity.source=hub")
    return Corpus(f"{corpus}: hub {' '.join(hub)}", hub=hub)


def hub_text(dataset: str, config: str, split: str) -> str:
    """A Hub text dataset's rows joined with no separator: `datasets` gives blank lines as "" rows and keeps the
    newline of every other row, so this is the text file (and CURLoRA's `"".join(s for s in rows if s != "")`)."""
    rows = load_dataset(dataset, config, split=split, shown=f"{dataset} {config} {split}",
                        override="task.perplexity.corpus",
                        local_copy="Or keep task.perplexity.source=auto with LRBENCH_DATA_DIR set: the shared "
                                   "folder holds wikitext-2/wiki.test.raw.")["text"]
    return "".join(rows)


# -- text ---------------------------------------------------------------------------------------------------------
def read_corpus(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LrbenchError(f"perplexity corpus {path} does not exist (or is not a file); give the path of a UTF-8 "
                           "text file, e.g. $LRBENCH_DATA_DIR/wikitext-2/valid.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LrbenchError(f"perplexity corpus {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                           "convert it, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise LrbenchError(f"perplexity corpus {path} is empty (nothing but whitespace); give a file with text")
    return text


def curlora_text(text: str) -> str:
    """CURLoRA's corpus string: `"".join(s for s in rows if s != "")` over the wikitext rows of `datasets`. Its
    loader turns blank lines into "" and keeps every other line *with* its trailing newline, so the result is the
    file without its blank lines, newlines kept."""
    lines = io.StringIO(text, newline="\n")  # lines end at "\n" only, as Python reads the text file
    return "".join(line for line in lines if line.strip())


def corpus_ids(tokenizer, text: str, protocol: str = "standard") -> torch.Tensor:
    """The corpus as one 1-D LongTensor of token ids, with no special tokens added (no BOS/EOS).

    protocol `standard`: the text as is; `curlora`: blank lines dropped first (`curlora_text`)."""
    if protocol not in PROTOCOLS:
        raise LrbenchError(f"perplexity protocol={protocol!r}; valid: {choices(PROTOCOLS)}")
    if protocol == "curlora":
        text = curlora_text(text)
    # verbose=False: the corpus is longer than the tokenizer's model_max_length on purpose; windows come later
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


# -- scoring ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) and no autograd inside; the caller's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def as_sequence(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise LrbenchError(f"perplexity input_ids of shape {tuple(ids.shape)}; give one sequence: (N,) or (1, N)")
    if ids.numel() < 2:
        raise LrbenchError(f"perplexity corpus has {ids.numel()} token(s); at least 2 are needed (one to predict "
                           "from, one to score): give a longer text")
    return ids


def window_nll(model, window: torch.Tensor, first_scored: int, device, autocast) -> float:
    """Sum of -log p(window[t] | window[:t]) for t in [first_scored, len(window)), with first_scored >= 1."""
    window = window.to(device)
    with autocast():
        logits = model(input_ids=window[None]).logits[0]
    # the logits at position t - 1 predict token t; upcast before the softmax so that bf16/fp16 runs stay exact
    log_probs = logits[first_scored - 1:-1].float().log_softmax(-1)
    token_log_probs = log_probs.gather(-1, window[first_scored:, None])
    return -token_log_probs.double().sum().item()  # float64 total: a corpus has 10^5+ terms


def result(total_nll: float, n_scored: int) -> dict:
    nll = total_nll / n_scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": n_scored}


def strided_perplexity(model, input_ids, context: int, stride: int, device="cpu",
                       autocast=contextlib.nullcontext) -> dict:
    """Sliding-window perplexity (module docstring). `input_ids` (N,) or (1, N) may stay on the CPU: each window
    is moved to `device`, where the model must already be."""
    if context < 2:
        raise LrbenchError(f"perplexity.context={context}; a window needs at least 2 tokens: choose context >= 2")
    if not 1 <= stride <= context:
        raise LrbenchError(f"perplexity.stride={stride} with perplexity.context={context}; windows would skip "
                           f"tokens: choose 1 <= stride <= {context} (context // 2 = {context // 2} is usual)")
    ids = as_sequence(input_ids)
    plan = windows(len(ids), context, stride)
    # data parallel: each rank scores a contiguous share of the windows; the sums are added in the windows' order
    mine = [plan[i] for rows in distributed.eval_batches(len(plan), 1) for i in rows]
    nlls = []
    with evaluating(model), progress.bar("perplexity", len(mine)) as advance:
        for begin, end, first_scored in mine:
            nlls.append(window_nll(model, ids[begin:end], first_scored, device, autocast))
            advance()
    total_nll = 0.0
    for nll in distributed.current().gather_shares(nlls):
        total_nll += nll
    return result(total_nll, sum(end - begin - first_scored for begin, end, first_scored in plan))


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window `strided_perplexity` scores, up to the first that
    reaches the end of the corpus."""
    out, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # tokens before `scored_until` were scored by an earlier window; position 0 of a window never can be
        out.append((begin, end, max(scored_until - begin, 1)))
        scored_until = end
        if end == n_tokens:
            break
    return out


def window_count(n_tokens: int, context: int, stride: int) -> int:
    """The windows `strided_perplexity` scores: up to the first that reaches the end of the corpus."""
    return 1 + max(0, -(-(n_tokens - context) // stride))


def single_window_perplexity(model, input_ids, max_tokens: int = 10000, device="cpu",
                             autocast=contextlib.nullcontext) -> dict:
    """CURLoRA's perplexity: one forward pass over the first `max_tokens` tokens, exp(mean NLL)."""
    if max_tokens < 2:
        raise LrbenchError(f"perplexity.max_tokens={max_tokens}; at least 2 tokens are needed: choose >= 2")
    ids = as_sequence(input_ids)[:max_tokens]
    with evaluating(model), progress.bar("perplexity", 1) as advance:
        total_nll = window_nll(model, ids, 1, device, autocast)
        advance()
    return result(total_nll, len(ids) - 1)


# -- entry point --------------------------------------------------------------------------------------------------
def model_positions(model) -> int | None:
    """The longest input the model's position embeddings allow, when its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_context(model) -> int:
    """The model's maximum positions, capped at DEFAULT_MAX_CONTEXT (1024, GPT-2's, the guide's setting); long-
    context models would otherwise make one window cost minutes."""
    positions = model_positions(model)
    return min(positions, DEFAULT_MAX_CONTEXT) if positions else DEFAULT_MAX_CONTEXT


def perplexity(model, tokenizer, text: str, mode: str = "strided", context: int | None = None,
               stride: int | None = None, max_tokens: int = 10000, device="cpu",
               autocast=contextlib.nullcontext, corpus_tokens: int | None = None) -> dict:
    """Perplexity of `model` on `text`: {"perplexity", "nll", "tokens"}. See `score`."""
    if mode not in MODES:
        raise LrbenchError(f"perplexity.mode={mode!r}; valid: {choices(MODES)}")
    return score(model, corpus_ids(tokenizer, text, MODES[mode]), mode, context, stride, max_tokens, device,
                 autocast, corpus_tokens)


def score(model, ids: torch.Tensor, mode: str = "strided", context: int | None = None, stride: int | None = None,
          max_tokens: int = 10000, device="cpu", autocast=contextlib.nullcontext,
          corpus_tokens: int | None = None) -> dict:
    """Perplexity of `model` on token ids made by `corpus_ids` with the protocol of `mode` (tokenise once, score
    many times).

    mode `strided` (protocol `standard`): context=None is the model's maximum positions capped at 1024, stride=None
    is context // 2; `corpus_tokens` scores only the first N tokens (a CPU budget; None = the whole corpus).
    mode `single_window` (protocol `curlora`) scores the first `max_tokens` tokens (context and stride unused)."""
    if mode not in MODES:
        raise LrbenchError(f"perplexity.mode={mode!r}; valid: {choices(MODES)}")
    positions = model_positions(model)
    if mode == "single_window":
        window = min(max_tokens, len(ids))
        if positions is not None and window > positions:
            raise LrbenchError(f"perplexity.max_tokens={max_tokens}: one window of {window} tokens exceeds the "
                               f"model's {positions} positions; set perplexity.max_tokens <= {positions} or use "
                               "perplexity.mode=strided")
        return single_window_perplexity(model, ids, max_tokens, device, autocast)
    if corpus_tokens is not None:
        if corpus_tokens < 2:
            raise LrbenchError(f"perplexity.corpus_tokens={corpus_tokens}: score at least 2 tokens (or null: all)")
        ids = ids[:corpus_tokens]
    context = default_context(model) if context is None else context
    if positions is not None and context > positions:
        raise LrbenchError(f"perplexity.context={context} exceeds the model's {positions} positions; choose "
                           f"perplexity.context <= {positions} (or leave it unset)")
    stride = context // 2 if stride is None else stride
    return strided_perplexity(model, ids, context, stride, device, autocast)
