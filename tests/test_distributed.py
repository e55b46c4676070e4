"""Data parallel: the reduced hypergradient is the hypergradient on one rank; `torchrun --nproc_per_node=2` on the
CPU (gloo) follows the single-process loss trajectory on the same global batch, for lora and bidora; rank 0 alone
writes its folder and its row. Evaluation is sharded: each rank takes a contiguous run of the batches one process
makes, and every evaluation path (classification, NER, SFT, E2E generation, strided perplexity) gives the
single-process result exactly; `mode=eval` on two ranks gives the single-process run's last metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_bench import distributed
from lowrank_bench.distributed import DataParallel
from lowrank_bench.hypergradient import MODES, hypergradient
from lowrank_bench.results import read_rows
from tests.conftest import ROOT
from tests.test_bilevel import quadratic_problem


@pytest.mark.parametrize("mode", [*MODES, "exact"])
def test_the_hypergradient_summed_over_one_rank_is_the_hypergradient(mode):
    lower, upper, V, m, _, _ = quadratic_problem()
    expected, loss = hypergradient(upper, lower, [m], [V], mode, alpha=0.01, xi=0.1)
    calls = []
    got, got_loss = hypergradient(upper, lower, [m], [V], mode, 0.01, 0.1, calls.append)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and torch.equal(got_loss, loss)
    # v with the direct term, then the difference; the lower gradient before a virtual step; each of the default
    # 3 Hessian-vector products of neumann and cg
    sums = {"first_order": 1, "unrolled": 3, "darts_unrolled": 3, "neumann": 2 + 3, "cg": 2 + 3}
    assert len(calls) == sums.get(mode, 2)


def test_two_weighted_halves_summed_give_the_hypergradient_of_the_whole():
    """What two ranks compute: each half of a batch weighted by its share; summing after v and after the finite
    difference equals the single-process hypergradient on the whole batch."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    V = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    m = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def losses(rows, V, m):
        lower = lambda: ((X[rows] @ (V * m) - Y[rows]) ** 2).mean() + (V ** 4).sum() / 10
        upper = lambda: ((X[rows] @ (V * m.exp()) - Y[rows]) ** 2).mean()
        return upper, lower

    whole, _ = hypergradient(*losses(slice(0, 10), V, m), [m], [V], "darts", alpha=0.01)
    shards = [(slice(0, 6), 0.6), (slice(6, 10), 0.4)]
    # the two ranks run in lock step (at each `sum_` both ranks' tensors are summed), each on its own copy of the
    # parameters, as real ranks are: shared tensors would let one thread's requires_grad toggling break the other
    from threading import Barrier, Thread
    barrier, pending, results, errors = Barrier(2, timeout=60), {}, {}, []

    def rank(r):
        rows, share = shards[r]
        V_r, m_r = (torch.nn.Parameter(p.detach().clone()) for p in (V, m))
        upper, lower = losses(rows, V_r, m_r)

        def sum_(tensors):
            pending[r] = tensors
            barrier.wait()
            summed = [a + b for a, b in zip(pending[0], pending[1])]
            barrier.wait()
            for t, s in zip(tensors, summed):
                t.copy_(s)

        try:
            results[r] = hypergradient(lambda: upper() * share, lambda: lower() * share, [m_r], [V_r], "darts", 0.01,
                                       sum_=sum_)
        except Exception as err:  # noqa: BLE001 - reported below; a failing rank must not leave the other waiting
            errors.append(err)
            barrier.abort()

    threads = [Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for r in (0, 1):
        torch.testing.assert_close(results[r][0][0], whole[0], rtol=1e-7, atol=1e-9)


# -- torchrun on the CPU -------------------------------------------------------------------------------------------
# No dropout (its masks depend on how a batch is split), 90 examples in global batches of 25: shares of 13 and 12
# examples, then 8 and 7 for the short last batch of each pass.
DP_RUN = ["model=tiny-roberta", "task.max_train_samples=90", "task.max_eval_samples=64", "trainer.batch_size=25",
          "trainer.max_steps=8", "trainer.eval_every=1", "trainer.eval_batch_size=16", "trainer.progress=false",
          "trainer.device=cpu",
          "++model.config.hidden_dropout_prob=0.0", "++model.config.attention_probs_dropout_prob=0.0"]


def launch(tmp: Path, name: str, nproc: int, overrides: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / name
    env = {**os.environ, "LRBENCH_OUTPUT_DIR": str(out), "LRBENCH_RESULTS_CSV": str(out / "runs.csv"),
           "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*prefix, "-m", "lowrank_bench.train", *overrides], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    return result, out


def trajectory(out: Path) -> list[dict]:
    (folder,) = list((out / "runs").iterdir())  # one run folder: the other rank's is gone
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_torchrun_on_two_cpu_processes_follows_the_single_process_losses(tmp_path, method):
    overrides = [*DP_RUN, f"method={method}"]
    single, single_out = launch(tmp_path, "single", 1, overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    double, double_out = launch(tmp_path, "ddp", 2, overrides)
    assert double.returncode == 0, double.stderr[-3000:]
    ours, theirs = trajectory(double_out), trajectory(single_out)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 9))
    keys = [k for k in theirs[0] if k.startswith("train_")]
    assert keys == (["train_loss"] if method == "lora" else ["train_lower_loss", "train_upper_loss"])
    gaps = [abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in keys]
    print(f"{method}: largest |loss difference| over {len(ours)} steps: {max(gaps):.2e}")
    assert max(gaps) < 1e-5, gaps
    assert [a["epoch"] for a in ours] == [b["epoch"] for b in theirs]
    rows = read_rows(double_out / "runs.csv")
    assert len(rows) == 1 and rows[0]["train_samples"] == read_rows(single_out / "runs.csv")[0]["train_samples"]
    assert double.stdout.count("trainable_params") == 1  # the summary table: rank 0's only
    # 64 evaluation examples in 4 batches of 16: two batches each
    assert all(r["eval_examples_by_rank"] == [32, 32] for r in ours) and "eval_examples_by_rank" not in theirs[0]


# -- sharded evaluation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_ranks_shares_are_contiguous_in_order_and_differ_by_at_most_one(world):
    for n in range(12):
        shares = [DataParallel(rank, world).share(n) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_ranks_take_the_single_process_batches_between_them_and_count_their_rows(monkeypatch):
    distributed.take_evaluated()  # what earlier evaluations in this process counted
    alone = distributed.eval_batches(50, 8)
    assert distributed.take_evaluated() == 50 and [len(b) for b in alone] == [8] * 6 + [2]
    taken = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_current", DataParallel(rank, 2))
        taken.append(distributed.eval_batches(50, 8))
    assert taken[0] + taken[1] == alone and distributed.take_evaluated() == 50  # 32 + 18, no padding row
    assert [sum(map(len, t)) for t in taken] == [32, 18] and distributed.take_evaluated() == 0


def torchrun(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_every_sharded_evaluation_on_two_ranks_equals_one_process_alone(tmp_path):
    """tests/sharded_eval.py: each rank scores its share, then the whole split alone, on the same weights."""
    done = torchrun(tmp_path, str(ROOT / "tests" / "sharded_eval.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # examples (batches) per rank, by hand: toy 50 in 7 batches of 8 (4 + 3 batches); NER 3 sentences, SFT 6 held
    # out of 12, E2E 3 MRs, one per batch; strided perplexity 11 windows of 90 tokens (context 16, stride 8)
    expected = {"classification": (32, 18), "ner": (2, 1), "sft": (3, 3), "e2e": (2, 1), "perplexity": (6, 5)}
    for path, counts in expected.items():
        assert all(report[path]["equal"] for report in reports), (path, reports[0][path]["value"])
        assert tuple(report[path]["taken"] for report in reports) == counts, path


@pytest.mark.slow
def test_evaluating_a_saved_run_on_two_ranks_gives_its_single_process_numbers(tmp_path):
    single, single_out = launch(tmp_path, "single", 1, [*DP_RUN, "method=lora"])
    assert single.returncode == 0, single.stderr[-3000:]
    (trained,) = read_rows(single_out / "runs.csv")
    evaluated, out = launch(tmp_path, "eval", 2, ["mode=eval", f"run_dir={trained['run_dir']}", "trainer.device=cpu",
                                                  "trainer.eval_batch_size=16", "trainer.progress=false"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (row,) = read_rows(out / "runs.csv")  # rank 0's row only
    assert row["mode"] == "eval" and row["accuracy"] == trained["last_accuracy"]
    (folder,) = list((out / "runs").iterdir())  # rank 1's folder is gone
    assert json.loads((folder / "summary.json").read_text())["eval_examples_by_rank"] == [32, 32]
