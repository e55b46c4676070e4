"""Tracking with wandb (`logger=wandb`): the settings from the command line, then WANDB_*, then the YAML; one real
offline run of a tiny continual sequence, read back from its `.wandb` file (protobuf records keep their strings as
plain bytes): its project, its group (the config hash), the continual keys and the adapter artifact;
WANDB_MODE=disabled writes nothing."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from lowrank_bench import results, train
from lowrank_bench.errors import LrbenchError
from tests.conftest import CONF, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["logger=wandb", "task=continual/toy", "model=tiny-roberta", "trainer.max_steps=2", "trainer.progress=false",
        "trainer.eval_batch_size=64", "task.every_stage.max_eval_samples=16",
        "task.every_stage.max_train_samples=16"]
WANDB_VARIABLES = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_NAME",
                   "WANDB_TAGS")


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No WANDB_* from the session (conftest sets WANDB_MODE and WANDB_DIR); wandb's caches in tmp_path."""
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return monkeypatch


@pytest.fixture
def init_calls(monkeypatch):
    """wandb.init's keyword arguments, call by call (the real wandb.init still runs)."""
    import wandb

    calls, real = [], wandb.init

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    return calls


def test_yaml_defaults_then_the_environment_then_the_command_line(wandb_env):
    lc = compose_cfg("logger=wandb").logger
    assert (lc.project, lc.entity, lc.mode, lc.dir, lc.group, lc.run_name) == \
        ("lowrank_bench", None, "offline", None, None, None)
    wandb_env.setenv("WANDB_PROJECT", "from-env")
    wandb_env.setenv("WANDB_MODE", "disabled")
    wandb_env.setenv("WANDB_RUN_GROUP", "g-env")
    wandb_env.setenv("WANDB_TAGS", "b, c,,a")
    lc = compose_cfg("logger=wandb", "logger.tags=[a]").logger
    assert (lc.project, lc.mode, lc.group) == ("from-env", "disabled", "g-env")
    assert results.wandb_tags(lc) == ["a", "b", "c"]
    lc = compose_cfg("logger=wandb", "logger.project=from-cli", "logger.mode=offline").logger
    assert (lc.project, lc.mode, lc.group) == ("from-cli", "offline", "g-env")


def test_the_logger_alone_writes_an_offline_run_with_project_group_and_adapter(wandb_env, init_calls, tmp_path):
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    wandb_env.setenv("WANDB_PROJECT", "lrbench-unit-project")
    cfg = compose_cfg("logger=wandb", "model=tiny-roberta", "logger.tags=[unit]")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter.safetensors").write_bytes(b"not really weights")
    logger = results.make_logger(cfg, tmp_path / "run")
    logger({"step": 1, "accuracy": 0.625, "confusion": [[1, 0], [0, 1]]}, step=1)
    logger.finish({"method": "lora", "seed": 0, "best_accuracy": 0.625})
    (kwargs,) = init_calls
    assert (kwargs["project"], kwargs["group"], kwargs["tags"]) == \
        ("lrbench-unit-project", results.config_hash(cfg), ["unit"])
    (log,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    content = log.read_bytes()
    for expected in ("lrbench-unit-project", kwargs["group"], f"adapter-{log.stem.removeprefix('run-')}",
                     "adapter.safetensors", "best_accuracy"):
        assert expected.encode() in content, expected


@pytest.mark.slow
def test_an_offline_run_lands_in_wandb_dir_grouped_by_config_hash_with_its_adapter(wandb_env, init_calls, tmp_path):
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    wandb_env.setenv("WANDB_PROJECT", "lrbench-test-project")
    cfg = compose_cfg(*TINY, "seed=3")
    summary = train.run(cfg, tmp_path / "run")
    (kwargs,) = init_calls
    assert kwargs["project"] == "lrbench-test-project" and kwargs["mode"] == "offline"
    assert kwargs["group"] == results.config_hash(cfg) == results.config_hash(compose_cfg(*TINY, "seed=4"))
    assert kwargs["name"] == "lora-continual/toy-tiny-roberta-s3"  # outside a Hydra job: no overrides to name it
    (log,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    assert not list((tmp_path / "run").rglob("*.wandb"))  # WANDB_DIR, not the run folder
    content = log.read_bytes()
    run_id = log.stem.removeprefix("run-")
    for expected in ("lrbench-test-project", kwargs["group"], f"adapter-{run_id}", "adapter.safetensors",
                     "continual/accuracy/first", "continual/accuracy/second", "backward_transfer"):
        assert expected.encode() in content, expected
    assert summary["status"] == "finished"


def test_a_continual_runs_re_evaluations_and_perplexities_get_keys_of_their_own():
    after = {"after_stage": "second", "stage_index": 1, "task": "first", "accuracy": 0.75, "confusion": [[1, 0]]}
    assert results.loggable(after) == {"continual/accuracy/first": 0.75}
    perplexity = {"perplexity_after": "after second", "perplexity": 31.5, "nll": 3.45, "tokens": 200}
    assert results.loggable(perplexity) == {"continual/perplexity": 31.5, "continual/nll": 3.45,
                                            "continual/tokens": 200}
    evaluation = {"step": 4, "stage": "train", "accuracy": 0.5, "confusion": [[1, 0]], "hypotheses_file": "x"}
    assert results.loggable(evaluation) == {"step": 4, "accuracy": 0.5}


def test_disabled_writes_nothing_and_never_starts_wandb(wandb_env, init_calls, tmp_path):
    wandb_env.setenv("WANDB_MODE", "disabled")
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    cfg = compose_cfg(*TINY, "save_adapter=false")
    assert results.make_logger(cfg, tmp_path / "run") is None
    assert init_calls == [] and not (tmp_path / "wandb").exists()


def test_a_mode_wandb_does_not_know_is_one_line(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_MODE", "onlien")
    with pytest.raises(LrbenchError, match=r"logger.mode=onlien \(or WANDB_MODE\): choose online, offline, disabled"):
        results.make_logger(compose_cfg("logger=wandb"), tmp_path)


def hydra_job(overrides: list[str], override_dirname: str, num: int, mode: RunMode):
    """The config with its `hydra` node, as HydraConfig holds it inside a job."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(full):
        full.hydra.job.override_dirname, full.hydra.job.num, full.hydra.mode = override_dirname, num, mode
    return full


@pytest.mark.parametrize("mode, expected", [(RunMode.RUN, "method=dora,seed=1"),
                                            (RunMode.MULTIRUN, "3_method=dora,seed=1")])
def test_a_sweep_job_is_named_like_its_folder_a_single_run_by_its_overrides(mode, expected):
    overrides = ["logger=wandb", "method=dora", "seed=1"]
    HydraConfig.instance().set_config(hydra_job(overrides, "method=dora,seed=1", 3, mode))
    try:
        assert results.run_name(compose_cfg(*overrides)) == expected
    finally:
        HydraConfig.instance().cfg = None
