"""Instruction tuning: loss masking under the chat, llama3 and plain templates, LLaMA-Factory's cutoff, the paper's
per-dataset sampling and held-out split, column mapping over JSON/JSONL/CSV, empty responses counted (never
silently dropped), bad inputs, and every method trained end to end on a local file with a tiny Llama."""
from __future__ import annotations

import copy
import csv
import json
import math
import time

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import Head, load_model, load_tokenizer
from lowrank_bench.results import read_rows
from lowrank_bench.tasks import build
from lowrank_bench.tasks.sft import (
    IGNORE,
    Turn,
    cutoff_lengths,
    encode_turn,
    pack,
    prompt_text,
    resolve_template,
    turn_ids,
)
from tests.conftest import CONF, compose_cfg, model_cfg
from tests.test_cli import FAST, METHODS, lrbench

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"It is {a + b}."}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3), (9, 9), (5, 5), (3, 8), (2, 2)]]
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tok():
    """The tiny Llama's tokenizer (MiniLM's WordPiece): no chat template, [CLS] before a text and [SEP] after."""
    return load_tokenizer(model_cfg("tiny-llama"))


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's tokenizer (ChatML chat template), read from its GGUF: seconds, no weights."""
    return load_tokenizer(model_cfg("smollm2-135m"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_task(*files, **settings):
    overrides = [f"task.files=[{','.join(str(f) for f in files)}]"] if files else []
    overrides += [f"task.{k}={v}" for k, v in settings.items()]
    return build(compose_cfg("task=sft/math", "model=tiny-llama", *overrides).task)


def labelled(example) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE]


# -- masking -------------------------------------------------------------------------------------------------------
def test_plain_template_labels_the_response_and_its_end_and_masks_the_whole_prompt(tok):
    turn = Turn("What is 2 plus 3?", "It is 5.")
    prompt, response = turn_ids(tok, "plain", turn)
    example = encode_turn(tok, "plain", turn, 64)
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE] * len(prompt) + response
    assert prompt[0] == tok.cls_token_id and response[-1] == tok.sep_token_id  # the tokenizer's own framing
    assert tok.decode(labelled(example)) == "it is 5. [SEP]"
    assert tok.decode(prompt) == "[CLS] # # # instruction : what is 2 plus 3? # # # response :"


def test_chat_template_masks_everything_up_to_the_assistant_turn(smol_tok):
    turn = Turn("What is 2 plus 3?", "It is 5.", system="Be brief.")
    example = encode_turn(smol_tok, resolve_template("auto", smol_tok), turn, 256)
    n_prompt = example["labels"].count(IGNORE)
    assert smol_tok.decode(example["input_ids"][:n_prompt]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert smol_tok.decode(labelled(example)) == "It is 5.<|im_end|>\n"
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]  # the response, unshifted (HF shifts)


def test_llama3_template_is_llama_factorys_format(tok):
    llama_tok = copy.deepcopy(tok)
    llama_tok.add_special_tokens({"additional_special_tokens": LLAMA3})
    turn = Turn("hi there", "hello")
    assert prompt_text(llama_tok, "llama3", turn) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    example = encode_turn(llama_tok, resolve_template("llama3", llama_tok), turn, 64)
    assert llama_tok.convert_ids_to_tokens(labelled(example)) == ["hello", "<|eot_id|>"]


def test_a_template_the_tokenizer_lacks_is_refused(tok):
    with pytest.raises(LrbenchError, match="task.template=chat but the tokenizer .* has no chat template"):
        resolve_template("chat", tok)
    with pytest.raises(LrbenchError, match=r"task.template=llama3 but the tokenizer .* lacks \['<\|begin_of_text"):
        resolve_template("llama3", tok)
    with pytest.raises(LrbenchError, match="task.template='alpaca' is not one of: auto, chat, llama3, none, plain"):
        resolve_template("alpaca", tok)
    assert resolve_template("auto", tok) == "plain"


