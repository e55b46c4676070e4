"""Perplexity: every number checked against log-probabilities computed here, one prefix forward per token."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lowrank_bench.errors import LrbenchError
from lowrank_bench.perplexity import (CORPORA, corpus_ids, curlora_text, default_context, perplexity, read_corpus,
                                      resolve_corpus, score, single_window_perplexity, strided_perplexity)
from tests.conftest import DATA, compose_cfg, needs_data

VOCAB = 50


def tiny_lm(positions: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # initializer_range 0.5 (not 0.02): predictions that depend clearly on the context, so a window with the wrong
    # context gives a different number; dropout stays on in training mode, so a missing model.eval() shows too
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=positions,
                        initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_lm(positions=64)


@pytest.fixture(scope="module")
def short_model():
    """16 positions: a short text already needs several default windows (few reference forwards)."""
    return tiny_lm(positions=16)


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def log_prob(model, ids: torch.Tensor, t: int, start: int) -> float:
    """log p(ids[t] | ids[start:t]): the last position of a forward over exactly that context."""
    logits = model(input_ids=ids[None, start:t]).logits[0, -1]
    return logits.double().log_softmax(-1)[ids[t]].item()


def reference_nll(model, ids, scored: list[tuple[int, int]]) -> float:
    """Mean NLL over (token, context start) pairs."""
    return -sum(log_prob(model, ids, t, start) for t, start in scored) / len(scored)


class CharTokenizer:
    """One id per character; prepends a BOS id unless add_special_tokens=False, as Llama's tokenizer does."""

    bos = 1

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [2 + ord(c) % (VOCAB - 2) for c in text]
        return {"input_ids": ([self.bos] if add_special_tokens else []) + ids}

    def ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self(text, add_special_tokens=False)["input_ids"])


