"""The CLI: Hydra composition, end-to-end runs, sweeps that append exactly one row per run, clear errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lowrank_bench.errors import LrbenchError
from lowrank_bench.results import read_rows
from lowrank_bench.train import run
from tests.conftest import CONF, compose_cfg, needs_data

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
METHODS += sorted(f"peft/{p.stem}" for p in (CONF / "method" / "peft").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
GLUE = sorted(p.stem for p in (CONF / "task" / "glue").glob("*.yaml"))
FAST = ["trainer.max_steps=3", "trainer.progress=false", "trainer.eval_batch_size=64"]


def lrbench(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lowrank_bench.train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_every_config_group_option_composes():
    for method in METHODS:
        assert compose_cfg(f"method={method}").method.name == method  # peft/*: `# @package method`
    for model in MODELS:
        assert compose_cfg(f"model={model}").model.name == model
    for subset in GLUE:
        cfg = compose_cfg(f"task=glue/{subset}")
        assert cfg.task.name == f"glue/{subset}" and cfg.task.subset == subset  # `# @package task` keeps the key
    for path in sorted((CONF / "experiment").rglob("*.yaml")):
        name = path.relative_to(CONF / "experiment").with_suffix("").as_posix()
        cfg = compose_cfg(f"experiment={name}")
        assert cfg.method.name and (cfg.trainer.max_steps or cfg.trainer.epochs) > 0, name  # CoLA: 5 epochs
    mrpc = compose_cfg("experiment=bidora/roberta_base_mrpc")
    assert (mrpc.method.name, mrpc.model.name, mrpc.task.name) == ("bidora", "roberta-base", "glue/mrpc")
    assert (mrpc.optimizer.lr, mrpc.trainer.max_steps, mrpc.optimizer.betas[1]) == (2e-5, 28000, 0.98)


def test_each_method_yaml_carries_its_own_default_learning_rate_and_the_command_line_wins():
    own = {m: OmegaConf.load(CONF / "method" / f"{m}.yaml").get("lr") for m in METHODS if "/" not in m}
    assert all(lr is not None for lr in own.values()), own  # chosen by benchmarks/default_sweep.py
    assert len(set(own.values())) > 2  # the point: one lr does not suit every method
    for method, lr in own.items():
        assert compose_cfg(f"method={method}").optimizer.lr == lr, method
    assert compose_cfg("method=lotr", "optimizer.lr=1e-5").optimizer.lr == 1e-5
    assert compose_cfg("method=peft/vera").optimizer.lr == 5e-4  # a method without its own: the optimizer's
    assert compose_cfg("experiment=bidora/roberta_base_mrpc").optimizer.lr == 2e-5  # a preset's lr is the paper's


def test_run_writes_summary_metrics_adapter_and_one_row(tmp_path):
    cfg = compose_cfg("model=tiny-roberta", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.progress=false")
    csv_path = Path(os.environ["LRBENCH_RESULTS_CSV"])
    before = len(read_rows(csv_path))
    summary = run(cfg, tmp_path)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    written = json.loads((tmp_path / "summary.json").read_text())
    best = max(evals, key=lambda e: e["accuracy"])  # the first of the best: max keeps the first
    assert written.pop("best_confusion") == best["confusion"] and written.pop("last_confusion") == evals[-1]["confusion"]
    assert written.pop("last_predicted") == [sum(column) for column in zip(*evals[-1]["confusion"])]  # the histogram
    written.pop("best_predicted")
    assert summary["final_train_loss"] == evals[-1]["train_loss"]
    assert written == summary  # the row, and the tables beside it
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "config_resolved.yaml").is_file()
    assert summary["best_accuracy"] == max(e["accuracy"] for e in evals)
    assert summary["last_accuracy"] == evals[-1]["accuracy"]
    # tiny-roberta, LoRA r=8 on query/value: 2 layers x 2 x 8 x (32 + 32) + classifier (32x32+32 + 32x2+2)
    assert summary["trainable_params"] == 2 * 2 * 8 * 64 + (32 * 32 + 32 + 32 * 2 + 2)
    rows = read_rows(csv_path)
    assert len(rows) == before + 1 and rows[-1]["run_dir"] == str(tmp_path)
    for column in ("method", "model", "task", "seed", "rank", "trainable_params", "total_params", "wall_time_s",
                   "peak_mem_mb", "torch", "transformers", "git_commit"):
        assert rows[-1][column] != "", column


def test_same_seed_same_numbers(tmp_path):
    cfg = compose_cfg("model=tiny-roberta", "method=dora", "trainer.max_steps=3", "trainer.progress=false",
                      "save_adapter=false")
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    lines = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("a", "b")]
    assert lines[0] == lines[1] and first["best_accuracy"] == second["best_accuracy"]


def test_bad_rank_raises_before_anything_is_written(tmp_path):
    cfg = compose_cfg("model=tiny-roberta", "method.r=0")
    csv_path = Path(os.environ["LRBENCH_RESULTS_CSV"])
    before = len(read_rows(csv_path))
    with pytest.raises(LrbenchError, match="method.r=0: must be an integer > 0"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and len(read_rows(csv_path)) == before


def test_sweep_appends_exactly_three_rows(tmp_path):
    csv_path = tmp_path / "sweep.csv"
    result = lrbench("-m", "method=ft,lora,dora", "model=tiny-roberta", "task=toy/sentiment", *FAST,
                     env={"LRBENCH_RESULTS_CSV": str(csv_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["ft", "lora", "dora"]
    assert {r["model"] for r in rows} == {"tiny-roberta"} and {r["task"] for r in rows} == {"toy/sentiment"}
    assert int(rows[0]["trainable_params"]) == int(rows[0]["total_params"])  # ft trains everything
    assert int(rows[1]["trainable_params"]) < int(rows[2]["trainable_params"])  # dora adds magnitudes
    assert all(0.0 <= float(r["best_accuracy"]) <= 1.0 for r in rows)


def test_every_method_runs_end_to_end(tmp_path):
    csv_path = tmp_path / "all.csv"
    result = lrbench("-m", f"method={','.join(METHODS)}", "model=tiny-roberta", "task=toy/sentiment", *FAST,
                     env={"LRBENCH_RESULTS_CSV": str(csv_path)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(csv_path)
    assert [r["method"] for r in rows] == METHODS
    assert all(r["best_accuracy"] != "" and int(r["trainable_params"]) > 0 for r in rows)
    bilevel = [r for r in rows if r["method"] in ("bidora", "bilora")]
    assert all(r["hypergradient"] == "darts" and r["lower_size"] == "640" for r in bilevel)


@needs_data
def test_glue_sweep_on_real_data(tmp_path):
    csv_path = tmp_path / "glue.csv"
    result = lrbench("-m", "method=ft,lora,dora", "model=tiny-roberta", "task=glue/sst2",
                     "task.max_train_samples=96", "task.max_eval_samples=64", *FAST,
                     env={"LRBENCH_RESULTS_CSV": str(csv_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(csv_path)
    assert len(rows) == 3 and {r["task"] for r in rows} == {"glue/sst2"}
    assert all(r["best_accuracy"] and r["train_samples"] == "96" for r in rows)


@pytest.mark.parametrize("args,message", [
    (["method=nope"], "lrbench error: method=nope: no such method; valid: bidora"),
    (["task=glue/nope"], "lrbench error: task=glue/nope: no such task"),
    (["model=nope"], "lrbench error: model=nope: no such model"),
    (["model=tiny-roberta", "method.r=100"], "rank r=100 is impossible for layer"),
    (["model=tiny-roberta", "task=glue/rte", "task.data_dir=/nonexistent"], "expected the glue_data/ layout"),
])
def test_bad_input_exits_non_zero_without_a_row(tmp_path, args, message):
    csv_path = tmp_path / "bad.csv"
    result = lrbench(*args, *FAST, env={"LRBENCH_RESULTS_CSV": str(csv_path)})
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not csv_path.exists()


def test_unknown_method_lists_the_valid_ones():
    result = lrbench("method=nope", *FAST)
    assert result.returncode == 2 and result.stderr.count("\n") == 1  # one line (tests/test_bad_input_config.py)
    assert "valid: bidora, bilora, cola, curlora, dora, ft, lora, lotr, peft/adalora" in result.stderr


def test_unreachable_hub_model_fails_fast_with_advice(tmp_path):
    """Within 10 s of the interpreter's own start-up (imports alone take 4 s on an idle 2-core machine, and several
    times that when the machine is busy: measured here, under the same load, and not counted)."""
    start = time.perf_counter()
    # what the run imports before it reaches the Hub (lowrank_bench.train alone imports lazily: 0.7 s, not 4)
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, hydra, lowrank_bench.assembly"],
                   check=True)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    result = lrbench("model=roberta-base", *FAST, env={"LRBENCH_RESULTS_CSV": str(tmp_path / "x.csv")})
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert "FacebookAI/roberta-base' is not in the local Hugging Face cache" in result.stderr
    assert "model.path=/path/to/folder" in result.stderr
    assert elapsed - startup < 10, (elapsed, startup)


@pytest.mark.slow
def test_wandb_offline_logs_config_metrics_and_summary(tmp_path):
    result = lrbench("logger=wandb", "model=tiny-roberta", *FAST,
                     env={"LRBENCH_OUTPUT_DIR": str(tmp_path), "WANDB_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    logs = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, "no offline wandb run was written"
    content = logs[0].read_bytes()  # protobuf records keep their keys as plain strings
    for key in (b"max_grad_norm", b"train_loss", b"best_accuracy", b"trainable_params"):
        assert key in content, key


@pytest.mark.slow
def test_parallel_joblib_sweep_appends_every_row(tmp_path):
    csv_path = tmp_path / "joblib.csv"
    result = lrbench("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=lora,dora", "seed=0,1",
                     "model=tiny-roberta", *FAST, env={"LRBENCH_RESULTS_CSV": str(csv_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(csv_path)
    assert sorted((r["method"], r["seed"]) for r in rows) == [("dora", "0"), ("dora", "1"), ("lora", "0"), ("lora", "1")]


@pytest.mark.parametrize("line, expected", [
    ("lrbench task=glue/s", ["task=glue/sst2", "task=glue/stsb"]),
    ("lrbench method=lora task=ner/", ["task=ner/bionlp2004", "task=ner/conll2003"]),
    ("lrbench method=peft/v", ["method=peft/vera"]),
    ("lrbench +experiment=continual/smollm2", ["+experiment=continual/smollm2_curlora",
                                               "+experiment=continual/smollm2_lora"]),
])
def test_tab_completion_offers_nested_group_options(monkeypatch, capsys, line, expected):
    from lowrank_bench import train

    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setattr(sys, "argv", ["lrbench", "-sc", "query=bash"])
    train.main()
    assert capsys.readouterr().out.split() == expected


def test_tab_completion_of_a_setting_is_left_to_hydra():
    from lowrank_bench import configs

    assert configs.completions("trainer.ep") is None and configs.completions("seed=") is None
    assert "task=sft/_base" not in configs.completions("task=sft/")  # shared bases are not options
