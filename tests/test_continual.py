"""Continual sequences: decoder classifiers that ignore padding, one head per task swapped back for re-evaluation,
the accuracy matrix and its measures, perplexity between stages, every method at every stage, and bad input."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from lowrank_bench import forgetting, perplexity
from lowrank_bench.errors import LrbenchError
from lowrank_bench.heads import CURLORA_HEAD_SEED, DecoderClassifier, HeadBank
from lowrank_bench.models import Head, load_tokenizer
from lowrank_bench.results import read_rows
from lowrank_bench.assembly import build_model
from lowrank_bench.train import prepare, run
from lowrank_bench.trainer import Trainer
from tests.conftest import compose_cfg, model_cfg
from tests.test_cli import METHODS, lrbench

TEXT = ("the quick brown fox jumps over the lazy dog . " * 3 + "a gripping , beautiful film about a dull plot .\n") * 4
FAST = ["trainer.max_steps=2", "trainer.progress=false", "trainer.eval_batch_size=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path


def with_perplexity(corpus: Path) -> list[str]:
    return ["task.perplexity.mode=strided", f"task.perplexity.corpus={corpus}", "task.perplexity.context=64"]


# -- decoders as classifiers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_logits_are_the_same_alone_and_in_a_padded_batch(name, side):
    cfg = model_cfg(name)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, Head("sequence_classification", 3), tokenizer.pad_token_id).eval()
    assert isinstance(model, DecoderClassifier)
    short, long = "a dull plot .", "the acting was weak and the ending never seemed to come at all ."
    alone = [tokenizer(t, return_tensors="pt") for t in (short, long)]
    tokenizer.padding_side = side
    batch = tokenizer([short, long], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short one is padded
    with torch.no_grad():
        batched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, enc in enumerate(alone):
            single = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)


def test_decoder_classifier_reads_the_last_real_token_of_the_lm_hidden_states():
    cfg = model_cfg("tiny-gpt2")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, Head("sequence_classification", 2), tokenizer.pad_token_id).eval()
    enc = tokenizer("a gripping , beautiful film .", return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        hidden = model.lm(**enc, output_hidden_states=True).hidden_states[-1]  # the LM head's input
        expected = hidden[0, -1] @ model.score.weight.T
        torch.testing.assert_close(model(**enc).logits[0], expected, atol=1e-6, rtol=1e-6)


def test_curlora_heads_have_a_bias_and_the_notebooks_seed():
    cfg = model_cfg("tiny-gpt2")
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, Head("sequence_classification", 2), tokenizer.pad_token_id)
    bank = HeadBank(model, "score", protocol="curlora")
    first, second = bank.add("a", 2), bank.add("b", 2)
    torch.manual_seed(CURLORA_HEAD_SEED)
    reference = torch.nn.Linear(32, 2)
    for params in (first, second):
        assert [p.shape for p in params] == [(2, 32), (2,)]
        assert torch.equal(params[0], reference.weight) and torch.equal(params[1], reference.bias)
    bank.use("b")
    assert model.score is model.task_heads["b"]


# -- a whole sequence, step by step -------------------------------------------------------------------------------
def build_sequence(tmp_path, *overrides):
    cfg = compose_cfg("task=continual/toy", "model=tiny-gpt2", *FAST, *overrides)
    s = prepare(cfg)
    sequence = s.curriculum
    stages = sequence.plan(cfg, s.method, s.groups)
    trainer = Trainer(cfg.trainer, s.model, s.method, tmp_path, cfg.seed, activate_head=sequence.activate_head)
    sequence.attach(trainer, tmp_path, s.tokenizer)
    return cfg, s, stages, trainer, sequence


def test_old_heads_stay_frozen_and_are_swapped_back_to_re_evaluate_their_task(tmp_path, corpus):
    cfg, s, stages, trainer, sequence = build_sequence(tmp_path, "trainer.max_steps=3", *with_perplexity(corpus))
    assert [stage.name for stage in stages] == ["first", "second"]
    first_head, second_head = sequence.task_heads["first"], sequence.task_heads["second"]
    assert {id(p) for p in stages[1].params} == {id(p) for p in s.groups["adapter"] + second_head}
    after_first = {}
    trainer.stage_end_hooks.insert(0, lambda i, stage, record: after_first.setdefault(
        stage.name, [p.detach().clone() for p in first_head + s.groups["adapter"]]))
    sequence.before_training()
    trainer.run(stages)
    saved = after_first["first"]
    assert all(torch.equal(a, b) for a, b in zip(saved[: len(first_head)], first_head))  # frozen in stage 2
    assert any(not torch.equal(a, b) for a, b in zip(saved[len(first_head):], s.groups["adapter"]))  # trained on
    # R[1][0] is task 1 re-evaluated with its own head, after the adapter moved on
    sequence.bank.use("first")
    again = trainer.evaluate_task(sequence.plans[0].task)["accuracy"]
    assert sequence.matrix.rows[1][0] == again
    assert s.model.score is s.model.task_heads["first"]
    assert len(sequence.perplexities) == 3 and all(p > 1 for p in sequence.perplexities)


def test_perplexity_at_the_start_is_the_base_lms(tmp_path, corpus):
    """The adapted LM (identity at initialisation) keeps its own LM head: its perplexity is the base model's."""
    cfg, s, stages, trainer, sequence = build_sequence(tmp_path, "method=curlora", "task.head_protocol=curlora",
                                                       *with_perplexity(corpus))
    sequence.before_training()
    torch.manual_seed(cfg.seed)
    base = build_model(cfg.model, Head("sequence_classification", 2), s.tokenizer.pad_token_id).lm
    expected = perplexity.perplexity(base, s.tokenizer, TEXT, "strided", context=64)
    assert sequence.perplexities[0] == pytest.approx(expected["perplexity"], rel=1e-6)


