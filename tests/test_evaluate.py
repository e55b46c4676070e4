"""`lrbench mode=eval`: a saved run, rebuilt and scored again, gives the metrics the run recorded, to the last digit
(lora, bidora with retraining, a continual sequence with a head per task); another task can be scored; bad input
is one line and exit code 2, before anything is written."""
from __future__ import annotations

import json

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.evaluate import evaluate_run
from lowrank_bench.results import read_rows
from lowrank_bench.train import run
from tests.conftest import compose_cfg, needs_data
from tests.test_cli import lrbench

# tiny-gpt2 learns the toy task a little in 30 steps (tiny-roberta still predicts one class), so that the scores
# below depend on the adapter
TRAINER = ["model=tiny-gpt2", "trainer.progress=false", "trainer.max_steps=30", "trainer.batch_size=16",
           "optimizer.lr=1e-2"]
TINY = [*TRAINER, "task.max_eval_samples=64"]


def trained(tmp_path, *overrides) -> tuple[dict, object]:
    folder = tmp_path / "trained"
    return run(compose_cfg(*overrides), folder), folder


def evaluated(tmp_path, folder, *overrides, overridden=()) -> dict:
    cfg = compose_cfg("mode=eval", f"run_dir={folder}", f"results_csv={tmp_path / 'eval.csv'}", *overrides)
    return evaluate_run(cfg, tmp_path / "eval", set(overridden))


@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_a_saved_run_scores_what_it_recorded(tmp_path, method):
    extra = ["method.retrain.enabled=true", "method.retrain.max_steps=2"] if method == "bidora" else []
    summary, folder = trained(tmp_path, *TINY, f"method={method}", *extra)
    if method == "bidora":
        assert summary["retrain_steps"] == 2  # two stages: search, then retraining with magnitudes frozen
    recorded = json.loads((folder / "summary.json").read_text())
    assert not summary["degenerate"] and len({tuple(r) for r in recorded["last_confusion"]}) == 2
    row = evaluated(tmp_path, folder)
    assert row["mode"] == "eval" and row["evaluated_run"] == str(folder) and row["method"] == method
    assert row["accuracy"] == summary["last_accuracy"]  # exactly: the same weights, the same examples
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["confusion"] == recorded["last_confusion"]
    assert row["trainable_params"] == summary["trainable_params"]
    (written,) = read_rows(tmp_path / "eval.csv")
    assert written["mode"] == "eval" and float(written["accuracy"]) == summary["last_accuracy"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["adapter"] == str(
        folder / "adapter.safetensors")


def test_a_continual_run_scores_each_task_with_its_own_head(tmp_path):
    summary, folder = trained(tmp_path, "task=continual/toy", *TRAINER)
    row = evaluated(tmp_path, folder)
    assert row["average_accuracy"] == summary["final_average_accuracy"]  # each task through its own head
    assert {"first_accuracy", "second_accuracy"} <= row.keys()


@needs_data
def test_another_task_on_the_command_line_is_scored_with_the_saved_head(tmp_path):
    _, folder = trained(tmp_path, *TINY, "method=lora")
    row = evaluated(tmp_path, folder, "task=glue/sst2", "task.max_eval_samples=32", overridden={"task"})
    assert row["task"] == "glue/sst2" and row["trained_task"] == "toy/sentiment" and 0 <= row["accuracy"] <= 1


def test_bad_input_is_one_line_before_anything_is_written(tmp_path):
    _, folder = trained(tmp_path, *TINY, "method=lora")
    with pytest.raises(LrbenchError, match="mode=eval needs run_dir="):
        evaluate_run(compose_cfg("mode=eval"), tmp_path / "eval", set())
    with pytest.raises(LrbenchError, match=r"run_dir=.*: no adapter.safetensors there"):
        evaluated(tmp_path, tmp_path)
    resolved = folder / "config_resolved.yaml"
    resolved.write_text(resolved.read_text().replace("  r: 8\n", "  r: 4\n"))  # a config the adapter does not fit
    with pytest.raises(LrbenchError, match=r"adapter .* does not fit the model of tiny-gpt2 with method=lora"):
        evaluated(tmp_path, folder)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "eval.csv").exists()


def test_the_cli_refuses_an_unknown_mode_with_the_choices(tmp_path):
    result = lrbench("mode=bogus", env={"LRBENCH_OUTPUT_DIR": str(tmp_path)})
    assert result.returncode == 2 and "mode=bogus: choose one of train, eval" in result.stderr
