"""Progress bars of the long loops besides training's (progress.py): E2E generation, SFT evaluation, multiple-choice
scoring and perplexity each show one, nested under a live bar too; `trainer.progress=false` switches them off, and
the Hub's download bars with them (models.quiet_transformers)."""
from __future__ import annotations

import io

import pytest
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import Progress

from lowrank_bench import models, progress
from lowrank_bench.evaluations.multiple_choice import MultipleChoiceEval
from lowrank_bench.models import Head, load_model, load_tokenizer
from lowrank_bench.perplexity import single_window_perplexity, strided_perplexity
from tests.conftest import model_cfg
from tests.tasks.test_e2e import prepared, tiny
from tests.test_mc_eval import bench, tiny_llama
from tests.test_perplexity import random_ids, tiny_lm


@pytest.fixture
def shown(monkeypatch):
    """What the bars draw, on a terminal of 120 columns."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=True, width=120, color_system=None))
    monkeypatch.setattr(progress, "enabled", True)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_bar_counts_what_it_is_told_and_is_gone_at_the_end(shown):
    with progress.bar("evaluating sst2", 5) as advance:
        advance(2)
        advance(3)
    drawn = shown.getvalue()
    assert "evaluating sst2" in drawn and "5/5" in drawn
    assert list(progress.track([1, 2, 3], "counting")) == [1, 2, 3] and "3/3" in shown.getvalue()


@pytest.fixture
def logged(monkeypatch):
    """What the bars write where the console is not a terminal (a log file, a pipe)."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=False, width=200))
    monkeypatch.setattr(progress, "enabled", True)
    return out


def test_off_a_terminal_a_bar_is_one_line_at_its_end(logged):
    with progress.bar("evaluating sst2", 40) as advance:
        for _ in range(40):
            advance()
    lines = logged.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluating sst2: 40/40 (100%) 00:00:0"), lines


def test_off_a_terminal_a_slow_loop_reports_each_tenth(logged, monkeypatch):
    monkeypatch.setattr(progress.LineProgress, "every_s", 0.0)  # as if each step took longer than every_s
    with progress.bar("generating e2e", 40) as advance:
        for _ in range(40):
            advance()
    lines = logged.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [f"{4 * k}/40" for k in range(1, 11)]
    assert lines[4].split()[3] == "(50%)"


def test_e2e_generation_shows_the_mrs_generated(shown, tmp_path):
    task = prepared(tmp_path, eval_mrs=3)
    task.generate_texts(tiny()[0], [g["prompt_ids"] for g in task.splits["validation"]], batch_size=2)
    assert "generating e2e/dev_by_mr" in shown.getvalue() and "3/3" in shown.getvalue()


def test_perplexity_shows_its_windows(shown):
    model = tiny_lm(positions=64)
    strided_perplexity(model, random_ids(30), context=8, stride=3)
    assert "perplexity" in shown.getvalue() and "9/9" in shown.getvalue()  # windows at 0, 3, ..., 24
    single_window_perplexity(model, random_ids(30), max_tokens=20)
    assert "1/1" in shown.getvalue()


def test_multiple_choice_scoring_shows_the_items(shown, tmp_path):
    tokenizer = load_tokenizer(model_cfg("tiny-llama"))
    evaluator = MultipleChoiceEval(bench(tmp_path, "eval.batch_size=4"), tokenizer)
    evaluator.score(tiny_llama(len(tokenizer)), when="before")
    assert "scoring bbh before training" in shown.getvalue() and "6/6" in shown.getvalue()


def test_sft_evaluation_shows_its_batches(shown, tmp_path):
    from tests.tasks.test_sft import ROWS, sft_task, write_jsonl

    tokenizer = load_tokenizer(model_cfg("tiny-llama"))
    task = sft_task(write_jsonl(tmp_path / "a.jsonl", ROWS))
    task.prepare(tokenizer, 64)
    model = load_model(model_cfg("tiny-llama"), Head("causal_lm"), tokenizer.pad_token_id)
    task.evaluate(model, "validation", batch_size=1)
    batches = len(task.loader("validation", task.cfg.eval_batch_size or 1))
    assert f"evaluating {task.name}" in shown.getvalue() and f"{batches}/{batches}" in shown.getvalue()


def test_a_bar_inside_a_live_bar_nests_instead_of_failing(shown):
    outer = Progress(console=progress.console, transient=True)
    with outer:
        outer.add_task("lora · train", total=3)
        with progress.bar("generating e2e", 4) as advance:
            advance(4)
    assert "generating e2e" in shown.getvalue()


def test_trainer_progress_false_switches_every_bar_off(shown, tmp_path):
    progress.configure(OmegaConf.create({"progress": False}))
    with progress.bar("evaluating sst2", 2) as advance:
        advance(2)
    strided_perplexity(tiny_lm(positions=64), random_ids(12), context=8, stride=4)
    assert shown.getvalue() == ""
    progress.configure(OmegaConf.create({}))
    assert progress.enabled


def test_hub_downloads_show_a_bar_unless_progress_is_off(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging

    monkeypatch.setattr(progress, "enabled", True)
    models.quiet_transformers()
    assert not are_progress_bars_disabled("huggingface_hub.http_get")
    assert not logging.is_progress_bar_enabled()  # transformers' own (loading shards) stay off
    monkeypatch.setattr(progress, "enabled", False)
    models.quiet_transformers()
    assert are_progress_bars_disabled("huggingface_hub.http_get")
    monkeypatch.setattr(progress, "enabled", True)
    models.quiet_transformers()