def test_the_task_loss_is_the_cross_entropy_of_the_response_tokens_only(tok, tmp_path):
    task = sft_task(write_jsonl(tmp_path / "a.jsonl", ROWS))
    task.prepare(tok, 64)
    torch.manual_seed(0)
    model = load_model(model_cfg("tiny-llama"), Head("causal_lm"), tok.pad_token_id)
    batch = task.collate(task.splits["train"][:4])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][scored], targets[scored])
    assert torch.allclose(task.loss(model, batch), expected, atol=1e-6)
    assert (batch["labels"] == IGNORE).sum() > scored.sum()  # the prompts are longer than the answers here
    metrics = task.evaluate(model, "validation")
    assert set(metrics) == {"eval_loss", "perplexity", "token_accuracy"}
    assert math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-9)


def test_gradient_checkpointing_switch_changes_nothing_but_memory(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    grads = []
    for switch in (False, True):
        task = sft_task(path, gradient_checkpointing=switch)
        task.prepare(tok, 64)
        torch.manual_seed(0)
        model = load_model(model_cfg("tiny-llama"), Head("causal_lm"), tok.pad_token_id).train()
        task.loss(model, task.collate(task.splits["train"][:4])).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
        assert model.model.gradient_checkpointing is switch
    assert torch.allclose(*grads, atol=1e-6)


# -- cutoff, empty responses, packing ------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, response, cutoff, kept", [
    (10, 5, 64, (10, 5)),     # fits
    (100, 10, 64, (54, 10)),  # short response: the prompt is cut
    (10, 100, 64, (10, 54)),  # short prompt: the response gets the rest
    (60, 40, 64, (39, 25)),   # both long: the cutoff shared in proportion, floor(64 * 40 / 100) = 25
    (500, 2, 64, (62, 2)),
    (5000, 40, 64, (64, 0)),  # floor(64 * 40 / 5040) = 0: the response is emptied
])
def test_cutoff_is_shared_between_prompt_and_response_as_in_llama_factory(prompt, response, cutoff, kept):
    assert cutoff_lengths(prompt, response, cutoff) == kept


def test_empty_responses_are_counted_reported_and_left_out(tok, tmp_path, capsys):
    rows = ROWS[:10] + [{"instruction": "Say nothing.", "input": "", "output": "  "},
                        {"instruction": "word " * 3000, "input": "", "output": "ok " * 40}]  # 64 * 41 // 3050 = 0
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    task = sft_task(path, val_fraction=0.01)  # ceil(0.12) = 1 held out
    task.prepare(tok, 64)
    report = task.result_counts()
    assert sum(report[f"sft_{s}_empty_responses"] for s in ("train", "validation")) == 2
    assert sum(report[f"sft_{s}_examples"] for s in ("train", "validation")) == 10
    assert sum(report[f"sft_{s}_truncated"] for s in ("train", "validation")) == 1
    assert len(task.splits["train"]) + len(task.splits["validation"]) == 10
    assert all(labelled(e) for split in task.splits.values() for e in split)
    assert sum(c["empty_in_data"] for c in task.counts.values()) == 1
    assert sum(c["emptied_by_cutoff"] for c in task.counts.values()) == 1
    warnings = capsys.readouterr().err
    assert "have an empty response" in warnings and "left out of training and evaluation" in warnings
    with pytest.raises(LrbenchError, match="empty response .* set task.empty_response=drop"):
        sft_task(path, empty_response="error").prepare(tok, 64)


def test_packing_fills_sequences_with_whole_examples_and_keeps_their_labels():
    examples = [{"input_ids": [i] * n, "attention_mask": [1] * n, "labels": [IGNORE] * (n - 1) + [i]}
                for i, n in enumerate([6, 5, 4, 3, 2], start=1)]
    packed = pack(examples, 8)
    assert [len(p["input_ids"]) for p in packed] == [8, 8, 4]  # 6+2, 5+3, 4
    assert sorted(t for p in packed for t in p["labels"] if t != IGNORE) == [1, 2, 3, 4, 5]