# -- scoring ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context, stride", [(20, 1), (20, 7), (20, 20), (64, 32)])
def test_a_sequence_within_one_window_gives_the_single_window_value_and_the_model_loss(model, context, stride):
    ids = random_ids(20)
    strided = strided_perplexity(model, ids, context=context, stride=stride)
    single = single_window_perplexity(model, ids)
    with torch.no_grad():
        hf_loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert strided["tokens"] == single["tokens"] == 19
    assert strided["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    assert single["nll"] == pytest.approx(hf_loss, rel=1e-5)
    assert single["perplexity"] == pytest.approx(math.exp(single["nll"]), rel=1e-12)


def test_single_window_equals_one_prefix_forward_per_token(model):
    ids = random_ids(12, seed=2)
    expected = reference_nll(model, ids, [(t, 0) for t in range(1, 12)])
    assert single_window_perplexity(model, ids)["nll"] == pytest.approx(expected, rel=1e-6)
    # max_tokens keeps only the first tokens
    first_8 = reference_nll(model, ids, [(t, 0) for t in range(1, 8)])
    got = single_window_perplexity(model, ids, max_tokens=8)
    assert (got["tokens"], got["nll"]) == (7, pytest.approx(first_8, rel=1e-6))


def test_overlapping_windows_score_each_token_once_with_the_left_context_of_its_window(model):
    # N=10, context=4, stride=2: windows [0,4) [2,6) [4,8) [6,10); each scores the tokens no window scored before
    ids = random_ids(10, seed=3)
    scored = [(1, 0), (2, 0), (3, 0),  # window [0,4): token 0 has no left context
              (4, 2), (5, 2),          # window [2,6): 2, 3 are context only
              (6, 4), (7, 4),
              (8, 6), (9, 6)]
    got = strided_perplexity(model, ids, context=4, stride=2)
    assert got["tokens"] == 9
    assert got["nll"] == pytest.approx(reference_nll(model, ids, scored), rel=1e-6)
    # the window's context matters with this model: the full-prefix value is far from it
    assert abs(got["nll"] - reference_nll(model, ids, [(t, 0) for t in range(1, 10)])) > 1e-3


def test_disjoint_windows_leave_the_first_token_of_each_window_unscored(model):
    ids = random_ids(10, seed=4)
    scored = [(1, 0), (2, 0), (3, 0), (5, 4), (6, 4), (7, 4), (9, 8)]  # windows [0,4) [4,8) [8,10)
    got = strided_perplexity(model, ids, context=4, stride=4)
    assert got["tokens"] == 7
    assert got["nll"] == pytest.approx(reference_nll(model, ids, scored), rel=1e-6)


@pytest.mark.parametrize("n, context, stride", [(30, 8, 1), (30, 8, 3), (31, 8, 7), (30, 8, 8), (33, 8, 8),
                                                (17, 16, 5), (2, 2, 1), (64, 64, 64)])
def test_scored_token_count(model, n, context, stride):
    expected = n - 1 if stride < context else n - math.ceil(n / context)  # disjoint: one unscored per window
    assert strided_perplexity(model, random_ids(n), context, stride)["tokens"] == expected


@pytest.mark.parametrize("n, context, stride", [(30, 8, 1), (30, 8, 3), (31, 8, 7), (30, 8, 8), (33, 8, 8),
                                                (17, 16, 5), (2, 2, 1), (64, 64, 64), (5, 8, 4)])
def test_the_progress_bar_total_is_the_number_of_windows_scored(model, monkeypatch, n, context, stride):
    from lowrank_bench import perplexity as module

    windows = []
    real = module.window_nll
    monkeypatch.setattr(module, "window_nll", lambda *args: windows.append(1) or real(*args))
    strided_perplexity(model, random_ids(n), context, stride)
    assert len(windows) == module.window_count(n, context, stride)


def test_batched_shape_and_training_mode_are_handled(model):
    ids = random_ids(16, seed=5)
    expected = strided_perplexity(model, ids, context=8, stride=4)
    model.train()
    try:
        got = strided_perplexity(model, ids[None], context=8, stride=4)  # (1, N), dropout would change the value
        assert model.training
        single = single_window_perplexity(model, ids[None])
        assert model.training
    finally:
        model.eval()
    assert got == pytest.approx(expected, rel=1e-6)
    assert single["nll"] == pytest.approx(reference_nll(model, ids, [(t, 0) for t in range(1, 16)]), rel=1e-6)


def test_bad_windows_raise(model):
    ids = random_ids(10)
    with pytest.raises(LrbenchError, match=r"perplexity\.stride=5 .*choose 1 <= stride <= 4"):
        strided_perplexity(model, ids, context=4, stride=5)
    with pytest.raises(LrbenchError, match=r"perplexity\.stride=0"):
        strided_perplexity(model, ids, context=4, stride=0)
    with pytest.raises(LrbenchError, match=r"perplexity\.context=1"):
        strided_perplexity(model, ids, context=1, stride=1)
    with pytest.raises(LrbenchError, match="1 token"):
        single_window_perplexity(model, ids[:1])
    with pytest.raises(LrbenchError, match=r"shape \(2, 10\)"):
        strided_perplexity(model, torch.stack([ids, ids]), context=4, stride=2)


# -- text ---------------------------------------------------------------------------------------------------------
def test_read_corpus_checks_the_file(tmp_path):
    good = tmp_path / "valid.txt"
    good.write_text(" = Title = \n\nSome text , here .\n", encoding="utf-8")
    assert read_corpus(good) == " = Title = \n\nSome text , here .\n"
    with pytest.raises(LrbenchError, match=f"perplexity corpus {tmp_path / 'absent.txt'} does not exist"):
        read_corpus(tmp_path / "absent.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n \t\n")
    with pytest.raises(LrbenchError, match=f"perplexity corpus {blank} is empty"):
        read_corpus(blank)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(LrbenchError, match=f"perplexity corpus {latin} is not UTF-8"):
        read_corpus(latin)


def test_standard_protocol_tokenises_the_text_as_is_without_special_tokens():
    tokenizer = CharTokenizer()
    text = " = A = \n \n\nb c\n"
    ids = corpus_ids(tokenizer, text, "standard")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [2 + ord(c) % (VOCAB - 2) for c in text]  # no BOS in front


def test_curlora_protocol_drops_blank_lines_and_joins_the_rest_without_separator():
    # as CURLoRA's "".join(s for s in wikitext_rows if s != ""): datasets' rows keep their "\n", blank rows are ""
    text = " = Title = \n \n\nfirst line .\n\t\nsecond\n\nlast"
    expected = " = Title = \nfirst line .\nsecond\nlast"
    assert curlora_text(text) == expected
    assert corpus_ids(CharTokenizer(), text, "curlora").tolist() == CharTokenizer().ids(expected).tolist()
    with pytest.raises(LrbenchError, match="protocol='hf'; valid: curlora, standard"):
        corpus_ids(CharTokenizer(), text, "hf")


# -- entry point --------------------------------------------------------------------------------------------------
def test_default_context_is_the_model_positions_capped_at_1024():
    def fake(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert default_context(fake(n_positions=64)) == 64
    assert default_context(fake(max_position_embeddings=32768)) == 1024
    assert default_context(fake()) == 1024


def test_perplexity_picks_windows_and_protocol_from_the_mode(short_model, model):
    tokenizer = CharTokenizer()
    text = "the cat sat.\n \n" * 3  # 45 characters: longer than the short model's 16 positions
    ids = tokenizer.ids(text)
    # strided, context=None -> 16 positions, stride=None -> 8: the first window from token 1 on, then 8 a window
    scored = [(t, 0) for t in range(1, 16)] + [(t, start - 8) for start in range(16, 45, 8)
                                               for t in range(start, min(start + 8, 45))]
    got = perplexity(short_model, tokenizer, text)
    assert got["tokens"] == len(ids) - 1 == 44
    assert got["nll"] == pytest.approx(reference_nll(short_model, ids, scored), rel=1e-6)
    # single_window: blank lines dropped, then the first 30 tokens in one pass
    curlora_ids = tokenizer.ids("the cat sat.\n" * 3)
    got = perplexity(model, tokenizer, text, mode="single_window", max_tokens=30)
    assert got["tokens"] == 29
    assert got["nll"] == pytest.approx(reference_nll(model, curlora_ids, [(t, 0) for t in range(1, 30)]), rel=1e-6)


def test_perplexity_settings_that_cannot_work_raise(model):
    tokenizer, text = CharTokenizer(), "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 4
    with pytest.raises(LrbenchError, match=r"perplexity\.mode='sliding'; valid: single_window, strided"):
        perplexity(model, tokenizer, text, mode="sliding")
    with pytest.raises(LrbenchError, match=r"perplexity\.context=128 exceeds the model's 64 positions"):
        perplexity(model, tokenizer, text, context=128)
    with pytest.raises(LrbenchError, match=r"perplexity\.max_tokens=10000: one window of 208 tokens exceeds"):
        perplexity(model, tokenizer, text, mode="single_window")
    with pytest.raises(LrbenchError, match=r"perplexity\.stride=9"):
        perplexity(model, tokenizer, text, context=8, stride=9)


@needs_data
def test_a_random_model_has_about_vocabulary_size_perplexity_on_wikitext():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizers" / "gpt2")
    text = read_corpus(DATA / "wikitext-2" / "valid.txt")
    lines = text.split("\n")
    kept = curlora_text(text)
    assert kept.count("\n") == sum(1 for line in lines[:-1] if line.strip())  # every non-blank line, newline kept
    assert not any(not line.strip() for line in kept.split("\n")[:-1])
    torch.manual_seed(0)
    # the default initializer_range: logits near 0, so p ~ 1/V for every token, and perplexity ~ V
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=128))
    got = perplexity(lm, tokenizer, text[:5000], context=128, stride=64)
    n = len(tokenizer(text[:5000])["input_ids"])  # GPT-2 adds no special tokens either way
    assert got["tokens"] == n - 1
    assert got["perplexity"] == pytest.approx(len(tokenizer), rel=0.05)


