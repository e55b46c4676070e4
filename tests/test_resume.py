"""Checkpoints and resume: the batch stream is the DataLoader's, draw for draw; a run killed at a random step and
resumed ends bit for bit where an uninterrupted run ends (lora, bidora with retraining, a continual sequence);
signals checkpoint and stop; a resumed run writes one row; a checkpoint of another config is refused."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lowrank_bench import checkpoint
from lowrank_bench.batches import BatchStream, bounds
from lowrank_bench.errors import LrbenchError
from lowrank_bench.results import read_rows
from lowrank_bench.train import run
from tests.conftest import ROOT, compose_cfg


# -- the batch stream -----------------------------------------------------------------------------------------------
def collate(features: list[dict]) -> dict:
    return {"input_ids": torch.tensor([[f["i"]] for f in features])}


def examples(n: int) -> list[dict]:
    return [{"i": i} for i in range(n)]


def endless(loader):
    """Cycle a DataLoader forever; each pass reshuffles from the loader's seeded generator: the reference that
    `batches.BatchStream` (the trainer's resumable stream) must match batch for batch."""
    epoch = 0
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1


def dataloader_streams(sizes, batch_size, generator):
    return [endless(DataLoader(examples(n), batch_size=batch_size, shuffle=True, collate_fn=collate,
                               generator=generator)) for n in sizes]


@pytest.mark.parametrize("sizes,batch_size", [
    ((64,), 8),          # passes end on a full batch: the sampler's discarded permutation opens the next pass
    ((50,), 8),          # passes end on a short batch: it is drawn while filling that batch
    ((5,), 8),           # a pass shorter than one batch
    ((50, 24), 8),       # the bi-level rule's two streams on one generator, interleaved
    ((37, 16, 9), 4),
])
def test_stream_yields_the_dataloaders_batches_and_draws_the_same_numbers(sizes, batch_size):
    theirs_g, ours_g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    theirs = dataloader_streams(sizes, batch_size, theirs_g)
    ours = [BatchStream(examples(n), batch_size, collate, ours_g) for n in sizes]
    pattern = random.Random(0)
    for _ in range(200):  # several passes of every stream, in an irregular interleaving
        k = pattern.randrange(len(sizes))
        (e1, b1), (e2, b2) = next(theirs[k]), next(ours[k])
        assert e1 == e2 and torch.equal(b1["input_ids"], b2["input_ids"])
        assert torch.equal(theirs_g.get_state(), ours_g.get_state())  # same draws, at the same requests
    assert min(s.epoch for s in ours) >= 3



def test_an_unshuffled_stream_serves_every_pass_in_file_order_and_draws_nothing():
    g = torch.Generator().manual_seed(7)
    before = g.get_state()
    stream = BatchStream(examples(10), 4, collate, g, shuffle=False)
    served = [(epoch, batch["input_ids"].flatten().tolist()) for epoch, batch in (next(stream) for _ in range(6))]
    assert served == [(0, [0, 1, 2, 3]), (0, [4, 5, 6, 7]), (0, [8, 9]),
                      (1, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (1, [8, 9])]
    assert torch.equal(g.get_state(), before)

def test_stream_continues_from_its_saved_state_and_the_generators():
    g = torch.Generator().manual_seed(3)
    reference = [BatchStream(examples(n), 8, collate, g) for n in (50, 20)]
    expected = [next(reference[i % 2])[1]["input_ids"] for i in range(60)]
    g = torch.Generator().manual_seed(3)
    first = [BatchStream(examples(n), 8, collate, g) for n in (50, 20)]
    got = [next(first[i % 2])[1]["input_ids"] for i in range(23)]
    saved = [s.state() for s in first]
    generator_state = g.get_state()
    g2 = torch.Generator().manual_seed(999)
    g2.set_state(generator_state)
    second = [BatchStream(examples(n), 8, collate, g2) for n in (50, 20)]
    for stream, (scalars, tensors) in zip(second, saved):
        stream.load_state(json.loads(json.dumps(scalars)), tensors)  # as a checkpoint's meta.json keeps them
    got += [next(second[i % 2])[1]["input_ids"] for i in range(23, 60)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_data_parallel_shares_cover_the_global_batch_once():
    for n in range(20):
        for world in (1, 2, 3, 4):
            parts = [bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1


# -- identity ---------------------------------------------------------------------------------------------------
def test_identity_ignores_where_and_how_a_run_reports_and_lists_what_differs():
    base = compose_cfg("model=tiny-roberta", "trainer.max_steps=4")
    same = compose_cfg("model=tiny-roberta", "trainer.max_steps=4", "trainer.progress=false", "trainer.resume=auto",
                       "trainer.checkpoint_every=7", "trainer.log_every=1", "logger=wandb", "save_adapter=false",
                       "results_csv=/elsewhere.csv", "output_dir=/elsewhere")
    other = compose_cfg("model=tiny-roberta", "trainer.max_steps=5", "optimizer.lr=0.1")
    ident = checkpoint.identity(base)
    assert checkpoint.fingerprint(ident) == checkpoint.fingerprint(checkpoint.identity(same))
    assert "trainer.max_steps: 4 -> 5" in checkpoint.differences(ident, checkpoint.identity(other))
    assert "optimizer.lr: 0.002 -> 0.1" in checkpoint.differences(ident, checkpoint.identity(other))
    assert len(checkpoint.differences(ident, checkpoint.identity(other))) == 2


# -- kill, resume, compare ----------------------------------------------------------------------------------------
# Runs the CLI with the loop patched to send itself `KILL_SIGNAL` before optimiser step `KILL_AT`: the test-only
# part stays in the test.
KILLER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (a runner may start us ignoring it)
from lowrank_bench.trainer import Trainer
at, sig = int(os.environ["KILL_AT"]), int(os.environ["KILL_SIGNAL"])
original = Trainer.optimizer_step
def optimizer_step(self, optimizer, params):
    if self.optimizer_steps + 1 == at:
        os.kill(os.getpid(), sig)
    original(self, optimizer, params)
Trainer.optimizer_step = optimizer_step
from lowrank_bench.train import main
main()
"""
TINY = ["model=tiny-roberta", "trainer.progress=false", "trainer.eval_batch_size=64", "task.max_eval_samples=64"]
# 200 examples in batches of 32: passes end on a short batch at steps 7 and 14
LORA = [*TINY, "method=lora", "task.max_train_samples=200", "trainer.max_steps=16", "trainer.eval_every=3",
        "trainer.checkpoint_every=4"]
VOLATILE = ("timestamp", "run_dir", "wall_time_s", "train_time_s", "time_per_step_ms", "samples_per_s",
            "peak_mem_mb", "checkpoints", "checkpoint_s", "git_commit", "matrix_csv", "model_load_s")


def killed_run(tmp: Path, overrides: list[str], at: int, sig: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(at), "KILL_SIGNAL": str(int(sig)), "LRBENCH_OUTPUT_DIR": str(tmp / "out"),
           "LRBENCH_RESULTS_CSV": str(tmp / "runs.csv"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-c", KILLER, *overrides], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def outputs(run_dir: Path) -> tuple[str, dict[str, torch.Tensor], dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return ((run_dir / "metrics.jsonl").read_text(), load_file(str(run_dir / "adapter.safetensors")),
            {k: v for k, v in summary.items() if k not in VOLATILE})


def assert_same_run(resumed: Path, reference: Path) -> None:
    (m1, a1, s1), (m2, a2, s2) = outputs(resumed), outputs(reference)
    assert m1 == m2  # every evaluation, loss and confusion matrix, to the last bit, written once
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert s1 == s2


_REFERENCES: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, one per config, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("references")

    def reference(overrides: list[str]) -> Path:
        key = tuple(overrides)
        if key not in _REFERENCES:
            folder = root / str(len(_REFERENCES))
            saved = os.environ["LRBENCH_RESULTS_CSV"]
            os.environ["LRBENCH_RESULTS_CSV"] = str(folder / "runs.csv")
            try:
                run(compose_cfg(*overrides), folder / "run")
            finally:
                os.environ["LRBENCH_RESULTS_CSV"] = saved
            _REFERENCES[key] = folder / "run"
        return _REFERENCES[key]

    return reference


def kill_resume_compare(tmp_path, monkeypatch, reference: Path, overrides: list[str], low: int, high: int, seed: int,
                        sig: int = signal.SIGKILL) -> dict:
    at = random.Random(seed).randint(low, high)  # a random optimiser step, printed on failure
    killed = killed_run(tmp_path, overrides, at, sig)
    assert killed.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), \
        (at, killed.returncode, killed.stderr[-3000:])
    assert not (tmp_path / "runs.csv").exists()
    monkeypatch.setenv("LRBENCH_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    (tmp_path / "launched").mkdir()  # the folder Hydra makes for the resuming command
    resumed = run(compose_cfg(*overrides, "trainer.resume=auto"), tmp_path / "launched")
    assert_same_run(Path(resumed["run_dir"]), reference)
    assert Path(resumed["run_dir"]).parent == tmp_path / "out" / "runs"  # continued in the killed run's folder
    assert json.loads((tmp_path / "launched" / "resumed.json").read_text())["continued"] == resumed["run_dir"]
    assert len(read_rows(tmp_path / "runs.csv")) == 1
    assert not (Path(resumed["run_dir"]) / "checkpoints").exists()  # removed once the row is written
    return resumed, killed


@pytest.mark.slow
def test_lora_killed_at_a_random_step_resumes_bit_for_bit(tmp_path, monkeypatch, references):
    kill_resume_compare(tmp_path, monkeypatch, references(LORA), LORA, low=6, high=15, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 7])  # kills before optimiser step 4 (mid-search: both levels' streams and
# optimisers come back) and 7 (the retraining's first: its restart point, the search's snapshot, comes back)
def test_bidora_with_retraining_killed_at_a_random_step_resumes_bit_for_bit(tmp_path, monkeypatch, references,
                                                                            seed):
    overrides = [*TINY, "method=bidora", "task.max_train_samples=160", "trainer.max_steps=6", "trainer.eval_every=2",
                 "trainer.checkpoint_every=3", "method.retrain.enabled=true", "method.retrain.max_steps=5"]
    # optimiser steps: 6 lower steps of the search, then 5 of the retraining
    resumed, _ = kill_resume_compare(tmp_path, monkeypatch, references(overrides), overrides, low=4, high=11,
                                     seed=seed)
    assert resumed["search_steps"] == 6 and resumed["retrain_steps"] == 5


@pytest.mark.slow
def test_continual_sequence_killed_in_its_second_task_resumes_bit_for_bit(tmp_path_factory, monkeypatch,
                                                                          references):
    tmp_path = tmp_path_factory.mktemp("continual")
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog . a gripping , beautiful film .\n" * 6)
    overrides = ["model=tiny-gpt2", "task=continual/toy", "method=lora", "trainer.progress=false",
                 "trainer.max_steps=5", "trainer.eval_every=2", "trainer.checkpoint_every=3",
                 "task.perplexity.mode=strided", f"task.perplexity.corpus={corpus}", "task.perplexity.context=64"]
    reference = references(overrides)
    resumed, _ = kill_resume_compare(tmp_path, monkeypatch, reference, overrides, low=7, high=10, seed=3)
    assert resumed["ppl_before"] > 1 and resumed["final_accuracy_second"] is not None
    matrix = Path(resumed["run_dir"]) / "accuracy_matrix.csv"
    assert matrix.read_text() == (reference / "accuracy_matrix.csv").read_text()


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_stops(tmp_path, monkeypatch, references):
    """Sent before optimiser step 6 (periodic checkpoints at 4, 8, ...): the run checkpoints after step 6, exits
    with 128 + 15 and resumes from there. (SIGUSR1 and SIGUSR2 take the same path: tests/test_launchers.py sends
    SIGUSR1 to a submitit job.)"""
    sig = signal.SIGTERM
    _, killed = kill_resume_compare(tmp_path, monkeypatch, references(LORA), LORA, low=6, high=6, seed=0, sig=sig)
    assert f"{signal.Signals(sig).name}: stopped after checkpoint" in killed.stderr
    assert "step-00000006" in killed.stderr.replace("\n", "")


@pytest.mark.slow
def test_sigint_checkpoints_at_the_next_step_and_stops_like_sigterm(tmp_path, monkeypatch, references):
    """Ctrl-C before optimiser step 6: a checkpoint after step 6, the resume hint, exit 130 without a traceback,
    and `trainer.resume=auto` ends bit for bit where the uninterrupted run ends."""
    _, killed = kill_resume_compare(tmp_path, monkeypatch, references(LORA), LORA, low=6, high=6, seed=0,
                                    sig=signal.SIGINT)
    assert "SIGINT: stopped after checkpoint" in killed.stderr and "trainer.resume=auto" in killed.stderr
    assert "step-00000006" in killed.stderr.replace("\n", "")
    assert "Traceback" not in killed.stderr and "KeyboardInterrupt" not in killed.stderr
    assert (tmp_path / "out" / "runs").is_dir()


@pytest.mark.slow
def test_a_signal_during_the_last_evaluation_stops_before_what_follows_training(tmp_path, monkeypatch, references):
    """Sent while the last stage evaluates (in process): the loop checkpoints the end of training and stops
    (status interrupted, no row) instead of going on to the post-training evaluations; the resume redoes only
    those, and ends where the uninterrupted run ends."""
    from lowrank_bench.trainer import Trainer

    reference = references(LORA)
    monkeypatch.setenv("LRBENCH_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    evaluate = Trainer.evaluate

    def signalled(self, stage, logs):
        if self.history.train_steps == 16:
            os.kill(os.getpid(), signal.SIGTERM)  # our handler only sets a flag
        return evaluate(self, stage, logs)

    monkeypatch.setattr(Trainer, "evaluate", signalled)
    first = tmp_path / "out" / "runs" / "first"
    with pytest.raises(checkpoint.Interrupted) as stop:
        run(compose_cfg(*LORA), first)
    assert stop.value.signum == signal.SIGTERM and stop.value.path == first / "checkpoints" / "step-00000016"
    assert (first / "status").read_text() == "interrupted\n" and not (tmp_path / "runs.csv").exists()
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    (tmp_path / "launched").mkdir()
    resumed = run(compose_cfg(*LORA, "trainer.resume=auto"), tmp_path / "launched")
    assert resumed["run_dir"] == str(first) and (first / "status").read_text() == "finished\n"
    assert_same_run(first, reference)
    assert len(read_rows(tmp_path / "runs.csv")) == 1


def test_after_training_a_signal_stops_at_once_naming_the_end_checkpoint(tmp_path, request):
    """`Trainer.after_training()`, for the post-training evaluations: SIGTERM (or Ctrl-C) raises Interrupted at
    once, naming the checkpoint of training's end; the handlers before it are back afterwards."""
    from lowrank_bench.assembly import prepare
    from lowrank_bench.trainer import Trainer

    cfg = compose_cfg(*TINY, "trainer.max_steps=2")
    s = prepare(cfg)
    trainer = Trainer(cfg.trainer, s.model, s.method, tmp_path, cfg.seed,
                      store=checkpoint.Store(tmp_path, checkpoint.identity(cfg)))
    trainer.run(s.curriculum.plan(cfg, s.method, s.groups))
    # a background job (`pytest ... &`) starts with SIGINT ignored, which Signals rightly leaves so: Ctrl-C as in a
    # terminal for this test
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_sigint))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with pytest.raises(checkpoint.Interrupted) as stop:
            with trainer.after_training():
                os.kill(os.getpid(), sig)
                raise AssertionError("the signal did not stop at once")
        assert stop.value.signum == sig and stop.value.path == tmp_path / "checkpoints" / "step-00000002"
        assert {s_: signal.getsignal(s_) for s_ in before} == before
    with trainer.after_training():  # nothing else changes
        pass


def test_a_signal_during_the_post_training_evaluation_marks_the_run_interrupted(tmp_path, monkeypatch):
    """A SIGTERM while the post-training evaluation (eval=mc/...) runs: the run says `interrupted` (not `running`
    forever), writes no row, and `trainer.resume=auto` redoes only that evaluation."""
    from lowrank_bench import assembly

    class Evaluation:
        calls = 0

        def before(self, model, trainer_cfg):
            return {}

        def after(self, model, device, autocast):
            Evaluation.calls += 1
            if Evaluation.calls == 1:
                # (without a handler SIGTERM would end the test session: fail instead)
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), \
                    "no handler: a SIGTERM here kills the run and leaves status=running"
                os.kill(os.getpid(), signal.SIGTERM)
            return {"mc_accuracy": 0.25}

        def write(self, run_dir):
            pass

    monkeypatch.setattr(assembly.evaluations, "build", lambda *args, **kwargs: [Evaluation()])
    monkeypatch.setenv("LRBENCH_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    first = tmp_path / "out" / "runs" / "first"
    with pytest.raises(checkpoint.Interrupted):
        run(compose_cfg(*TINY, "trainer.max_steps=2"), first)
    assert (first / "status").read_text() == "interrupted\n" and not (tmp_path / "runs.csv").exists()
    (tmp_path / "launched").mkdir()
    resumed = run(compose_cfg(*TINY, "trainer.max_steps=2", "trainer.resume=auto"), tmp_path / "launched")
    assert resumed["run_dir"] == str(first) and resumed["mc_accuracy"] == 0.25 and Evaluation.calls == 2
    assert (first / "status").read_text() == "finished\n" and len(read_rows(tmp_path / "runs.csv")) == 1


def test_a_second_ctrl_c_stops_at_once_and_the_stop_exits_130_without_a_traceback():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with checkpoint.Signals() as signals:
            os.kill(os.getpid(), signal.SIGINT)  # the first: a flag, the loop checkpoints at the next step
            assert signals.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the second: at once
                raise AssertionError("the second Ctrl-C did not stop at once")
            stop = signals.interrupted(None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(SystemExit) as exit_:  # Python's own handler is not called: no KeyboardInterrupt
            stop.hand_over()
        assert exit_.value.code == 130
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started ignoring Ctrl-C (a background job): still ignored
        with checkpoint.Signals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# -- one row, refusals, auto ---------------------------------------------------------------------------------------
def test_a_run_killed_after_its_row_and_resumed_writes_no_second_row(tmp_path, monkeypatch):
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    overrides = [*TINY, "trainer.max_steps=3"]

    def killed(self):
        raise KeyboardInterrupt("killed between the row and the cleanup")

    monkeypatch.setattr(checkpoint.Store, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*overrides), tmp_path / "run")
    assert len(read_rows(tmp_path / "runs.csv")) == 1
    monkeypatch.undo()
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "runs.csv"))
    summary = run(compose_cfg(*overrides, f"trainer.resume={tmp_path / 'run'}"), tmp_path / "again")
    assert summary["run_dir"] == str(tmp_path / "run") and len(read_rows(tmp_path / "runs.csv")) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_of_another_config_is_refused_with_the_keys_that_differ(tmp_path):
    overrides = [*TINY, "trainer.max_steps=2", "trainer.keep_checkpoint=true"]
    run(compose_cfg(*overrides), tmp_path / "run")
    with pytest.raises(LrbenchError) as refused:
        run(compose_cfg(*overrides, "trainer.max_steps=3", "optimizer.lr=1e-3",
                        f"trainer.resume={tmp_path / 'run'}"), tmp_path / "other")
    assert "2 key(s) differ (checkpoint -> this run): optimizer.lr: 0.002 -> 0.001; trainer.max_steps: 2 -> 3" \
        in str(refused.value)
    assert not (tmp_path / "other").exists()
    with pytest.raises(LrbenchError, match="that run finished"):  # kept, marked finished
        run(compose_cfg(*overrides, f"trainer.resume={tmp_path / 'run'}"), tmp_path / "other")
    with pytest.raises(LrbenchError, match="no checkpoint there"):
        run(compose_cfg(*overrides, f"trainer.resume={tmp_path / 'nothing'}"), tmp_path / "other")


