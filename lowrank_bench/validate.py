"""The settings every run shares, checked before any work starts: one line naming the key, the value and what is
valid. The groups' own options (a method's strategy, a task's files) are checked by their modules, also before
training; this covers the numbers and choices that any run has.

A rule is (key, kind, test, what is valid). `kind` is the type the value must have after Hydra's parsing: an
integer where a count is meant (`trainer.batch_size=8.5` or `=abc` is refused, not truncated or crashed on later).
`key=null` is refused too, except where null means something (NULL_MEANS: each config's comment says what); a key
a config does not have is skipped (`method.r` of `ft`). Removing a key (`~trainer.batch_size`) is refused on the
command line (configs.CommandLine), with the words of its rule (valid_text).
"""
from __future__ import annotations

import math
import re

from omegaconf import DictConfig, OmegaConf

from lowrank_bench.errors import LrbenchError
from lowrank_bench.extras import check_installed

NUMBER, INTEGER, CHOICE, FLAG = "a number", "an integer", "one of", "true or false"
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def positive(value) -> bool:
    return value > 0


def non_negative(value) -> bool:
    return value >= 0


def fraction(value) -> bool:
    return 0 <= value < 1


RULES: list[tuple[str, str, object, str]] = [
    ("seed", INTEGER, non_negative, "an integer >= 0"),
    ("trainer.epochs", NUMBER, positive, "> 0 (null only with trainer.max_steps)"),
    ("trainer.max_steps", INTEGER, positive, "> 0, or null for trainer.epochs"),
    ("trainer.batch_size", INTEGER, positive, "an integer > 0"),
    ("trainer.eval_batch_size", INTEGER, positive, "an integer > 0"),
    ("trainer.grad_accum", INTEGER, positive, "an integer > 0"),
    ("trainer.eval_every", INTEGER, positive, "an integer > 0, or null for once at the end"),
    ("trainer.log_every", INTEGER, positive, "an integer > 0"),
    ("trainer.max_grad_norm", NUMBER, positive, "> 0, or null for no clipping"),
    ("trainer.checkpoint_every", INTEGER, non_negative, "an integer >= 0 (0: stage ends only), or null for never"),
    ("trainer.precision", CHOICE, ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    ("trainer.progress", FLAG, None, "true or false"),
    ("trainer.deterministic", FLAG, None, "true or false"),
    ("method.lr", NUMBER, positive, "> 0"),  # (optimizer.lr's default: ${oc.select:method.lr,5e-4})
    ("optimizer.lr", NUMBER, positive, "> 0"),
    ("optimizer.weight_decay", NUMBER, non_negative, ">= 0"),
    ("optimizer.eps", NUMBER, positive, "> 0"),
    ("optimizer.eps_on", CHOICE, ("v_hat", "v"), "v_hat (torch's AdamW) or v (transformers' old AdamW)"),  # optim
    ("optimizer.warmup_ratio", NUMBER, fraction, "0 <= warmup_ratio < 1 (null only with optimizer.warmup_steps)"),
    ("optimizer.warmup_steps", INTEGER, non_negative, "an integer >= 0, or null for warmup_ratio"),
    ("optimizer.schedule", CHOICE, ("linear", "cosine", "constant"), "linear, cosine or constant"),
    ("method.r", INTEGER, positive, "an integer > 0"),
    ("method.alpha", NUMBER, positive, "> 0"),
    ("method.dropout", NUMBER, fraction, "0 <= dropout < 1"),
    ("model.max_length", INTEGER, positive, "an integer > 0"),
    ("task.max_length", INTEGER, positive, "an integer > 0, or null for model.max_length"),
    ("task.max_train_samples", INTEGER, positive, "an integer > 0, or null for all"),
    ("task.max_eval_samples", INTEGER, positive, "an integer > 0, or null for all"),
    ("task.source", CHOICE, ("auto", "local", "hub"), "auto, local or hub"),  # tasks.base.SOURCES
]

#: the settings whose null means something: always (None), or once the named other setting is given
NULL_MEANS: dict[str, str | None] = {
    "trainer.max_steps": None, "trainer.eval_every": None, "trainer.max_grad_norm": None,
    "trainer.checkpoint_every": None, "optimizer.warmup_steps": None, "task.max_length": None,
    "task.max_train_samples": None, "task.max_eval_samples": None,
    "trainer.epochs": "trainer.max_steps", "optimizer.warmup_ratio": "optimizer.warmup_steps",
}
_ABSENT = object()


def valid_text(key: str) -> str | None:
    """What a rule's setting must be (`an integer > 0`), or None for a key without a rule."""
    return next((f"one of {valid}" if kind == CHOICE else valid for k, kind, _, valid in RULES if k == key), None)


def has_kind(value, kind: str) -> bool:
    if kind == FLAG:
        return isinstance(value, bool)
    if kind == CHOICE:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind == NUMBER and math.isfinite(value) or kind == INTEGER and isinstance(value, int)


def check(cfg: DictConfig) -> None:
    """Raise LrbenchError on the first setting out of its range (keys a config does not have are skipped)."""
    check_values(cfg)
    device = OmegaConf.select(cfg, "trainer.device", default="auto")
    device = "null" if device is None else str(device)
    if not DEVICE.match(device):
        raise LrbenchError(f"trainer.device={device}: must be auto, cpu, cuda, cuda:N or mps")
    if cfg.model.get("path") and cfg.model.get("source") == "config":
        raise LrbenchError(f"model.path={cfg.model.path} does not apply to model={cfg.model.name}, which is built "
                           f"from its config (source: config); choose a model with source hub or path")
    if OmegaConf.select(cfg, "logger.name", default=None) == "wandb" \
            and OmegaConf.select(cfg, "logger.mode", default=None) != "disabled":
        check_installed("wandb", "wandb", "logger=wandb")


def check_values(cfg: DictConfig, named=lambda key: key) -> None:
    """The RULES on whichever of their keys `cfg` has; `named(key)` is the setting the message names (a sequence's
    stage settings are flat: `lr`, not `optimizer.lr`)."""
    for key, kind, test, valid in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        name = named(key)
        if value is None:
            if key in NULL_MEANS and (NULL_MEANS[key] is None
                                      or OmegaConf.select(cfg, NULL_MEANS[key], default=None) is not None):
                continue
            raise LrbenchError(f"{name}=null: must be {'one of ' + valid if kind == CHOICE else valid}")
        if not has_kind(value, kind):
            raise LrbenchError(f"{name}={value!r}: must be {kind if kind != CHOICE else 'one of ' + valid}")
        if kind == CHOICE and value not in test or kind in (NUMBER, INTEGER) and not test(value):
            raise LrbenchError(f"{name}={value}: must be {valid}")
