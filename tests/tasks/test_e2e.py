"""E2E NLG as a generation task: training examples, the label-smoothed loss on references only, the offline split by
MR, batched left-padded beam search, the official files of each evaluation, bad input, and every method end to end."""
from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lowrank_bench import e2e_metrics
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import Head, load_model, load_tokenizer
from lowrank_bench.results import read_rows
from lowrank_bench.tasks import build
from lowrank_bench.tasks.e2e import E2ETask, reference_loss
from lowrank_bench.train import run
from tests.conftest import CONF, DATA, compose_cfg, model_cfg, needs_data
from tests.test_cli import FAST, METHODS, lrbench

RESTAURANTS = {  # MR -> references: a small devset.csv of our own
    "name[The Eagle], eatType[pub], area[riverside]": ["The Eagle is a pub by the river.",
                                                       "By the riverside is a pub, The Eagle."],
    "name[The Mill], food[Chinese], priceRange[cheap]": ["The Mill serves cheap Chinese food."],
    "name[Alimentum], area[city centre], familyFriendly[no]": ["Alimentum is not family-friendly.",
                                                               "In the city centre, Alimentum is for adults.",
                                                               "Alimentum, city centre, no kids."],
    "name[Zizzi], eatType[coffee shop], customer rating[5 out of 5]": ["Zizzi is a coffee shop rated 5 out of 5."],
    "name[Cotto], food[Italian], near[The Bakers]": ["Cotto serves Italian food near The Bakers.",
                                                     "Near The Bakers, Cotto has Italian food."],
    "name[Aromi], eatType[restaurant], area[riverside]": ["Aromi is a restaurant in the riverside area."],
}
TINY = {"max_length": 64, "generation": {"num_beams": 2, "max_new_tokens": 6}}


def write_csv(folder, rows, name="devset.csv", header=("mr", "ref")):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL)
        writer.writerow(header)
        writer.writerows(rows)
    return folder


def devset(tmp_path):
    return write_csv(tmp_path / "e2e", [(mr, ref) for mr, refs in RESTAURANTS.items() for ref in refs])


def task_cfg(data_dir, **overrides):
    base = OmegaConf.load(CONF / "task" / "e2e.yaml")
    return OmegaConf.merge(base, {"data_dir": str(data_dir), "split": "dev_by_mr", "eval_mrs": 2}, TINY, overrides)


_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name="tiny-gpt2"):
    if name not in _MODELS:
        torch.manual_seed(0)
        cfg = model_cfg(name)
        tokenizer = load_tokenizer(cfg)
        _MODELS[name] = (load_model(cfg, Head("causal_lm"), tokenizer.pad_token_id).eval(), tokenizer)
    return _MODELS[name]


def prepared(tmp_path, model="tiny-gpt2", **overrides):
    task = E2ETask(task_cfg(devset(tmp_path), **overrides))
    task.prepare(tiny(model)[1], task.cfg.max_length)
    return task