# -- CURLoRA's corpus: wikitext-2-raw-v1, test split, blank rows dropped (issue 23) --------------------------------
RAW_TEST = DATA / "wikitext-2" / "wiki.test.raw" if DATA else None
needs_raw_test = pytest.mark.skipif(RAW_TEST is None or not RAW_TEST.is_file(),
                                    reason="shared data absent: set LRBENCH_DATA_DIR to the shared data folder, which "
                                           "holds wikitext-2/wiki.test.raw (CI sets it to ../shared/data)")


@needs_raw_test
@pytest.mark.parametrize("preset,window", [("curlora/gpt2_large_continual", 256),
                                           ("curlora/mistral_7b_continual", 10000)])
def test_curlora_presets_score_the_raw_test_split_read_from_the_shared_file(preset, window):
    from transformers import AutoTokenizer

    from lowrank_bench import curriculum

    cfg = compose_cfg(f"experiment={preset}")
    assert cfg.task.perplexity.max_tokens == window  # GPT-2: the code's max_len (code/utils.py:21,30)
    corpus = curriculum.build(cfg).perplexity_corpus()
    assert corpus.path == RAW_TEST and corpus.label == f"wikitext-2-raw-v1/test: {RAW_TEST}"
    text = corpus.text()
    lines = RAW_TEST.read_bytes().decode("utf-8").split("\n")
    assert text == RAW_TEST.read_text(encoding="utf-8") and lines[-1] == ""  # the file as is, newline-terminated
    assert len(lines) - 1 == 2891 and all(line.strip() for line in lines[:-1])  # 2,891 rows, no blank one
    assert lines[0] == " = Robert Boulter = "  # the test split's first article (validation's: Homarus gammarus)
    assert "<unk>" not in text  # raw, not the tokenised files' vocabulary
    assert curlora_text(text) == text  # blank rows already dropped: the protocol's join changes nothing
    # what the preset scores: the first `window` GPT-2 tokens in one pass, as calculate_perplexity's HF loss
    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizers" / "gpt2")
    ids = corpus_ids(tokenizer, text, "curlora")
    assert len(ids) > window and text.startswith(tokenizer.decode(ids[:window]))  # byte-level BPE: lossless
    if window > 1024:  # Mistral's 10,000 tokens (its tokenizer differs): the GPT-2 window is scored below
        return
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                                    n_positions=1024)).eval()
    got = score(lm, ids, "single_window", max_tokens=cfg.task.perplexity.max_tokens)
    with torch.no_grad():
        hf_loss = lm(ids[None, :window], labels=ids[None, :window]).loss.item()  # code/utils.py:40-43
    assert got["tokens"] == window - 1
    assert got["nll"] == pytest.approx(hf_loss, rel=1e-5)


