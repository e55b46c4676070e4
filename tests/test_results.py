"""The shared results CSV: concurrent appends never interleave or lose rows; new columns widen the header."""
from __future__ import annotations

import csv
import multiprocessing as mp

from lowrank_bench.results import append_row, read_rows


def writer(path, worker: int, count: int) -> None:
    for i in range(count):
        row = {"method": f"m{worker}", "seed": i, "note": "x" * 500, "best_accuracy": worker + i / 1000}
        if i % 10 == 3:  # now and then a row with a column nobody has written yet
            row[f"extra_{worker}_{i}"] = i
        append_row(path, row)


def test_concurrent_appends_keep_every_row_intact(tmp_path):
    path = tmp_path / "runs.csv"
    workers, count = 6, 25
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=writer, args=(path, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    rows = read_rows(path)
    assert len(rows) == workers * count
    assert sorted((r["method"], int(r["seed"])) for r in rows) == sorted(
        (f"m{w}", i) for w in range(workers) for i in range(count))
    assert all(r["note"] == "x" * 500 for r in rows)
    with open(path, newline="") as handle:
        header = next(csv.reader(handle))
    assert sum(c.startswith("extra_") for c in header) == workers * 3  # i in {3, 13, 23}
    assert header[:1] == ["method"]


def test_new_column_keeps_old_rows(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, {"method": "lora", "best_accuracy": 0.5})
    append_row(path, {"method": "dora", "best_f1": 0.7})
    rows = read_rows(path)
    assert rows == [{"method": "lora", "best_accuracy": "0.5", "best_f1": ""},
                    {"method": "dora", "best_accuracy": "", "best_f1": "0.7"}]


def test_a_torn_last_row_is_quarantined_and_the_next_row_lands_whole(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, {"method": "lora", "seed": 0})
    with open(path, "a") as handle:
        handle.write("dora,1,0.7")  # a writer killed mid-row: no newline
    append_row(path, {"method": "ft", "seed": 2})
    assert [(r["method"], r["seed"]) for r in read_rows(path)] == [("lora", "0"), ("ft", "2")]
    assert (tmp_path / "runs.csv.torn").read_text() == "dora,1,0.7\n"


def test_a_ragged_row_does_not_block_a_row_with_new_columns(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, {"method": "lora", "seed": 0})
    with open(path, "a") as handle:
        handle.write("dora,1,extra,cells\n")  # more cells than the header
    append_row(path, {"method": "ft", "seed": 2, "status": "finished"})  # a new column: the file is rewritten
    assert [(r["method"], r["status"]) for r in read_rows(path)] == [("lora", ""), ("ft", "finished")]
    assert (tmp_path / "runs.csv.torn").read_text() == "dora,1,extra,cells\n"  # kept whole, for a person to judge


def test_seeds_of_one_configuration_share_a_config_hash_even_where_a_setting_repeats_the_seed():
    from lowrank_bench.results import config_hash
    from tests.conftest import compose_cfg

    curlora = [config_hash(compose_cfg("method=curlora", f"seed={s}")) for s in (0, 1)]
    assert curlora[0] == curlora[1]  # method.seed: ${seed} is the seed again, not a setting of its own
    assert config_hash(compose_cfg("method=curlora", "method.seed=7")) != curlora[0]  # a fixed sampling seed is
    assert config_hash(compose_cfg("method=lora", "optimizer.lr=1e-3")) != config_hash(compose_cfg("method=lora"))
