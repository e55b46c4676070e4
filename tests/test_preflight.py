"""Bad input that the run can only see at run time (a foreign results CSV, an output path that is a file, a
missing data folder, an unknown mode) is one line and exit code 2, within seconds, before the model loads, with
no row and no run folder left behind."""
from __future__ import annotations

import os
import time

import pytest

from lowrank_bench.results import read_rows
from tests.test_cli import lrbench


def refused(tmp_path, *args, env=None) -> tuple[str, float]:
    csv_path = tmp_path / "runs.csv"
    environment = {"LRBENCH_OUTPUT_DIR": str(tmp_path / "out"), "LRBENCH_RESULTS_CSV": str(csv_path), **(env or {})}
    start = time.perf_counter()
    result = lrbench("model=tiny-roberta", "trainer.max_steps=2", "trainer.progress=false", *args, env=environment)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    runs = tmp_path / "out" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())  # no run folder
    if csv_path.is_file() and "results_csv" not in str(args):
        assert read_rows(csv_path) == [] or csv_path.read_text().startswith("question")
    return result.stderr, seconds


@pytest.mark.parametrize("setup, args, message", [
    ("foreign_csv", [], "is not an lrbench results file"),
    ("csv_is_folder", [], "is a folder; give a file path"),
    ("output_is_file", [], "is not writable"),
    ("missing_data_dir", [], "LRBENCH_DATA_DIR=/no/such/data: no such folder"),
    ("none", ["mode=bogus"], "mode=bogus: choose one of train, eval"),
    ("none", ["mode=eval"], "mode=eval needs run_dir="),
])
def test_refused_in_seconds_without_a_row_or_a_folder(tmp_path, setup, args, message):
    env = {}
    if setup == "foreign_csv":
        (tmp_path / "runs.csv").write_text("question,A,B,answer\nq,a,b,A\n")
    elif setup == "csv_is_folder":
        (tmp_path / "runs.csv").mkdir()
    elif setup == "output_is_file":
        (tmp_path / "blocked").write_text("a file where a folder should be")
        env["LRBENCH_RESULTS_CSV"] = str(tmp_path / "blocked" / "runs.csv")
    elif setup == "missing_data_dir":
        env["LRBENCH_DATA_DIR"] = "/no/such/data"
    stderr, seconds = refused(tmp_path, *args, env=env)
    assert message in " ".join(stderr.split()), stderr[-2000:]
    assert seconds < 10 + startup_allowance(), seconds
    if setup == "foreign_csv":
        assert (tmp_path / "runs.csv").read_text() == "question,A,B,answer\nq,a,b,A\n"  # untouched


def startup_allowance() -> float:
    """Importing torch and transformers alone takes seconds on a loaded 2-core machine; the refusal itself is
    what must be fast (the budget is 10 s on top of the interpreter's start-up, measured here)."""
    start = time.perf_counter()
    os.system(f"{os.sys.executable} -c 'import torch, transformers' > /dev/null 2>&1")
    return time.perf_counter() - start