# -- data: sampling, split, columns, sources -----------------------------------------------------------------------
def test_max_samples_takes_the_first_rows_of_each_dataset_then_a_seeded_holdout(tok, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", ROWS)
    second = write_jsonl(tmp_path / "second.jsonl", [dict(r, output=r["output"] + " Yes.") for r in ROWS])
    task = sft_task(first, second, max_samples=5)
    raw = task.raw_split("train") + task.raw_split("validation")
    assert len(raw) == 10 and len(task.raw_split("validation")) == 1  # ceil(0.1 * 10)
    assert sorted(t.user for t in raw) == sorted(2 * [r["instruction"] for r in ROWS[:5]])
    assert sft_task(first, second, max_samples=5).raw_split("validation") == task.raw_split("validation")
    seeded = sft_task(first, max_samples=5, sample="seeded", val_fraction=0.2)
    users = {t.user for t in seeded.raw_split("train") + seeded.raw_split("validation")}
    assert len(users) == 5 and users != {r["instruction"] for r in ROWS[:5]}
    assert users == {t.user for s in ("train", "validation")
                     for t in sft_task(first, max_samples=5, sample="seeded", val_fraction=0.2).raw_split(s)}


def test_columns_are_found_in_json_jsonl_and_csv_and_a_missing_one_names_the_fix(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q1", "context": "c1", "answer": "a1"}]))
    with open(tmp_path / "b.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["prompt", "response", "system"], ["q2", "a2", "be kind"]])
    write_jsonl(tmp_path / "c.jsonl", [{"ask": "q3", "say": "a3"}])
    task = sft_task(tmp_path / "a.json", tmp_path / "b.csv", val_fraction=0.5)
    turns = task.raw_split("train") + task.raw_split("validation")
    assert sorted(turns, key=lambda t: t.user) == [Turn("q1\nc1", "a1"), Turn("q2", "a2", "be kind")]
    with pytest.raises(LrbenchError, match=r"c.jsonl: no column for the instruction .* found \['ask', 'say'\]; "
                                           r"map it with task.columns.instruction=<column>"):
        sft_task(tmp_path / "c.jsonl").raw_split("train")
    mapped = sft_task(tmp_path / "c.jsonl", columns="{instruction: ask, output: say}", val_fraction=0.5)
    assert (mapped.raw_split("train") + mapped.raw_split("validation"))[0] == Turn("q3", "a3")


def test_data_dir_reads_colas_file_names_and_a_dataset_without_hub_copy_says_where_to_put_it(tmp_path):
    write_jsonl(tmp_path / "Lawyer-Instruct.jsonl", ROWS)
    with pytest.raises(LrbenchError, match=r"dataset 'us_terms' has no Hub copy and no local file .* put "
                                           r"us_terms.json \(CoLA: LLaMA-Factory/data/us_terms.json\)"):
        build(compose_cfg("task=sft/law", f"task.data_dir={tmp_path}").task)
    write_jsonl(tmp_path / "us_terms.jsonl", ROWS[:3])
    task = build(compose_cfg("task=sft/law", f"task.data_dir={tmp_path}", "task.max_samples=4").task)
    assert len(task.raw_split("train") + task.raw_split("validation")) == 4 + 3


def test_an_unreachable_hub_fails_within_seconds_and_says_how_to_use_local_files():
    task = build(compose_cfg("task=sft/generality", "task.source=hub").task)
    start = time.perf_counter()
    with pytest.raises(LrbenchError, match="databricks/databricks-dolly-15k' is not in the local Hugging Face cache"):
        task.raw_split("train")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("override, message", [
    ("task.val_fraction=0", "task.val_fraction=0: the trainer evaluates on the held-out split"),
    ("task.sample=shuffled", "task.sample='shuffled' is not one of: first, seeded"),
    ("task.max_samples=0", "task.max_samples=0: choose a positive number"),
    ("task.files=[/nowhere/x.jsonl]", "task.files: no such file /nowhere/x.jsonl"),
])
def test_bad_settings_are_refused_with_the_setting_and_the_choices(override, message):
    with pytest.raises(LrbenchError, match=message):
        build(compose_cfg("task=sft/math", override).task)


def test_every_sft_domain_composes_with_its_sources():
    for path in sorted((CONF / "task" / "sft").glob("[!_]*.yaml")):
        cfg = compose_cfg(f"task=sft/{path.stem}").task
        assert cfg.name == f"sft/{path.stem}" and cfg.family == "sft" and cfg.sources and cfg.max_samples == 1000


def test_cola_experiments_compose_with_the_papers_recipe():
    if "eval" not in str(OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").defaults)):
        pytest.skip("lowrank_bench/conf/config.yaml has no `- eval: null` default yet, which lowrank_bench/conf/experiment/cola/* override")
    experiments = sorted((CONF / "experiment" / "cola").glob("*.yaml"))
    assert len(experiments) == 12
    for path in experiments:
        cfg = compose_cfg(f"experiment=cola/{path.stem}")
        assert (cfg.trainer.batch_size, cfg.trainer.grad_accum, cfg.trainer.epochs) == (8, 8, 5), path.stem
        assert (cfg.optimizer.lr, cfg.optimizer.schedule, cfg.optimizer.warmup_steps) == (5e-5, "cosine", 20)
        assert (cfg.method.r, cfg.method.alpha, cfg.method.targets) == (8, 16, "all")
        assert (cfg.task.max_length, cfg.task.template, cfg.task.max_samples) == (1024, "llama3", 1000)
        assert cfg.eval.name in ("mmlu", "mmlu_law", "mmlu_medicine", "gsm8k", "fineval", "bbh")


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_method_trains_on_an_sft_task_with_a_tiny_llama(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", ROWS * 2)
    csv_path = tmp_path / "sft.csv"
    result = lrbench("-m", f"method={','.join(METHODS)}", "model=tiny-llama", "task=sft/math",
                     f"task.files=[{data}]", *FAST, "trainer.batch_size=4",
                     env={"LRBENCH_RESULTS_CSV": str(csv_path)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(csv_path)
    assert [r["method"] for r in rows] == METHODS
    assert all(r["task"] == "sft/math" and int(r["trainable_params"]) > 0 for r in rows)
    assert all(math.isfinite(float(r["last_eval_loss"])) and 0 <= float(r["best_token_accuracy"]) <= 1 for r in rows)


def test_task_source_local_needs_every_dataset_and_hub_refuses_local_files(tmp_path, monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "Lawyer-Instruct.jsonl").write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    with pytest.raises(LrbenchError, match=r"task.source=local but dataset 'us_terms' has no local file in"):
        build(compose_cfg("task=sft/law", f"task.data_dir={folder}", "task.source=local").task)
    with pytest.raises(LrbenchError, match=r"task.source=local but there is no local data: .*\$LRBENCH_DATA_DIR/sft"):
        build(compose_cfg("task=sft/math", "task.source=local").task)
    with pytest.raises(LrbenchError, match="task.files lists local files but task.source=hub"):
        build(compose_cfg("task=sft/math", f"task.files=[{folder}/Lawyer-Instruct.jsonl]", "task.source=hub").task)
    with pytest.raises(LrbenchError, match="task.source=hub but dataset 'us_terms' has no Hub copy"):
        build(compose_cfg("task=sft/law", "task.source=hub").task)
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(LrbenchError, match="LRBENCH_DATA_DIR=.*elsewhere has no folder sft"):
        build(compose_cfg("task=sft/math").task)
    assert build(compose_cfg("task=sft/math", "task.source=hub").task).sources[0].path is None
