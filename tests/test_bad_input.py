"""Bad input, case by case: every one is refused with one line naming the setting (or file) and what is valid,
within seconds, before the model trains, with no row and no run folder. In process (`run`), so that 40+ cases stay
cheap; tests/test_preflight.py and tests/test_cli.py check the same path through the command line (exit code 2)."""
from __future__ import annotations

import time

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.train import run
from tests.conftest import compose_cfg

TINY = ["model=tiny-roberta", "trainer.max_steps=2", "trainer.progress=false"]

CASES = [
    # the trainer
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be an integer > 0"),
    (["trainer.batch_size=8.5"], "trainer.batch_size=8.5: must be an integer"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc': must be an integer"),
    (["trainer.eval_batch_size=-1"], "trainer.eval_batch_size=-1: must be an integer > 0"),
    (["trainer.grad_accum=0"], "trainer.grad_accum=0: must be an integer > 0"),
    (["trainer.eval_every=0"], "trainer.eval_every=0: must be an integer > 0"),
    (["trainer.log_every=-5"], "trainer.log_every=-5: must be an integer > 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be > 0"),
    (["trainer.max_steps=-3"], "trainer.max_steps=-3: must be > 0"),
    (["trainer.max_steps=null", "trainer.epochs=0"], "trainer.epochs=0: must be > 0"),
    (["trainer.max_steps=null", "trainer.epochs=-1"], "trainer.epochs=-1: must be > 0"),
    (["trainer.max_grad_norm=0"], "trainer.max_grad_norm=0: must be > 0, or null"),
    (["trainer.precision=fp8"], "trainer.precision=fp8: must be auto, fp32, bf16 or fp16"),
    (["trainer.device=tpu"], "trainer.device=tpu: must be auto, cpu, cuda, cuda:N or mps"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1: must be an integer >= 0"),
    (["trainer.progress=maybe"], "trainer.progress='maybe': must be true or false"),
    (["seed=-1"], "seed=-1: must be an integer >= 0"),
    (["seed=1.5"], "seed=1.5: must be an integer"),
    # the optimiser
    (["optimizer.lr=0"], "optimizer.lr=0: must be > 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001: must be > 0"),
    (["optimizer.lr=fast"], "optimizer.lr='fast': must be a number"),
    (["optimizer.lr=nan"], "optimizer.lr=nan: must be a number"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be >= 0"),
    (["optimizer.warmup_ratio=1.5"], "optimizer.warmup_ratio=1.5: must be 0 <= warmup_ratio < 1"),
    (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps=-1: must be an integer >= 0"),
    (["optimizer.schedule=exp"], "optimizer.schedule=exp: must be linear, cosine or constant"),
    (["optimizer.eps=0"], "optimizer.eps=0: must be > 0"),
    # the method
    (["method.r=0"], "method.r=0: must be an integer > 0"),
    (["method.r=100"], "rank r=100 is impossible for layer"),
    (["method.r=2.5"], "method.r=2.5: must be an integer"),
    (["method.alpha=0"], "method.alpha=0: must be > 0"),
    (["method.dropout=1.0"], "method.dropout=1.0: must be 0 <= dropout < 1"),
    (["method.dropout=-0.1"], "method.dropout=-0.1: must be 0 <= dropout < 1"),
    (["method=curlora", "method.r=0"], "method.r=0: must be an integer > 0"),
    (["method=dora", "method.r=-4"], "method.r=-4: must be an integer > 0"),
    (["method.targets=[nothing_like_this]"], "nothing_like_this"),
    # the model and the task
    (["model.max_length=0"], "model.max_length=0: must be an integer > 0"),
    (["task.max_length=-1"], "task.max_length=-1: must be an integer > 0"),
    (["task.max_train_samples=0"], "task.max_train_samples=0: must be an integer > 0"),
    (["task.max_eval_samples=-2"], "task.max_eval_samples=-2: must be an integer > 0"),
    (["+model.path=/models/x"], "model.path=/models/x does not apply to model=tiny-roberta"),
    (["task=glue/rte", "task.data_dir=/no/such/glue"], "task.data_dir=/no/such/glue"),
    (["task=ner/conll2003", "task.data_dir=/no/such/conll"], "task.data_dir=/no/such/conll: no such folder"),
    (["trainer.resume=/no/such/run"], "trainer.resume=/no/such/run"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_refused_in_seconds_with_the_setting_and_nothing_written(tmp_path, overrides, message):
    csv_path = tmp_path / "runs.csv"
    cfg = compose_cfg(*TINY, *overrides, f"results_csv={csv_path}")
    start = time.perf_counter()
    with pytest.raises(LrbenchError) as error:
        run(cfg, tmp_path / "run")
    assert message in str(error.value), str(error.value)
    assert "\n" not in str(error.value).strip()  # one line
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists() and not csv_path.exists()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
