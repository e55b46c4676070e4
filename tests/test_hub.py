"""The Hub's one home: the fast offline failure for models and datasets, and a cached copy loading without it."""
from __future__ import annotations

import time

import pytest

from lowrank_bench import hub
from lowrank_bench.errors import LrbenchError


def test_unreachable_hub_without_cache_fails_fast_and_says_what_to_do():
    start = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)'org/absent' is not in the local Hugging Face cache.*model.path="):
        hub.pretrained_kwargs("org/absent", "model.path")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_with_cache_loads_locally(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert hub.pretrained_kwargs("org/cached", "model.path") == {"local_files_only": True}


def test_unreachable_hub_dataset_fails_fast_naming_the_setting_and_the_local_layout():
    start = time.perf_counter()
    with pytest.raises(LrbenchError, match=r"(?s)Dataset 'org/absent/sub' is not in the local Hugging Face cache.*"
                                           r"`eval.data_dir=/path/to/folder`[^\n]*\. A folder of <subject>.csv files\.$"):
        hub.load_dataset("org/absent", "sub", split="train", shown="org/absent/sub", override="eval.data_dir",
                         local_copy="A folder of <subject>.csv files.")
    assert time.perf_counter() - start < 10


def test_reachable_hub_streams_only_the_first_rows_when_asked(monkeypatch):
    import datasets

    calls = []

    class Stream:
        def take(self, n):
            return iter(range(n))

    monkeypatch.setattr(hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or Stream())
    assert hub.load_dataset(path="org/big", split="train", first=3, shown="org/big") == [0, 1, 2]
    assert calls == [((), {"path": "org/big", "split": "train", "streaming": True})]
