"""Cluster sweeps with hydra-submitit-launcher: the SLURM preset renders the sbatch script we mean (no cluster
needed), and a `submitit_local` sweep of 3 jobs lands exactly 3 rows while one job, sent SIGUSR1 mid-run,
checkpoints, is requeued by submitit and continues its checkpoint in its own folder, bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lowrank_bench.results import read_rows
from tests.conftest import CONF, ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_slurm_preset_renders_a_requeueable_one_gpu_job(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setenv("LRBENCH_SLURM_PARTITION", "gpu")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.timeout_min=600"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # what SlurmLauncher.launch hands to submitit (which only checks that an `srun` exists)
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path,
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params.pop("submitit_folder")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@180", "#SBATCH --cpus-per-task=8",
                 "export TOKENIZERS_PARALLELISM=false"):
        assert line in script, line


def process_writing(path: Path) -> int | None:
    """The pid of the process that holds `path` open (a Hydra job keeps its log file open)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == str(path):
                    return int(proc.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_submitit_local_sweep_lands_three_rows_and_a_signalled_job_is_requeued_and_resumes(tmp_path):
    """Jobs 0 and 1 have the same config: job 1 is signalled mid-run, so its metrics must equal job 0's."""
    csv_path = tmp_path / "runs.csv"
    env = {**os.environ, "LRBENCH_OUTPUT_DIR": str(tmp_path), "LRBENCH_RESULTS_CSV": str(csv_path),
           "SUBMITIT_PREEMPT_SIGNAL": "USR1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lowrank_bench.train", "-m", "hydra/launcher=submitit_local", "seed=0,0,1",
               "model=tiny-roberta", "task.max_train_samples=200", "task.max_eval_samples=64", "trainer.max_steps=40",
               "trainer.eval_every=10", "trainer.checkpoint_every=5", "trainer.progress=false"]
    sweep = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        signalled = None
        deadline = time.time() + 600
        while signalled is None and time.time() < deadline and sweep.poll() is None:
            for latest in tmp_path.glob("multirun/*/1_*/checkpoints/latest"):
                entry = json.loads(latest.read_text())
                pid = process_writing(latest.parent.parent / "train.log")
                if pid and int(entry["checkpoint"].split("-")[1]) < 30:
                    os.kill(pid, signal.SIGUSR1)
                    signalled = (pid, entry["checkpoint"])
            time.sleep(0.1)
        output, _ = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert signalled, "job 1 finished before it could be signalled"
    assert sweep.returncode == 0, output[-3000:]
    rows = read_rows(csv_path)
    assert sorted(r["seed"] for r in rows) == ["0", "0", "1"]  # 3 jobs, 3 rows: the requeued job wrote one
    (sweep_dir,) = list(tmp_path.glob("multirun/*"))
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs and "SIGUSR1" in logs  # submitit checkpointed and requeued it ...
    jobs = [next(sweep_dir.glob(f"{i}_*")) for i in range(3)]  # job folders: <number>_<what it varies>
    job0, job1 = ((job / "metrics.jsonl").read_text() for job in jobs[:2])
    assert job1 == job0  # ... and it continued where it stopped, bit for bit, in its own folder
    assert {r["run_dir"] for r in rows} == {str(job) for job in jobs}
