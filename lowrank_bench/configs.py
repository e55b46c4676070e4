"""Where the configs live, and one group's config composed by Hydra on its own (a sequence's stage tasks: their
defaults lists apply, as they do for `task=...` on the command line)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
TASK_CONF = Path(CONF_DIR) / "task"


def available_tasks() -> list[str]:
    """Every single task config (`task=<name>`), sequences left out."""
    return sorted(p.relative_to(TASK_CONF).with_suffix("").as_posix() for p in TASK_CONF.rglob("*.yaml")
                  if p.parent.name != "continual" and not p.name.startswith("_"))


def task_config(name: str) -> DictConfig:
    """conf/task/<name>.yaml as `task=<name>` composes it, detached from the root (plain, not struct)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra job (or a test's compose): its search path
        composed = compose(config_name="config", overrides=[f"task={name}"])
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose(config_name="config", overrides=[f"task={name}"])
    return OmegaConf.create(OmegaConf.to_container(composed.task, resolve=False))
