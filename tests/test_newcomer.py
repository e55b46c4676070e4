"""A newcomer's first hour (issue 27): a run says where it wrote, its train.log holds what it printed, its saved
config records the data folder it read, a sweep's job folders say what differs, `lrbench --help` is lrbench's own,
and a dataset that cannot load is answered with how to point at local files, not with a model change."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lowrank_bench import configs, hub, results
from lowrank_bench.errors import LrbenchError
from lowrank_bench.tasks.base import data_dir, recorded_data_dir
from tests.conftest import compose_cfg
from tests.test_cli import lrbench

TINY = ["model=tiny-roberta", "trainer.max_steps=2", "trainer.progress=false"]


def places(tmp_path: Path) -> dict:
    return {"LRBENCH_OUTPUT_DIR": str(tmp_path / "out"), "LRBENCH_RESULTS_CSV": str(tmp_path / "runs.csv"),
            "OMP_NUM_THREADS": "1"}


def without_data_dir(env: dict) -> dict:
    return {k: v for k, v in {**os.environ, **env}.items() if k != "LRBENCH_DATA_DIR"}


def tiny_sst2(root: Path) -> Path:
    """A GLUE-layout data folder with a few SST-2 sentences: <root>/glue/SST-2/{train,dev}.tsv."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, count in (("train", 32), ("dev", 16)):
        rows = [f"a {'fine' if i % 2 else 'dull'} film number {i}\t{i % 2}" for i in range(count)]
        (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return root


# -- the end of a run: where it wrote, and train.log --------------------------------------------------------------
def test_a_run_ends_with_its_folder_and_csv_and_its_train_log_holds_what_it_printed(tmp_path):
    env = places(tmp_path)
    result = lrbench(*TINY, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    (folder,) = (tmp_path / "out" / "runs").iterdir()
    assert f"run folder: {folder}" in result.stdout
    assert f"row appended to: {tmp_path / 'runs.csv'}" in result.stdout
    log = (folder / "train.log").read_text()
    assert len(log.splitlines()) > 1
    for line in ("model tiny-roberta loaded", "eval step=2", "stage 1/1 lora · train: done, 2 steps",
                 "best_accuracy", f"run folder: {folder}", "row appended to:"):
        assert line in log, line
    terminal = result.stdout + result.stderr
    assert terminal.count("eval step=2") == 1 and terminal.count("run folder:") == 1  # shown once, as before


# -- the data folder a run read, recorded ----------------------------------------------------------------------------
def test_the_saved_config_records_the_data_folder_as_an_absolute_path_or_null(tmp_path, monkeypatch):
    cfg = compose_cfg(*TINY)
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    assert results.saved_config(cfg)["data_dir"] is None
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRBENCH_DATA_DIR", "data")
    saved = results.saved_config(cfg)
    assert saved["data_dir"] == str(tmp_path / "data")
    keys = list(saved)
    assert keys[keys.index("output_dir") + 1] == "data_dir"  # beside the other places a run reads and writes


def test_a_recorded_data_folder_is_read_while_the_variable_is_unset_and_the_variable_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    with recorded_data_dir(str(tmp_path)):
        assert data_dir() == tmp_path
        monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "other"))
        (tmp_path / "other").mkdir()
        assert data_dir() == tmp_path / "other"
        monkeypatch.delenv("LRBENCH_DATA_DIR")
    assert data_dir() is None
    with recorded_data_dir(str(tmp_path / "gone")):  # moved away since: as if none was recorded
        assert data_dir() is None


def test_mode_eval_finds_the_data_of_the_run_without_the_variable(tmp_path):
    data = tiny_sst2(tmp_path / "data")
    env = places(tmp_path)
    trained = subprocess.run([sys.executable, "-m", "lowrank_bench.train", *TINY, "task=glue/sst2"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**without_data_dir(env), "LRBENCH_DATA_DIR": "data"})  # relative to the run's cwd
    assert trained.returncode == 0, trained.stderr[-2000:]
    (folder,) = (tmp_path / "out" / "runs").iterdir()
    assert OmegaConf.load(folder / "config_resolved.yaml").data_dir == str(data)
    evaluated = subprocess.run([sys.executable, "-m", "lowrank_bench.train", "mode=eval", f"run_dir={folder}"],
                               capture_output=True, text=True, timeout=300, env=without_data_dir(env))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rows = results.read_rows(tmp_path / "runs.csv")
    assert rows[-1]["mode"] == "eval" and rows[-1]["task"] == "glue/sst2"