# -- data and examples ------------------------------------------------------------------------------------------
def test_training_example_is_mr_separator_reference_eos_with_loss_on_the_reference_only(tmp_path):
    task = prepared(tmp_path)
    tokenizer = tiny()[1]
    mr, ref = next((mr, refs[0]) for mr, refs in RESTAURANTS.items() if mr not in task_mrs(task))
    prompt = tokenizer(mr, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]  # MiniLM: no EOS
    target = tokenizer(" " + ref, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    example = task.splits["train"][0]
    assert example["input_ids"] == prompt + target
    assert example["labels"] == [-100] * len(prompt) + target


@needs_data
def test_gpt2_examples_use_endoftext_as_separator_and_end(tmp_path):
    tokenizer = load_tokenizer(model_cfg("tiny-gpt2-bpe"))
    task = E2ETask(task_cfg(devset(tmp_path)))
    task.prepare(tokenizer, 64)
    ids = task.splits["train"][0]["input_ids"]
    assert ids.count(50256) == 2 and ids[-1] == 50256
    assert tokenizer.decode(ids).count("<|endoftext|>") == 2
    assert task.splits["validation"][0]["prompt_ids"][-1] == 50256


CHATML = ("{% for m in messages %}[CLS]{{ m['role'] }}\n{{ m['content'] }}[SEP]\n{% endfor %}"
          "{% if add_generation_prompt %}[CLS]assistant\n{% endif %}")


def chat_tokenizer():
    """The tiny model's tokenizer given a ChatML-like template ([CLS] opens a turn, [SEP] closes it)."""
    tokenizer = copy.deepcopy(tiny()[1])
    tokenizer.chat_template = CHATML
    return tokenizer


def test_a_chat_tokenizer_frames_the_mr_as_the_user_turn_and_trains_on_the_assistant_turn_only(tmp_path):
    tokenizer = chat_tokenizer()
    plain = prepared(tmp_path)  # the same data and tokenizer name first: its cached encodings must not be reused
    task = E2ETask(task_cfg(tmp_path / "e2e"))
    task.prepare(tokenizer, 64)
    assert task.chat and not plain.chat and task.end_id == tokenizer.sep_token_id  # the turn's end, [SEP]
    mr, ref = next((mr, refs[0]) for mr, refs in RESTAURANTS.items() if mr not in task_mrs(task))
    prompt = tokenizer(f"[CLS]user\n{mr}[SEP]\n[CLS]assistant\n", add_special_tokens=False)["input_ids"]
    target = tokenizer(f"{ref}[SEP]\n", add_special_tokens=False)["input_ids"]
    example = task.splits["train"][0]
    assert example["input_ids"] == prompt + target and example["input_ids"] != plain.splits["train"][0]["input_ids"]
    assert example["labels"] == [-100] * len(prompt) + target
    group = task.splits["validation"][0]
    assert group["prompt_ids"] == tokenizer(f"[CLS]user\n{group['mr']}[SEP]\n[CLS]assistant\n",
                                            add_special_tokens=False)["input_ids"]
    ids = task.generate_ids(tiny()[0], [g["prompt_ids"] for g in task.splits["validation"]], batch_size=2)
    assert all(task.end_id not in i for i in ids)


def test_a_tokenizer_without_chat_template_or_a_given_separator_keeps_mr_separator_prompts(tmp_path):
    tokenizer = tiny()[1]
    task = prepared(tmp_path)
    group = task.splits["validation"][0]
    assert not task.chat and group["prompt_ids"] == tokenizer(group["mr"], add_special_tokens=False)["input_ids"] + [
        tokenizer.sep_token_id]
    chat = E2ETask(task_cfg(tmp_path / "e2e", separator=" ||"))
    chat.prepare(chat_tokenizer(), 64)
    group = chat.splits["validation"][0]
    assert not chat.chat and group["prompt_ids"] == tokenizer(group["mr"] + " ||", add_special_tokens=False)[
        "input_ids"]


def test_mostly_empty_generations_are_one_warning_and_flag_the_row(tmp_path, monkeypatch, capsys):
    task = prepared(tmp_path, eval_mrs=3)
    monkeypatch.setattr(task, "generate_texts", lambda *a, **k: ["", "A pub.", ""])
    scores = task.evaluate(tiny()[0], "validation", batch_size=2)
    warning = [line for line in capsys.readouterr().err.splitlines() if "empty" in line]
    assert len(warning) == 1 and "2 of 3 generated texts are empty" in warning[0]
    assert scores["BLEU"] < 0.5 and scores["degenerate"] is True  # the row's flag
    monkeypatch.setattr(task, "generate_texts", lambda *a, **k: ["", "A pub.", "A bar."])
    assert task.evaluate(tiny()[0], "validation", batch_size=2)["degenerate"] is False
    assert "empty" not in capsys.readouterr().err


def task_mrs(task):
    return {g["mr"] for g in task.splits["validation"]}


def test_dev_by_mr_split_is_disjoint_seeded_and_sized(tmp_path):
    task = prepared(tmp_path, eval_mrs=3)
    held_out = task_mrs(task)
    assert task.name == "e2e/dev_by_mr" and len(held_out) == 3
    train_pairs = task.raw_split("train")
    assert {p["mr"] for p in train_pairs}.isdisjoint(held_out)
    assert len(train_pairs) == sum(len(refs) for mr, refs in RESTAURANTS.items() if mr not in held_out)
    assert all(g["references"] == RESTAURANTS[g["mr"]] for g in task.splits["validation"])
    again = E2ETask(task_cfg(tmp_path / "e2e", eval_mrs=3))
    assert {p["mr"] for p in again.raw_split("validation")} == held_out
    other = E2ETask(task_cfg(tmp_path / "e2e", eval_mrs=3, split_seed=1))
    assert {p["mr"] for p in other.raw_split("validation")} != held_out


def test_auto_split_is_official_when_the_train_set_is_there(tmp_path):
    folder = devset(tmp_path)
    assert E2ETask(task_cfg(folder, split="auto")).split == "dev_by_mr"
    write_csv(folder, [("name[A]", "A is a pub.")], name="trainset.csv")
    task = E2ETask(task_cfg(folder, split="auto"))
    assert (task.split, task.name, task.eval_splits) == ("official", "e2e", ("validation",))
    assert task.raw_split("train") == [{"mr": "name[A]", "ref": "A is a pub."}]


def test_alias_task_e2e_nlg_composes_to_the_same_task():
    assert compose_cfg("task=e2e_nlg").task == compose_cfg("task=e2e").task


# -- loss ----------------------------------------------------------------------------------------------------------
def test_reference_loss_is_label_smoothed_cross_entropy_on_reference_tokens(tmp_path):
    task = prepared(tmp_path)
    model = tiny()[0]
    batch = task.collate(task.splits["train"][:3])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert reference_loss(logits, batch["labels"], 0.0) == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        logp = F.log_softmax(logits[:, :-1], -1)
        labels = batch["labels"][:, 1:]
        kept = labels != -100
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[kept]
        smoothed = 0.9 * nll + 0.1 * -logp.mean(-1)[kept]  # LoRA's GPT2LMModel, label_smooth 0.1
        assert reference_loss(logits, batch["labels"], 0.1) == pytest.approx(smoothed.mean().item(), rel=1e-5)
        assert task.loss(model, batch) == pytest.approx(smoothed.mean().item(), rel=1e-5)  # task default: 0.1


# -- generation and evaluation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_batched_left_padded_beam_search_equals_one_prompt_at_a_time(tmp_path, model):
    task = prepared(tmp_path, model=model, eval_mrs=4, generation={"num_beams": 3, "max_new_tokens": 8})
    net = tiny(model)[0]
    prompts = [g["prompt_ids"] for g in task.splits["validation"]]
    assert len({len(p) for p in prompts}) > 1  # padding is really exercised
    batched = task.generate_ids(net, prompts, batch_size=4)
    assert batched == [task.generate_ids(net, [p], batch_size=1)[0] for p in prompts]
    assert all(task.end_id not in ids and len(ids) <= 8 for ids in batched)


def test_evaluation_writes_official_files_that_rescore_to_the_same_numbers(tmp_path):
    task = prepared(tmp_path, eval_mrs=3)
    task.output_dir = tmp_path / "run"
    first = task.evaluate(tiny()[0], "validation", batch_size=2)
    second = task.evaluate(tiny()[0], "validation", batch_size=2)
    assert set(e2e_metrics.METRICS) <= set(first) and all(isinstance(first[m], float) for m in e2e_metrics.METRICS)
    assert first["hypotheses_file"].endswith("validation-hypotheses-001.txt")
    assert second["hypotheses_file"].endswith("validation-hypotheses-002.txt")
    refs = e2e_metrics.read_references(first["references_file"])
    assert refs == [RESTAURANTS[g["mr"]] for g in task.splits["validation"]]
    rescored = e2e_metrics.score(refs, e2e_metrics.read_hypotheses(first["hypotheses_file"]))
    assert rescored == {m: first[m] for m in e2e_metrics.METRICS}
    mrs = (tmp_path / "run" / "e2e" / "validation-mrs.txt").read_text().splitlines()
    assert mrs == [g["mr"] for g in task.splits["validation"]]


def test_meteor_failure_is_reported_never_scored_and_skipped_afterwards(tmp_path, monkeypatch):
    from tests.test_e2e_metrics import DIES_MID_EVALUATION, fake_java

    task = prepared(tmp_path)
    java = fake_java(tmp_path, DIES_MID_EVALUATION)
    monkeypatch.setattr(e2e_metrics, "java_executable", lambda: java)
    first = task.evaluate(tiny()[0], "validation", batch_size=2)
    assert "METEOR" not in first and "simulated crash" in first["meteor_error"]
    assert {"BLEU", "NIST", "ROUGE_L", "CIDEr"} <= set(first)
    monkeypatch.undo()  # Java works again: the run still leaves METEOR out, so best and last agree
    second = task.evaluate(tiny()[0], "validation", batch_size=2)
    assert "METEOR" not in second and second["meteor_error"].startswith("skipped: failed at an earlier evaluation")


# -- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"generation": {"max_new_tokens": 0}}, r"task.generation.max_new_tokens=0: nothing would be generated"),
    ({"generation": {"num_beams": 0}}, r"task.generation.num_beams=0"),
    ({"generation": {"beams": 4}}, r"unknown task.generation setting\(s\) \['beams'\]"),
    ({"split": "official"}, r"task.split=official needs .*trainset.csv"),
    ({"split": "train_dev"}, r"task.split='train_dev' is not one of: auto, dev_by_mr, official"),
    ({"eval_mrs": 1}, r"task.eval_mrs=1: choose an integer >= 2"),
    ({"max_eval_samples": 1}, r"task.max_eval_samples=1: choose >= 2"),
    ({"label_smoothing": 1.5}, r"task.label_smoothing=1.5"),
    ({"metric": "bleu"}, r"task.metric='bleu'; valid: BLEU, NIST"),
])
def test_bad_settings_fail_with_the_setting_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(LrbenchError, match=message):
        E2ETask(task_cfg(devset(tmp_path), **overrides))


