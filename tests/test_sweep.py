"""A `-m` sweep goes on past a failing job: the other jobs write their rows, the failed one leaves no row and no
folder, the end of the sweep lists it with its reason, and the command exits 1 (0 when every job finished)."""
from __future__ import annotations

import json

from lowrank_bench.results import read_rows
from tests.test_cli import lrbench

SWEEP = ["-m", "model=tiny-roberta", "trainer.max_steps=2", "trainer.progress=false"]


def test_a_failing_job_is_listed_and_the_others_finish(tmp_path):
    env = {"LRBENCH_OUTPUT_DIR": str(tmp_path), "LRBENCH_RESULTS_CSV": str(tmp_path / "runs.csv"),
           "OMP_NUM_THREADS": "1"}
    result = lrbench(*SWEEP, "method.r=4,100,8", env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert [r["rank"] for r in read_rows(tmp_path / "runs.csv")] == ["4", "8"]  # jobs 0 and 2 after job 1 failed
    text = " ".join(result.stderr.split())
    assert "1 job(s) of the sweep failed" in text and "#1 model=tiny-roberta" in text and "method.r=100:" in text
    assert "rank r=100 is impossible" in text
    (sweep,) = tmp_path.glob("multirun/*")
    (failure,) = [json.loads(line) for line in (sweep / "failures.jsonl").read_text().splitlines()]
    assert failure["job"] == 1 and failure["error"].startswith("LrbenchError: rank r=100")
    # no folder for the failed job; each is named by what it varies (model=tiny-roberta is every job's)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_method.r=4", "2_method.r=8"]

    clean = lrbench(*SWEEP, "method.r=4", env={**env, "LRBENCH_OUTPUT_DIR": str(tmp_path / "clean")})
    assert clean.returncode == 0 and "failed" not in clean.stderr
