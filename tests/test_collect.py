"""`python -m lowrank_bench.collect`: the results CSV rebuilt or merged from the run folders ends with every finished
run exactly once, its row exactly the one the run appended; damaged folders are warnings, bad targets one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_bench.collect import main
from lowrank_bench.results import read_rows, replace_rows

RUN = ["model=tiny-roberta", "task=toy/sentiment", "trainer.max_steps=2", "trainer.eval_every=2",
       "trainer.progress=false", "trainer.eval_batch_size=64", "save_adapter=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three real runs (one sweep, one process), each appending its row: (output folder, CSV bytes, rows)."""
    tmp = tmp_path_factory.mktemp("collect")
    outputs, csv_path = tmp / "outputs", tmp / "runs.csv"
    result = subprocess.run([sys.executable, "-m", "lowrank_bench.train", "-m", "method=ft,lora,dora", *RUN],
                            capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "LRBENCH_OUTPUT_DIR": str(outputs), "LRBENCH_RESULTS_CSV": str(csv_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(csv_path)
    assert [r["method"] for r in rows] == ["ft", "lora", "dora"]
    return outputs, csv_path.read_bytes(), rows


def fabricated(folder: Path, method: str, status: str | None = "finished", **extra) -> dict:
    """A run folder as a run leaves it: summary.json (the row, then its tables) and status; the folder's name is
    its minute, so that folders a, b, c finished in that order."""
    row = {"timestamp": f"2026-01-01T00:{ord(folder.name) - ord('a'):02d}:00+00:00", "method": method, "model": "tiny-roberta",
           "task": "toy/sentiment", "seed": 0, "config_hash": "abc", "best_accuracy": 0.5, "degenerate": False,
           "status": status or "finished", "run_dir": str(folder), **extra}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({**row, "best_confusion": [[1, 0], [0, 1]]}, indent=2))
    if status:
        (folder / "status").write_text(status + "\n")
    return row


@pytest.mark.slow
def test_rebuild_after_the_csv_is_deleted_gives_the_appended_file_byte_for_byte(sweep, tmp_path, capsys):
    outputs, appended, _ = sweep
    csv_path = tmp_path / "runs.csv"
    assert main([str(outputs), "--csv", str(csv_path), "--rebuild"]) == 0
    assert csv_path.read_bytes() == appended  # same rows, same columns, same order, same cells
    assert "3 added, 0 already there" in capsys.readouterr().out


@pytest.mark.slow
def test_merge_into_a_csv_missing_one_row_and_repeating_another_gives_each_row_once(sweep, tmp_path, capsys):
    outputs, _, rows = sweep
    csv_path = tmp_path / "runs.csv"
    replace_rows(csv_path, list(rows[0]), [rows[0], rows[2], rows[0]])  # lora's row lost, ft's written twice
    assert main([str(outputs), "--csv", str(csv_path), "--merge"]) == 0
    merged = read_rows(csv_path)
    assert sorted(r["run_dir"] for r in merged) == sorted(r["run_dir"] for r in rows)
    assert merged == [rows[0], rows[2], rows[1]]  # the kept rows untouched, the missing one appended as it was
    assert "1 added, 2 already there, 1 repeated row(s) removed" in capsys.readouterr().out
    before = csv_path.read_bytes()
    assert main([str(outputs), "--csv", str(csv_path)]) == 0  # merge is the default, and a second one changes nothing
    assert csv_path.read_bytes() == before and "0 added, 3 already there" in capsys.readouterr().out


def test_damaged_running_and_failed_folders_are_skipped_with_one_warning_line_each(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    good = fabricated(outputs / "runs" / "a", "lora")
    diverged = fabricated(outputs / "runs" / "b", "dora", status="diverged", diverged_at_step=3)
    evaluation = fabricated(outputs / "runs" / "c", "ft", status=None, mode="eval")  # mode=eval: no status file
    fabricated(outputs / "runs" / "d", "ft", status="running")
    fabricated(outputs / "runs" / "e", "ft", status="failed")
    (outputs / "runs" / "x").mkdir()
    (outputs / "runs" / "x" / "summary.json").write_text('{"method": "lora", "model": ')  # a node died mid-write
    (outputs / "runs" / "y").mkdir()
    (outputs / "runs" / "y" / "summary.json").write_bytes(b"\xff\xfe not json")
    csv_path = tmp_path / "runs.csv"
    assert main([str(outputs), "--csv", str(csv_path)]) == 0
    out, err = capsys.readouterr()
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("lrbench warning: ") and "damaged summary.json" in w
                                      for w in warnings)
    assert "Traceback" not in err
    assert "7 run folder(s) with summary.json, 3 row(s) to record" in out
    assert "skipped 4: 2 damaged summary.json, 1 status failed, 1 status running" in out
    rows = read_rows(csv_path)
    assert [r["run_dir"] for r in rows] == [good["run_dir"], diverged["run_dir"], evaluation["run_dir"]]
    assert "best_confusion" not in rows[0] and rows[0]["best_accuracy"] == "0.5"  # the row, not its tables
    assert rows[1]["diverged_at_step"] == "3" and rows[0]["diverged_at_step"] == ""


def test_a_copied_run_folder_counts_once(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    fabricated(outputs / "runs" / "a", "lora")
    shutil.copytree(outputs / "runs" / "a", outputs / "copy" / "a")
    csv_path = tmp_path / "runs.csv"
    assert main([str(outputs), "--csv", str(csv_path)]) == 0
    assert len(read_rows(csv_path)) == 1 and "1 same run_dir as another folder" in capsys.readouterr().out


def test_rebuild_keeps_rows_no_folder_accounts_for_in_a_backup(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    row = fabricated(outputs / "runs" / "a", "lora")
    csv_path = tmp_path / "runs.csv"
    elsewhere = {**row, "run_dir": "/other/node/runs/z", "method": "dora"}
    replace_rows(csv_path, list(row), [{k: str(v) for k, v in elsewhere.items()}])
    assert main([str(outputs), "--csv", str(csv_path), "--rebuild"]) == 0
    assert [r["run_dir"] for r in read_rows(csv_path)] == [row["run_dir"]]
    assert [r["run_dir"] for r in read_rows(tmp_path / "runs.csv.bak")] == ["/other/node/runs/z"]
    assert "1 row(s) no folder accounts for dropped" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--csv", str(csv_path), "--rebuild"]) == 2  # nothing found: the file is not emptied
    assert len(read_rows(csv_path)) == 1


@pytest.mark.parametrize("target, message", [
    ("blocker/runs.csv", "blocker is a file, not a folder"),
    ("folder", "is a folder; give a file path"),
    ("foreign.csv", "is not an lrbench results file"),
    ("/proc/self/no/runs.csv", "cannot be written"),  # a folder that cannot be made, even by root
])
def test_a_csv_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys, target, message):
    outputs = tmp_path / "outputs"
    fabricated(outputs / "runs" / "a", "lora")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "folder").mkdir()
    (tmp_path / "foreign.csv").write_text("name,score\nx,1\n")
    assert main([str(outputs), "--csv", str(tmp_path / target)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("lrbench error: ") and message in err and out == ""
    assert (tmp_path / "foreign.csv").read_text() == "name,score\nx,1\n"


def test_a_missing_outputs_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--csv", str(tmp_path / "runs.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err and not (tmp_path / "runs.csv").exists()
