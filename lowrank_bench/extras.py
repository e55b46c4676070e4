"""The optional parts of lowrank_bench (pyproject.toml's extras): importing one that is missing is one line naming
the extra that installs it, never a traceback from deep in a run."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lowrank_bench.errors import LrbenchError

SUBMITIT_PLUGIN = "hydra_plugins.hydra_submitit_launcher"  # hydra/launcher=slurm, submitit_local, submitit_slurm


def install_hint(extra: str) -> str:
    return f"pip install 'lowrank_bench[{extra}]'"


def require(module: str, extra: str, needed_by: str, instead: str = "") -> ModuleType:
    """`import module`, or an LrbenchError: "<needed_by> needs <missing module>, which is not installed: pip
    install 'lowrank_bench[<extra>]'" (the missing module may be one of its own requirements), then `instead`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or module).partition(".")[0]  # the distribution's package, not a submodule of it
        raise LrbenchError(f"{needed_by} needs {missing}, which is not installed: "
                           f"{install_hint(extra)}{instead}") from None


def check_installed(module: str, extra: str, needed_by: str) -> None:
    """The same refusal as `require`, before any work and without importing the module (wandb takes seconds)."""
    if importlib.util.find_spec(module) is None:
        raise LrbenchError(f"{needed_by} needs {module}, which is not installed: {install_hint(extra)}")


def launcher_hint(message: str) -> str:
    """What to add to Hydra's "Could not load 'hydra/launcher/submitit_slurm'" when the plugin is what is missing
    (hydra/launcher=slurm, submitit_local, submitit_slurm): the extra that installs it; else nothing."""
    if "hydra/launcher/submitit" not in message or importlib.util.find_spec(SUBMITIT_PLUGIN) is not None:
        return ""
    return f" (hydra-submitit-launcher is not installed: {install_hint('slurm')})"

