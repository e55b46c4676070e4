"""A run whose loss becomes NaN stops at the next logging step, writes a row that says `status=diverged` (with the
step), keeps metrics.jsonl strict JSON and saves no adapter; the tables leave it out unless asked."""
from __future__ import annotations

import json
import math

import pytest

from lowrank_bench import tables
from lowrank_bench.results import read_rows
from lowrank_bench.train import run
from tests.conftest import compose_cfg

FAST = ["model=tiny-roberta", "trainer.progress=false", "trainer.log_every=2", "task.max_eval_samples=32"]


def strict(text: str) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("divergence")
    csv_path = folder / "runs.csv"
    common = [*FAST, f"results_csv={csv_path}", "trainer.eval_every=4"]
    diverged = run(compose_cfg(*common, "optimizer.lr=1e6", "trainer.max_steps=12"), folder / "diverged")
    finished = run(compose_cfg(*common, "trainer.max_steps=4"), folder / "finished")
    return folder, csv_path, diverged, finished


def test_a_nan_loss_stops_the_run_at_the_next_logging_step_and_the_row_says_so(runs):
    folder, csv_path, diverged, finished = runs
    assert diverged["status"] == "diverged" and finished["status"] == "finished"
    assert diverged["diverged_at_step"] <= 4 and diverged["train_steps"] == diverged["diverged_at_step"]
    assert not (folder / "diverged" / "adapter.safetensors").exists()
    assert (folder / "finished" / "adapter.safetensors").exists()
    rows = read_rows(csv_path)
    assert [r["status"] for r in rows] == ["diverged", "finished"]
    for name in ("diverged", "finished"):  # strict JSON, whatever the run measured
        records = strict((folder / name / "metrics.jsonl").read_text()) if (folder / name / "metrics.jsonl").exists() \
            else []
        assert all(v is None or not isinstance(v, float) or math.isfinite(v) for r in records for v in r.values())


def test_tables_leave_diverged_runs_out_unless_asked(runs, capsys):
    _, csv_path, _, _ = runs
    tables.main([str(csv_path)])
    out = capsys.readouterr().out
    assert "left out: 1 diverged run(s) (lora toy/sentiment seed 0)" in out
    assert len([line for line in out.splitlines() if "toy/sentiment" in line and "│" in line]) == 1
    tables.main([str(csv_path), "--include-diverged", "--show", "lr"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "toy/sentiment" in line and "│" in line]
    assert "left out" not in out and len(lines) == 2  # lr 1e6 is a configuration of its own
    assert any("1000000.0" in line for line in lines)


def test_a_non_finite_measure_is_written_as_null():
    from lowrank_bench.trainer import finite_or_none

    record = {"step": 3, "train_loss": float("nan"), "pearson": float("inf"), "accuracy": 0.5, "stage": "train"}
    assert strict(json.dumps(finite_or_none(record), allow_nan=False)) == [
        {"step": 3, "train_loss": None, "pearson": None, "accuracy": 0.5, "stage": "train"}]


def test_run_folders_say_how_their_run_ended(runs):
    folder = runs[0]
    assert (folder / "finished" / "status").read_text() == "finished\n"
    assert (folder / "diverged" / "status").read_text() == "diverged\n"


def test_a_crash_leaves_failed_and_a_signal_stop_interrupted(tmp_path, monkeypatch):
    from lowrank_bench import checkpoint
    from lowrank_bench.trainer import Trainer

    for error, status in ((RuntimeError("boom"), "failed"), (checkpoint.Interrupted(15, None, None), "interrupted")):
        def stop(self, stages, resume=None, error=error):
            raise error
        monkeypatch.setattr(Trainer, "run", stop)
        with pytest.raises(type(error)):
            run(compose_cfg(*FAST, "trainer.max_steps=2", f"results_csv={tmp_path / 'runs.csv'}"), tmp_path / status)
        assert (tmp_path / status / "status").read_text() == f"{status}\n"
    assert not (tmp_path / "runs.csv").exists()  # no row for either


# -- the exploding-loss rule (trainer.py's docstring): not finite, or above max(1e4, 100 x the stage's first loss) --
@pytest.fixture(scope="module")
def bidora_runs(tmp_path_factory):
    """BiDoRA at lr 1e6 (its losses explode to ~1e17 before any NaN) and at its default lr, in one results file."""
    folder = tmp_path_factory.mktemp("exploding")
    csv_path = folder / "runs.csv"
    common = [*FAST, "method=bidora", f"results_csv={csv_path}", "trainer.eval_every=4", "trainer.max_steps=8"]
    exploded = run(compose_cfg(*common, "optimizer.lr=1e6"), folder / "exploded")
    finished = run(compose_cfg(*common), folder / "finished")
    return folder, csv_path, exploded, finished


def test_an_exploding_loss_stops_the_run_as_diverged_and_a_normal_run_is_not_flagged(bidora_runs):
    folder, csv_path, exploded, finished = bidora_runs
    assert exploded["status"] == "diverged" and finished["status"] == "finished"
    assert "above the limit 1e+04" in exploded["diverged_reason"] and "diverged_reason" not in finished
    assert exploded["diverged_at_step"] <= 2 and exploded["diverged_stage"] == "search"
    assert [r["status"] for r in read_rows(csv_path)] == ["diverged", "finished"]
    assert (folder / "exploded" / "status").read_text() == "diverged\n"
    assert (folder / "finished" / "status").read_text() == "finished\n"
    assert not (folder / "exploded" / "adapter.safetensors").exists()


def test_the_limit_is_the_floor_or_100_times_the_first_loss():
    from lowrank_bench.trainer import EXPLODED_FLOOR, beyond, loss_limit

    assert loss_limit(0.69) == EXPLODED_FLOOR == 1e4 and loss_limit(None) == 1e4 and loss_limit(math.nan) == 1e4
    assert loss_limit(500.0) == 5e4  # a loss that starts large is not flagged by the floor
    assert beyond({"loss": 2e4, "other": 0.5}, 1e4) == {"loss": 2e4}
    assert set(beyond({"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1e4}, 1e4)) == {"a", "b", "c"}


def test_an_exploding_evaluation_loss_stops_the_run_as_diverged(tmp_path, monkeypatch):
    from lowrank_bench.trainer import Trainer

    losses = iter([0.7, 3e5])
    monkeypatch.setattr(Trainer, "evaluate_task", lambda self, task: {"eval_loss": next(losses), "accuracy": 0.5})
    summary = run(compose_cfg(*FAST, "trainer.max_steps=4", "trainer.eval_every=2",
                              f"results_csv={tmp_path / 'runs.csv'}"), tmp_path / "run")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 4
    assert summary["diverged_reason"] == "eval_loss=3e+05 above the limit 1e+04"
    assert (tmp_path / "run" / "status").read_text() == "diverged\n"