@needs_data
def test_the_offline_sequence_keeps_the_tokenised_validation_file():
    from lowrank_bench import curriculum

    cfg = compose_cfg("task=continual/offline", "model=smollm2-135m")
    corpus = curriculum.build(cfg).perplexity_corpus()
    assert corpus.path == DATA / "wikitext-2" / "valid.txt" and corpus.label == str(corpus.path)
    assert "<unk>" in corpus.text()


def test_named_corpora_resolve_to_the_shared_file_or_the_hub(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(" = A = \n b .\n")
    name = "wikitext-2-raw-v1/test"
    assert set(CORPORA) == {name}
    assert resolve_corpus(name, "auto", tmp_path).text() == " = A = \n b .\n"
    hub = resolve_corpus(name, "auto", None)  # no shared folder: the Hub's rows
    assert (hub.path, hub.hub) == (None, ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"))
    assert hub.label == "wikitext-2-raw-v1/test: hub Salesforce/wikitext wikitext-2-raw-v1 test"
    assert resolve_corpus(name, "hub", tmp_path).hub == hub.hub  # hub wins over the shared file
    assert resolve_corpus(None, "auto", tmp_path).path == tmp_path / "wikitext-2" / "valid.txt"
    assert resolve_corpus(str(tmp_path / "x.txt")).path == tmp_path / "x.txt"


@pytest.mark.parametrize("corpus,source,shared,message", [
    ("wikitext-2-raw-v1/test", "cloud", None, r"task.perplexity.source='cloud'; valid: auto, hub, local"),
    ("wikitext-2-raw-v1/test", "local", None, r"source=local: no file \$LRBENCH_DATA_DIR/wikitext-2/wiki.test.raw"),
    ("notes.txt", "hub", None, r"source=hub with task.perplexity.corpus=notes.txt, a file: .* wikitext-2-raw-v1/test"),
    (None, "auto", None, r"task.perplexity.corpus is not set and LRBENCH_DATA_DIR is unset"),
])
def test_corpus_settings_that_cannot_work_raise(corpus, source, shared, message):
    with pytest.raises(LrbenchError, match=message):
        resolve_corpus(corpus, source, shared)


def test_the_hub_corpus_offline_fails_fast_naming_the_dataset():
    import time

    started = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)Dataset 'Salesforce/wikitext wikitext-2-raw-v1 test' is not in the "
                                           r"local .*wiki.test.raw"):
        resolve_corpus("wikitext-2-raw-v1/test", "hub").text()
    assert time.perf_counter() - started < 30