def test_the_cli_refuses_another_configs_checkpoint_with_exit_code_2(tmp_path):
    from tests.test_cli import lrbench

    run(compose_cfg(*TINY, "trainer.max_steps=2", "trainer.keep_checkpoint=true"), tmp_path / "run")
    refused = lrbench(*TINY, "trainer.max_steps=2", "seed=1", f"trainer.resume={tmp_path / 'run'}",
                      env={"LRBENCH_OUTPUT_DIR": str(tmp_path / "out"), "LRBENCH_RESULTS_CSV": str(tmp_path / "r.csv")})
    assert refused.returncode == 2 and "seed: 0 -> 1" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "r.csv").exists()


def test_auto_picks_the_latest_unfinished_checkpoint_of_the_same_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LRBENCH_OUTPUT_DIR", str(tmp_path / "out"))
    overrides = [*TINY, "trainer.max_steps=2"]
    cfg = compose_cfg(*overrides)
    assert checkpoint.find(compose_cfg(*overrides, "trainer.resume=auto"), tmp_path / "x") is None
    fp = checkpoint.fingerprint(checkpoint.identity(cfg))
    for name, print_, finished, at in [("old", fp, False, 1.0), ("new", fp, False, 2.0), ("done", fp, True, 3.0),
                                       ("other", "0" * 16, False, 4.0)]:
        folder = tmp_path / "out" / "runs" / name / "checkpoints"
        (folder / "step-00000001").mkdir(parents=True)
        (folder / "step-00000001" / "meta.json").write_text(json.dumps({"fingerprint": print_, "position": {
            "stage": 0, "step": 1, "stage_name": "train"}, "global_step": 1, "format": checkpoint.FORMAT}))
        (folder / "latest").write_text(json.dumps({"checkpoint": "step-00000001", "fingerprint": print_,
                                                   "finished": finished, "written_at": at}))
    found = checkpoint.find(compose_cfg(*overrides, "trainer.resume=auto"), tmp_path / "x")
    assert found.run_dir == tmp_path / "out" / "runs" / "new"
    # without trainer.resume, only a checkpoint in the run's own folder is continued (a requeued job)
    assert checkpoint.find(cfg, tmp_path / "x") is None
    assert checkpoint.find(cfg, tmp_path / "out" / "runs" / "old").run_dir == tmp_path / "out" / "runs" / "old"
    assert checkpoint.find(cfg, tmp_path / "out" / "runs" / "other") is None