def test_too_many_eval_mrs_leave_nothing_to_train_on(tmp_path):
    with pytest.raises(LrbenchError, match=r"task.eval_mrs=6 leaves nothing to train on: devset.csv has 6 MRs"):
        prepared(tmp_path, eval_mrs=6)


@pytest.mark.parametrize("rows,header,message", [
    ([("name[A]", "A is a pub.")], ("meaning", "text"), r"missing column\(s\) \['mr', 'ref'\]"),
    ([("name[A]", "A is a pub."), ("name[A]", "  ")], ("mr", "ref"), r"devset.csv:3: empty reference"),
])
def test_malformed_csv_fails_with_where_and_what(tmp_path, rows, header, message):
    folder = write_csv(tmp_path / "e2e", rows, header=header)
    with pytest.raises(LrbenchError, match=message):
        E2ETask(task_cfg(folder)).prepare(tiny()[1], 64)


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "task" / "e2e.yaml"), TINY)
    start = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)tuetschek/e2e_nlg' is not in the local Hugging Face cache.*"
                                           r"task.split=dev_by_mr"):
        build(cfg).prepare(tiny()[1], 64)
    assert time.perf_counter() - start < 10


# -- end to end ------------------------------------------------------------------------------------------------------
E2E_FAST = ["task=e2e", "task.eval_mrs=2", "task.max_train_samples=16", "task.generation.num_beams=2",
            "task.generation.max_new_tokens=8", "trainer.batch_size=4", "save_adapter=false"]