# -- sweeps: job folders named by what differs, and where the sweep wrote ---------------------------------------
def test_a_sweeps_job_folders_are_named_by_what_differs_and_its_end_says_where_to_look(tmp_path):
    env = places(tmp_path)
    result = lrbench("-m", *TINY, "task=toy/sentiment", "method.r=4,8", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "out" / "multirun").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_method.r=4", "1_method.r=8"]
    assert [r["run_dir"] for r in results.read_rows(tmp_path / "runs.csv")] == [str(sweep / "0_method.r=4"),
                                                                               str(sweep / "1_method.r=8")]
    text = " ".join(result.stderr.split())
    csv_path = tmp_path / "runs.csv"
    assert f"sweep folder: {sweep}" in text and f"rows appended to: {csv_path}" in text
    assert f"python -m lowrank_bench.tables {csv_path}" in text


def test_job_folder_names_are_one_safe_short_folder():
    assert configs.job_folder(0, "method=lora,seed=0") == "0_method=lora,seed=0"
    assert configs.job_folder(3, "task=glue/sst2") == "3_task=glue-sst2"  # one folder, not glue/ and sst2/
    assert configs.job_folder(1, "task.files=['a b.jsonl']") == "1_task.files=__a_b.jsonl__"
    assert configs.job_folder(2, "") == "2"
    assert len(configs.job_folder(12, "x" * 500)) == len("12_") + configs.FOLDER_CHARS


def test_the_keys_every_job_has_alike_are_left_out_of_the_names():
    line = configs.sweep_folder_override(["method=ft,lora", "seed=0,1", "task=glue/rte", "+trainer.x=1",
                                          "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    key, _, value = line.partition("=")
    keys = json.loads(value)
    assert key == configs.EXCLUDE_KEYS
    assert {"task", "trainer.x", "trainer.progress", "results_csv"} <= set(keys)
    assert not {"method", "seed"} & set(keys)
    assert configs.sweep_folder_override(["seed=0,1", f"{configs.EXCLUDE_KEYS}=[]"]) is None  # the user's own


# -- lrbench --help ------------------------------------------------------------------------------------------------
def test_help_is_lrbenchs_own_page_with_examples_and_no_internal_configs():
    result = lrbench("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    page = result.stdout
    for example in ("  lrbench  ", "lrbench method=lora task=glue/sst2", "lrbench -m method=ft,lora,dora",
                    "task=continual/toy", "lrbench mode=eval run_dir="):
        assert example in page, example
    assert "task=glue/sst2" in page and re.search(r"task=glue/\s+cola .*sst2", page)
    assert not re.search(r"(^|[\s/,=])_base\b", page, re.M)  # the shared bases (roberta_base is a preset's name)
    assert "reproduce" not in page and "powered by Hydra" not in page
    assert "outputs/runs/" in page and "results/runs.csv" in page and "python -m lowrank_bench.tables" in page


def test_help_and_cfg_do_not_import_torch():
    script = ("import sys\nfrom lowrank_bench.train import main\nfor argv in (['--help'], ['--cfg', 'job']):\n"
              "    sys.argv = ['lrbench', *argv]\n    try:\n        main()\n    except SystemExit:\n        pass\n"
              "print('torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "False", result.stderr[-2000:]


# -- advice that matches the failing thing --------------------------------------------------------------------------
def test_a_dataset_that_cannot_load_points_at_local_files_and_not_at_the_model(monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    with pytest.raises(LrbenchError) as refused:
        hub.load_dataset("nyu-mll/glue", "sst2", split="train", shown="nyu-mll/glue/sst2")
    message = str(refused.value)
    assert "LRBENCH_DATA_DIR=<folder>" in message and "docs/data.md" in message and "lrbench-data get" in message
    assert "`task.data_dir=/path/to/folder`" in message and "model=" not in message and "\n" not in message
    with pytest.raises(LrbenchError) as mc:  # a multiple-choice benchmark's items: its own setting, no model either
        hub.load_dataset(path="cais/mmlu", name="all", split="test", shown="cais/mmlu", override="eval.data_dir")
    assert "`eval.data_dir=/path/to/folder`" in str(mc.value) and "model=" not in str(mc.value)


def test_a_hub_model_that_cannot_load_still_suggests_an_offline_model():
    with pytest.raises(LrbenchError, match=r"model.path=/path/to/folder.*offline model such as `model=minilm-l6`"):
        hub.pretrained_kwargs("org/absent", "model.path")