def test_a_run_writes_the_matrix_its_measures_the_plot_and_one_row(tmp_path, corpus):
    cfg = compose_cfg("task=continual/toy", "model=tiny-gpt2", "method=lora", *FAST, *with_perplexity(corpus))
    csv_path = Path(os.environ["LRBENCH_RESULTS_CSV"])
    before = len(read_rows(csv_path))
    summary = run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "after_stage" in r]
    assert [(r["after_stage"], r["task"]) for r in evaluations] == [("first", "first"), ("second", "first"),
                                                                     ("second", "second")]
    assert all("confusion" in r and isinstance(r["degenerate"], bool) for r in evaluations)
    R = [[evaluations[0]["accuracy"], None], [evaluations[1]["accuracy"], evaluations[2]["accuracy"]]]
    with open(tmp_path / "accuracy_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["after_stage", "first", "second"] and len(rows) == 3
    assert float(rows[2][1]) == R[1][0] and rows[1][2] == ""
    assert summary["backward_transfer"] == pytest.approx(R[1][0] - R[0][0])
    assert summary["final_average_accuracy"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    assert summary["ppl_before"] == [r for r in records if "perplexity_after" in r][0]["perplexity"]
    assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
    # tiny-gpt2 (hidden 32), LoRA r=8 on the fused c_attn (32 -> 96), 2 layers; two bias-free heads of 32 x 2
    assert summary["adapter_params"] == 2 * 8 * (32 + 96) and summary["head_params"] == 2 * 32 * 2
    assert summary["trainable_params"] == summary["adapter_params"] + summary["head_params"]
    rows = read_rows(csv_path)
    assert len(rows) == before + 1 and rows[-1]["task"] == "continual/toy"
    assert rows[-1]["metric"] == "final_average_accuracy" and rows[-1]["matrix_csv"].endswith("accuracy_matrix.csv")


def test_an_encoder_gets_a_fresh_copy_of_its_classifier_per_task(tmp_path):
    cfg, s, stages, trainer, sequence = build_sequence(tmp_path, "model=tiny-roberta")
    first, second = s.model.task_heads["first"], s.model.task_heads["second"]
    assert type(first) is type(second) and first is not second
    assert not torch.equal(first.out_proj.weight, second.out_proj.weight)  # seeded apart
    assert sequence.corpus_ids is None  # an encoder has no perplexity; nothing is asked of it here


def test_every_method_runs_as_every_stage_of_a_sequence(tmp_path, corpus):
    """Llama (nn.Linear projections): some PEFT tuners (LoHa) cannot adapt GPT-2's Conv1D."""
    csv_path = tmp_path / "continual.csv"
    result = lrbench("-m", f"method={','.join(METHODS)}", "model=tiny-llama", "task=continual/toy", *FAST,
                     *with_perplexity(corpus), env={"LRBENCH_RESULTS_CSV": str(csv_path)}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(csv_path)
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert row["first_steps"] and row["final_accuracy_first"] != "" and row["final_accuracy_second"] != ""
        assert float(row["ppl_before"]) > 1 and float(row["ppl_after"]) > 1, row["method"]
    bilevel = [r for r in rows if r["method"] in ("bidora", "bilora")]
    assert bilevel and all(r["hypergradient"] == "darts" for r in bilevel)
    comparison_figure_of_two_real_runs(rows, tmp_path)


def comparison_figure_of_two_real_runs(rows: list[dict], tmp_path: Path) -> None:
    """lrbench-continual-plot on two of those tiny runs (LoRA and CURLoRA): the PNG, one line per method in each
    task's panel, the perplexity panel, one accuracy matrix per method."""
    from lowrank_bench import continual_plot
    from lowrank_bench.results import append_row

    two = tmp_path / "two.csv"
    for row in rows:
        if row["method"] in ("lora", "curlora"):
            append_row(two, row)
    out = tmp_path / "compare.png"
    assert continual_plot.main([str(two), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = continual_plot.comparison_figure(continual_plot.load_groups(two))
    panels = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert {"task:first", "task:second", "perplexity", "matrix:lora", "matrix:curlora"} <= set(panels)
    for gid in ("task:first", "task:second", "perplexity"):
        means = sorted(line.get_gid() for line in panels[gid].get_lines() if (line.get_gid() or "").startswith("mean:"))
        assert means == ["mean:curlora", "mean:lora"], gid


# -- bad input ----------------------------------------------------------------------------------------------------
def amazon_folder(tmp_path) -> Path:
    folder = tmp_path / "amazon"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\ngood book\t1\nbad book\t0\nfine\t1\n")
    return folder


@pytest.mark.parametrize("overrides,message", [
    (["task.sequence=[]"], "empty sequence"),
    (["task.sequence=[first,nope]"], "unknown stage(s) ['nope']"),
    (["task.stages.first.task=glue/nope"], "unknown task 'glue/nope'"),
    (["task.perplexity.mode=strided", "task.perplexity.corpus=/nonexistent/valid.txt"], "/nonexistent/valid.txt"),
    (["task.perplexity.mode=strided", "task.perplexity.corpus={empty}"], "empty"),
    (["+task.stages.first.lr=-1"], "stage 'first' of continual/toy (its settings: task.stages.first.<key>, or "
                                  "task.every_stage.<key>): lr=-1: must be > 0"),
    (["task.every_stage.max_train_samples=-5"], "max_train_samples=-5: must be an integer > 0"),
    (["task.sequence=[first,books]", "+task.stages.books={{task:sentiment/amazon_books,data_dir:{amazon},num_labels:3}}"],
     "label count does not match its data"),
])
def test_bad_sequences_fail_before_training_without_a_row_or_a_folder(tmp_path, overrides, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    overrides = [o.format(empty=empty, amazon=amazon_folder(tmp_path)) if "{" in o else o for o in overrides]
    cfg = compose_cfg("task=continual/toy", "model=tiny-gpt2", *FAST, *overrides)
    csv_path = Path(os.environ["LRBENCH_RESULTS_CSV"])
    before = len(read_rows(csv_path))
    with pytest.raises(LrbenchError, match=None) as err:
        run(cfg, tmp_path / "run")
    assert message in str(err.value)
    assert not (tmp_path / "run").exists() and len(read_rows(csv_path)) == before


def test_a_stage_task_is_composed_as_the_command_line_composes_it():
    """Hydra composes a stage's task config: its defaults list applies (sft/math gets sft/_base's keys)."""
    from lowrank_bench.configs import task_config

    for name in ("toy/sentiment", "sft/math"):
        assert task_config(name) == compose_cfg(f"task={name}").task


def test_a_bad_sequence_exits_with_code_2_and_one_line(tmp_path):
    result = lrbench("task=continual/toy", "model=tiny-gpt2", "task.sequence=[first,nope]", *FAST,
                     env={"LRBENCH_RESULTS_CSV": str(tmp_path / "x.csv")})
    assert result.returncode == 2 and "unknown stage(s) ['nope']" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.csv").exists()


def test_matrix_measures_agree_with_forgetting_definitions():
    """The row's measures come from forgetting.py's definitions (tested there by hand)."""
    R = [[0.8, None, None], [0.6, 0.9, None], [0.5, 0.7, 0.95]]
    assert forgetting.backward_transfer(R) == pytest.approx(-0.25)


@pytest.mark.slow
def test_wandb_gets_the_matrix_as_a_table_and_the_plot_as_an_image(tmp_path):
    result = lrbench("logger=wandb", "task=continual/toy", "model=tiny-roberta", *FAST,
                     env={"LRBENCH_OUTPUT_DIR": str(tmp_path), "LRBENCH_RESULTS_CSV": str(tmp_path / "w.csv"),
                          "WANDB_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    logs = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    content = logs[0].read_bytes()
    assert b"accuracy_matrix" in content and b"forgetting_curve" in content and b"backward_transfer" in content
    assert list(tmp_path.rglob("media/images/forgetting_curve*.png"))
    assert list(tmp_path.rglob("media/table/accuracy_matrix*.table.json"))


# -- CURLoRA's notebook options: last-position pooling, the first N rows, the corpus in the row ----------------------
def test_last_position_pooling_gives_the_notebooks_logits_pad_or_not():
    import copy

    cfg = model_cfg("tiny-gpt2")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, Head("sequence_classification", 3), tokenizer.pad_token_id).eval()
    tokenizer.padding_side = "right"  # GPT-2's
    batch = tokenizer(["a dull plot .", "the acting was weak and the ending never seemed to come at all ."],
                      padding=True, return_tensors="pt", return_token_type_ids=False)
    assert batch["attention_mask"][0, -1] == 0  # the short one ends in padding
    # the notebooks: the LM with its lm_head replaced by the task's head, model(**inputs)["logits"][:, -1, :]
    notebook = copy.deepcopy(model.lm)
    notebook.lm_head = model.score
    with torch.no_grad():
        expected = notebook(**batch).logits[:, -1, :]
        last_token = model(**batch).logits
        model.pooling = "last_position"
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], last_token[1], atol=1e-5, rtol=1e-5)  # unpadded: the same token
    assert not torch.allclose(got[0], last_token[0], atol=1e-3)  # padded: a pad position, not the last word


def test_head_bank_puts_each_tasks_pooling_in_place_with_its_head():
    cfg = model_cfg("tiny-gpt2")
    model = build_model(cfg, Head("sequence_classification", 2), load_tokenizer(cfg).pad_token_id)
    bank = HeadBank(model, "score", "curlora", poolings={"a": "last_position", "b": "last_token"})
    bank.add("a", 2), bank.add("b", 3)
    bank.use("a")
    assert model.pooling == "last_position"
    bank.use("b")
    assert model.pooling == "last_token"
    with pytest.raises(LrbenchError, match=r"pooling \{'a': 'mean'\}; valid: last_position, last_token"):
        HeadBank(model, "score", poolings={"a": "mean"})


def test_train_rows_first_keeps_the_first_rows_in_file_order_and_pooling_reaches_the_model(tmp_path):
    from lowrank_bench.tasks.toy import generate

    cfg, s, stages, trainer, sequence = build_sequence(tmp_path, "+task.stages.first.train_rows=first",
                                                       "+task.stages.second.pooling=last_position")
    rows = generate("train", 800)
    first = sequence.plans[0].task.splits["train"]  # max_train_samples 200
    expected = s.tokenizer([r["text"] for r in rows[:200]], truncation=True, max_length=32)["input_ids"]
    assert [f["input_ids"] for f in first] == expected
    assert [f["labels"] for f in first] == [r["label"] for r in rows[:200]]
    second = sequence.plans[1].task.splits["train"]  # seeded (default): random.Random(0)'s 100 of 800, in file order
    order = list(range(800))
    import random
    random.Random(0).shuffle(order)
    seeded = s.tokenizer([rows[i]["text"] for i in sorted(order[:100])], truncation=True, max_length=32)["input_ids"]
    assert [f["input_ids"] for f in second] == seeded != expected[:100]
    assert [p.pooling for p in sequence.plans] == ["last_token", "last_position"]
    first_stream = trainer.stream(first, sequence.plans[0].task)  # the notebooks' order, every pass
    labels = [f["labels"] for f in first]
    batch_size = cfg.trainer.batch_size
    in_order = [labels[i:i + batch_size] for i in range(0, len(first), batch_size)]  # 200 rows: the last batch is short
    assert [next(first_stream)[1]["labels"].tolist() for _ in range(2 * len(in_order))] == in_order * 2
    second_stream = trainer.stream(second, sequence.plans[1].task)  # seeded rows: reshuffled
    assert next(second_stream)[1]["labels"].tolist() != [f["labels"] for f in second][:batch_size]
    sequence.bank.use("second")
    assert s.model.pooling == "last_position"
    sequence.bank.use("first")
    assert s.model.pooling == "last_token"


@pytest.mark.parametrize("override,message", [
    ("+task.stages.first.train_rows=random", r"task.stages.first.train_rows='random'; valid: first, seeded"),
    ("+task.stages.second.pooling=mean", r"task.stages.second.pooling='mean'; valid: last_position, last_token"),
])
def test_bad_stage_options_name_the_value_and_the_choices(tmp_path, override, message):
    with pytest.raises(LrbenchError, match=message):
        prepare(compose_cfg("task=continual/toy", "model=tiny-gpt2", *FAST, override))


def test_the_row_names_the_perplexity_corpus_its_protocol_and_tokens(tmp_path, corpus):
    cfg, s, stages, trainer, sequence = build_sequence(tmp_path, *with_perplexity(corpus))
    sequence.before_training()
    history = trainer.run(stages)
    scores = sequence.measures(history)
    n = len(s.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert (scores["ppl_corpus"], scores["ppl_protocol"], scores["ppl_tokens"]) == (str(corpus), "standard", n - 1)