@needs_data
def test_every_method_runs_end_to_end_on_e2e(tmp_path):
    """PEFT LoHa cannot adapt GPT-2's Conv1D (c_attn): it runs on tiny-llama below."""
    methods = [m for m in METHODS if m != "peft/loha"]
    csv_path = tmp_path / "e2e.csv"
    result = lrbench("-m", f"method={','.join(methods)}", "model=tiny-gpt2", *FAST, *E2E_FAST,
                     env={"LRBENCH_RESULTS_CSV": str(csv_path), "LRBENCH_OUTPUT_DIR": str(tmp_path / "out"),
                          "OMP_NUM_THREADS": "1"},  # 32-wide matrices: a second thread only adds synchronisation
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(csv_path)
    assert [r["method"] for r in rows] == methods
    assert {r["task"] for r in rows} == {"e2e/dev_by_mr"} and {r["metric"] for r in rows} == {"BLEU"}
    for row in rows:
        assert int(row["trainable_params"]) > 0, row["method"]
        assert all(math.isfinite(float(row[f"best_{m}"])) for m in e2e_metrics.METRICS), row["method"]
    lines = (tmp_path / "out" / "multirun").rglob("metrics.jsonl")
    record = json.loads(next(lines).read_text().splitlines()[-1])
    command = [sys.executable, "-m", "lowrank_bench.e2e_metrics", record["references_file"], record["hypotheses_file"]]
    rescored = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert rescored == {m: record[m] for m in e2e_metrics.METRICS}


@needs_data
def test_peft_loha_runs_on_e2e_with_a_llama(tmp_path):
    cfg = compose_cfg("method=peft/loha", "model=tiny-llama", *FAST, *E2E_FAST)
    summary = run(cfg, tmp_path / "run")
    assert summary["task"] == "e2e/dev_by_mr" and math.isfinite(summary["best_BLEU"])
    assert (tmp_path / "run" / "e2e" / "validation-mrs.txt").is_file()  # in-process too, in the run's own folder


@needs_data
def test_offline_split_of_the_shared_devset_holds_out_whole_mrs():
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "task" / "e2e.yaml"), {"data_dir": str(DATA / "e2e")})
    task = E2ETask(cfg)
    assert task.split == "dev_by_mr"
    train, held_out = task.raw_split("train"), task.raw_split("validation")
    assert len(train) + len(held_out) == 4672
    assert len({p["mr"] for p in held_out}) == 50 and not {p["mr"] for p in train} & {p["mr"] for p in held_out}