def test_checkpoint_files_hold_no_pickle_but_the_optimiser_state(tmp_path, monkeypatch):
    copies = tmp_path / "copies"
    write = checkpoint.Store.write

    def keep_a_copy(self, name, meta, tensors, optimizers):
        path = write(self, name, meta, tensors, optimizers)
        shutil.copytree(path, copies / name)
        return path

    monkeypatch.setattr(checkpoint.Store, "write", keep_a_copy)
    run(compose_cfg(*TINY, "method=bidora", "trainer.max_steps=3", "trainer.checkpoint_every=2"), tmp_path / "run")
    assert sorted(p.name for p in copies.iterdir()) == ["step-00000002", "step-00000003"]
    middle, end = copies / "step-00000002", copies / "step-00000003"
    assert sorted(p.name for p in middle.iterdir()) == ["meta.json", "optimizer.pt", "tensors.safetensors"]
    meta = json.loads((middle / "meta.json").read_text())
    assert meta["position"] == {"stage": 0, "step": 2, "stage_name": "search"}
    assert json.loads((end / "meta.json").read_text())["position"] == {"stage": 1, "step": 0, "stage_name": "end"}
    states = torch.load(middle / "optimizer.pt", weights_only=True)  # the one pickle, read without code
    assert set(states) == {"lower", "upper"} and states["upper"]["state"]
    tensors = load_file(str(middle / "tensors.safetensors"))
    assert {"generator", "rng/0/torch", "rule/lower/order", "rule/upper/order"} <= set(tensors)
    assert any(k.startswith("param/") and k.endswith("magnitude") for k in tensors)
    assert meta["rule"]["counts"] == {"lower_steps": 2, "upper_steps": 2}


def test_checkpoint_every_null_writes_no_checkpoint_and_leaves_signals_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    summary = run(compose_cfg(*TINY, "trainer.max_steps=2", "trainer.checkpoint_every=null",
                              "trainer.keep_checkpoint=true"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and "checkpoints" not in summary
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_signal_handler_only_sets_a_flag_and_hands_the_previous_handler_on(monkeypatch):
    """A handler can interrupt the main thread inside the first import of a module; if it printed, rich's lazy
    emoji-table import would meet that half-executed module (a sweep job once failed so). It must do no I/O."""
    def no_io(*args, **kwargs):
        raise AssertionError("the signal handler printed")

    monkeypatch.setattr(checkpoint.console, "print", no_io)
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with checkpoint.Signals() as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert signals.received == signal.SIGUSR1 and not seen
            stop = signals.interrupted(None)
        with pytest.raises(SystemExit) as exit_:
            stop.hand_over()
        assert seen == [signal.SIGUSR1] and exit_.value.code == 128 + signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, before)
