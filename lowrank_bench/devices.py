"""The device a run computes on and the autocast its precision asks for."""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch

from lowrank_bench import distributed
from lowrank_bench.errors import LrbenchError


def pick_device(name: str, dp: distributed.DataParallel = distributed.SINGLE) -> torch.device:
    if dp.active and name != "cpu":  # one device per process: the launcher's local rank picks it
        return torch.device(dp.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LrbenchError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default (fp16 where bf16 is unsupported); plain fp32 on the CPU."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise LrbenchError(f"trainer.precision={precision!r}; valid: auto, bf16, fp16, fp32")
    if precision == "fp32":
        return precision, nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, partial(torch.autocast, device_type=device.type, dtype=dtype)
