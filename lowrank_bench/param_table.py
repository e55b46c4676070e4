"""Trainable parameters of each method on the papers' models, exactly, without weights: the model is built from its
published architecture (`architecture:` in conf/model/<name>.yaml) on the meta device, the method applied as a run
applies it, and its tensors counted; beside them the counts the papers print (results/paper_params.csv).

    python -m lowrank_bench.param_table [--paper results/paper_params.csv]

The papers leave the task head out of their #Params, so the comparison is on the adapter's count; the head (a
sequence classifier's, two labels) is shown apart. A decoder is counted as a causal LM: no head to train.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lowrank_bench import methods, models
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import Head

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PAPER_PARAMS = Path(__file__).resolve().parent.parent / "results" / "paper_params.csv"


def compose(model: str, method: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"model={model}", f"method={method}", *overrides])


def meta_model(model_cfg: DictConfig, head: Head) -> torch.nn.Module:
    """The architecture with `head`, every tensor on the meta device (shapes only: no memory, no download)."""
    from transformers import AutoConfig

    if not model_cfg.get("architecture"):
        raise LrbenchError(f"model={model_cfg.name} has no `architecture:` in conf/model/{model_cfg.name}.yaml, so "
                           f"its parameters cannot be counted without its weights")
    params = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    config = AutoConfig.for_model(params.pop("model_type"), **params, **models.head_kwargs(head))
    with torch.device("meta"):
        return models.auto_class(head).from_config(config)


def count(model: str, method: str, overrides: list[str] = ()) -> dict[str, int]:
    """{adapter, head, total}: what `method` (with `overrides`) trains on `model`, head apart."""
    cfg = compose(model, method, list(overrides))
    head = Head("causal_lm") if models.is_decoder(cfg.model) else Head("sequence_classification", 2)
    network = meta_model(cfg.model, head)
    heads = [n for n in models.head_kind(head).modules if hasattr(network, n)]
    groups = methods.build(cfg.method).apply(network, heads, models.target_sets(cfg.model))
    trainable, total = models.count_parameters(network)
    head_params = sum(p.numel() for p in groups.get("head", []))
    return {"adapter": trainable - head_params, "head": head_params, "total": total}


def read_paper_params(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["paper"] and not row["paper"].startswith("#")]


def matches(ours: int, row: dict) -> bool:
    """Equal, or equal at the paper's printed precision (`0.17M` is any count that rounds to 0.17 million)."""
    unit = float(row["unit"] or 1)
    return round(ours / unit, int(row["decimals"] or 0)) == float(row["params"])


def comparison(rows: list[dict]) -> tuple[Table, list[dict]]:
    table = Table(title="Trainable parameters without the head: ours (meta device) and the papers'")
    for column in ("paper", "model", "method", "settings", "ours", "paper's", "", "head (apart)"):
        table.add_column(column, justify="right" if column in ("ours", "paper's", "head (apart)") else "left")
    checked = []
    for row in rows:
        settings = row["overrides"].split()
        ours = count(row["model"], row["method"], settings)
        same = matches(ours["adapter"], row)
        checked.append({**row, "ours": ours["adapter"], "match": same})
        shown = f"{row['params']}{row['suffix']}"
        gap = "" if same or row["unit"] else f" ({float(row['params']) - ours['adapter']:+,.0f})"
        table.add_row(row["paper"], row["model"], row["method"], " ".join(settings), f"{ours['adapter']:,}", shown,
                      "[green]=" if same else f"[red]≠{gap}", f"{ours['head']:,}")
    return table, checked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", type=Path, default=PAPER_PARAMS, help="the papers' counts (CSV)")
    args = parser.parse_args(argv)
    table, checked = comparison(read_paper_params(args.paper))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    mismatches = [r for r in checked if not r["match"]]
    console.print(f"{len(checked) - len(mismatches)} of {len(checked)} counts match the papers'.")
    for reason in dict.fromkeys(r["reason"] or "no reason recorded" for r in mismatches):
        console.print(f"≠ {', '.join(r['method'] + ' ' + r['overrides'] for r in mismatches if r['reason'] == reason)}: "
                      f"{reason}")


if __name__ == "__main__":
    main()
