"""The Hugging Face Hub in one place: is it reachable, offline mode for one call, and the fast offline failure.

Every model, tokenizer and dataset this package takes from the Hub comes through here. When the Hub cannot be
reached (no network, `HF_HUB_OFFLINE=1`), a copy in the local HF cache still loads, without the client's 20-50 s of
retries; anything else fails within seconds with a message that says how to point at local files (for a dataset:
LRBENCH_DATA_DIR, lrbench-data, the task's data_dir; for a model: model.path or an offline model).
"""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager

from lowrank_bench.errors import LrbenchError

PROBE_TIMEOUT_S = 3.0


def host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return endpoint.split("://", 1)[-1].split("/", 1)[0]


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the Hub host, run in a thread so that a hanging DNS lookup cannot block us either."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    result = []

    def probe():
        try:
            socket.create_connection((host(), 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextmanager
def offline():
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
    """One line (a refusal is one line): a Hub model that is missing, the setting that points at local files instead,
    and the offline models (this one, from the Hub, is none of them)."""
    return (
        f"{what} '{name}' is not in the local Hugging Face cache and the Hub ({host()}) cannot be reached; "
        f"point at local files instead, e.g. `{override}=/path/to/folder`, "
        "or use an offline model such as `model=minilm-l6` or `model=tiny-roberta`"
    )


def dataset_message(name: str, override: str, local_copy: str = "") -> str:
    """One line: a Hub dataset that is missing, and how to read local files instead (the shared data folder, how to
    fill it, the setting for one folder); `local_copy` says what such a copy holds. The model is not the problem."""
    shared = os.environ.get("LRBENCH_DATA_DIR")
    folder = f"add it to LRBENCH_DATA_DIR={shared}" if shared else "set LRBENCH_DATA_DIR=<folder>"
    return (
        f"Dataset '{name}' is not in the local Hugging Face cache and the Hub ({host()}) cannot be reached; read "
        f"local files instead: {folder} with the layout of docs/data.md (`lrbench-data get <name>` writes it on a "
        f"machine that reaches the Hub; `lrbench-data list` names them), or `{override}=/path/to/folder`"
        + (f". {local_copy}" if local_copy else "")
    )


def pretrained_kwargs(name: str, override: str, what: str = "Model") -> dict:
    """`from_pretrained` kwargs for a Hub name: none when the Hub answers; `local_files_only` when it does not but
    the files are in the local HF cache (never the client's retries); otherwise a helpful error, fast."""
    from huggingface_hub import try_to_load_from_cache

    if reachable():
        return {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise LrbenchError(offline_message(what, name, override))


def load_dataset(*args, shown: str, override: str = "task.data_dir", local_copy: str = "", first: int | None = None,
                 **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`, or the fast offline failure naming the dataset as `shown`, the
    setting `override` that points at local files and what such a local copy holds (`local_copy`). With `first`,
    only the first rows, streamed, as a list, when the Hub answers (a cached copy loads whole)."""
    import datasets

    if reachable():
        if first:
            return list(datasets.load_dataset(*args, **kwargs, streaming=True).take(first))
        return datasets.load_dataset(*args, **kwargs)
    with offline():  # a copy in the local HF cache still loads, without the client's retries
        try:
            return datasets.load_dataset(*args, **kwargs)
        except Exception:
            raise LrbenchError(dataset_message(shown, override, local_copy)) from None
