"""Method registry: `method.name` in the config -> the class that implements it (one module per method)."""
from __future__ import annotations

import importlib

from lowrank_bench.errors import LrbenchError, choices
from lowrank_bench.methods.base import Method

REGISTRY = {
    "ft": "lowrank_bench.methods.ft:FullFineTuning",
    "lora": "lowrank_bench.methods.lora:LoRA",
    "dora": "lowrank_bench.methods.dora:DoRA",
    "bidora": "lowrank_bench.methods.bidora:BiDoRA",
    "bilora": "lowrank_bench.methods.bilora:BiLoRA",
    "lotr": "lowrank_bench.methods.lotr:LoTR",
    "cola": "lowrank_bench.methods.cola:CoLA",
    "curlora": "lowrank_bench.methods.curlora:CURLoRA",
    "peft/*": "lowrank_bench.methods.peft_baseline:PeftBaseline",  # any PEFT tuner: lowrank_bench/conf/method/peft/<name>.yaml
}


def build(cfg) -> Method:
    name = cfg.get("name")
    if isinstance(name, str) and name.startswith("peft/"):
        name = "peft/*"
    if name not in REGISTRY:
        raise LrbenchError(f"unknown method {name!r}; valid methods: {choices(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
