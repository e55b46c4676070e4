"""Budgets (issue 26, item 2): what `trainer.epochs` and `trainer.grad_accum` ask for is trained, or refused with
the reason before training, leaving nothing behind. The rule is `stages.steps_for` (trainer.py's docstring):
fractional epochs train round(epochs x steps per epoch) steps, the last epoch partial; `grad_accum` greater than
an epoch's batches is refused naming both numbers; so are epochs that round to no step."""
from __future__ import annotations

import math

import pytest
from test_bad_input_table import Case, check

from lowrank_bench.errors import LrbenchError
from lowrank_bench.stages import steps_for
from lowrank_bench.train import run
from tests.conftest import compose_cfg

TINY = ("model=tiny-roberta", "task=toy/sentiment", "logger=none")
SMALL = (*TINY, "task.max_train_samples=64", "task.max_eval_samples=32", "trainer.progress=false")  # 2 batches of 32

CASES = [
    Case("grad_accum above an epoch's batches", "lrbench", (*SMALL, "trainer.grad_accum=100"), 2,
         ("trainer.grad_accum=100", "the 2 batch(es) of one epoch of toy/sentiment", "64 training examples",
          "trainer.batch_size=32", "valid: trainer.grad_accum <= 2")),
    Case("grad_accum above an epoch's batches, max_steps", "lrbench",
         (*SMALL, "trainer.grad_accum=4", "trainer.max_steps=3"), 2, ("trainer.grad_accum=4", "<= 2")),
    Case("grad_accum above the lower level's batches", "lrbench",
         (*SMALL, "method=bidora", "trainer.batch_size=16", "trainer.grad_accum=5"), 2,
         ("trainer.grad_accum=5", "the 4 batch(es) of one epoch of the lower level of toy/sentiment",
          "51 training examples", "<= 4")),
    Case("epochs that round to no step", "lrbench", (*SMALL, "trainer.epochs=0.1"), 2,
         ("trainer.epochs=0.1", "0.2 of an optimiser step", "2 step(s) per epoch", "valid: epochs >= 0.25",
          "trainer.max_steps")),
    Case("retraining epochs that round to no step", "lrbench",
         (*SMALL, "method=bidora", "method.retrain.enabled=true", "method.retrain.epochs=0.01"), 2,
         ("epochs=0.01 is 0.02 of an optimiser step of toy/sentiment (stage 'retrain')", "valid: epochs >= 0.25")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_an_impossible_budget_is_refused_in_one_line_before_training(case, tmp_path, monkeypatch, capsys):
    check(case, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("n,batch,accum,epochs,max_steps,expected", [
    (200, 32, 1, 3, None, 21),      # 7 steps an epoch
    (200, 32, 2, 3, None, 12),      # 4 steps an epoch (the 4th takes the end of a pass and the start of the next)
    (200, 32, 7, 1, None, 1),       # grad_accum = an epoch's batches: one step an epoch
    (80, 8, 1, 2.7, None, 27),      # fractional: round(2.7 x 10)
    (80, 8, 1, 2.75, None, 28),     # halves round up
    (80, 8, 1, 0.05, None, 1),      # half a step is one
    (64, 32, 1, 3, 5, 5),           # max_steps wins
])
def test_the_budget_rule(n, batch, accum, epochs, max_steps, expected):
    assert steps_for(n, batch, accum, epochs, max_steps, "t") == expected
    if float(epochs).is_integer() and max_steps is None:  # integer epochs: what they always gave
        assert expected == math.ceil(n / (batch * accum)) * int(epochs)


def test_the_budget_rule_refuses_with_the_numbers():
    with pytest.raises(LrbenchError, match=r"trainer.grad_accum=8 is more than the 7 batch\(es\) .*<= 7"):
        steps_for(200, 32, 8, 1, None, "t")
    with pytest.raises(LrbenchError, match=r"trainer.epochs=0.04 is 0.4 of an optimiser step .*epochs >= 0.05"):
        steps_for(80, 8, 1, 0.04, None, "t")
    with pytest.raises(LrbenchError, match="empty training split"):
        steps_for(0, 8, 1, 1, None, "t")


def test_fractional_epochs_train_the_fraction_the_last_epoch_partial(tmp_path, monkeypatch):
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    summary = run(compose_cfg(*TINY, "task.max_train_samples=80", "task.max_eval_samples=32", "trainer.batch_size=8",
                              "trainer.epochs=2.7", "trainer.progress=false", "save_adapter=false"), tmp_path / "run")
    assert summary["status"] == "finished" and summary["train_steps"] == 27  # 10 steps an epoch
    assert summary["train_samples"] == 27 * 8


def test_fractional_epochs_of_a_bilevel_stage_count_passes_over_its_lower_part(tmp_path, monkeypatch):
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    summary = run(compose_cfg(*TINY, "method=bidora", "task.max_train_samples=80", "task.max_eval_samples=32",
                              "trainer.batch_size=8", "trainer.epochs=1.5", "trainer.progress=false",
                              "save_adapter=false"), tmp_path / "run")
    assert summary["lower_size"] == 64 and summary["train_steps"] == 12  # 8 lower steps an epoch, x 1.5