# -- LoRA's GPT-2 (issue 23 point 8) -------------------------------------------------------------------------------
E2E_PRESETS = ["lora/gpt2_medium_e2e", "lora/gpt2_large_e2e", "bilora/gpt2_medium_e2e", "bilora/gpt2_large_e2e",
               "bidora/gpt2_medium_e2e"]


def dropout_rates(model) -> dict[str, float]:
    return {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}


@pytest.mark.parametrize("preset", E2E_PRESETS)
def test_e2e_presets_build_gpt2_without_dropout_and_train_with_adam_eps_1e_6_as_loras_code(preset):
    from lowrank_bench.optim import make_optimizer

    cfg = compose_cfg(f"experiment={preset}")
    assert cfg.model.name.startswith("gpt2")
    # the preset's model settings on a 2-layer GPT-2 with random weights (the real ones are a download away)
    tiny = OmegaConf.merge(model_cfg("tiny-gpt2"), {"config_overrides": cfg.model.config_overrides})
    model = load_model(tiny, Head("causal_lm"))
    assert (model.config.attn_pdrop, model.config.resid_pdrop, model.config.embd_pdrop) == (0.0, 0.0, 0.0)
    rates = dropout_rates(model)
    assert len(rates) == 1 + 2 * 3 and set(rates.values()) == {0.0}  # transformer.drop; per block attn, resid, mlp
    # HF's GPT-2 without the overrides: 0.1 everywhere (what the presets had)
    assert set(dropout_rates(load_model(model_cfg("tiny-gpt2"), Head("causal_lm"))).values()) == {0.1}
    assert cfg.optimizer.eps == 1e-6
    optimizer, _ = make_optimizer([p for p in model.parameters()][:2], cfg.optimizer, 10)
    assert {group["eps"] for group in optimizer.param_groups} == {1e-6}
