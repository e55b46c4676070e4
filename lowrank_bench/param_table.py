"""Trainable parameters of each method on the papers' models, exactly, without weights: the model is built from its
published architecture (`architecture:` in lowrank_bench/conf/model/<name>.yaml) on the meta device, the method applied as a run
applies it, and its tensors counted; beside them the counts the papers print (results/paper_params.csv).

    python -m lowrank_bench.param_table [--paper results/paper_params.csv]

Every #Params cell the papers print is a row of results/paper_params.csv, with what it counts (`counted`: adapter =
the trainable tensors without the task head, as the papers' PEFT rows; trainable = every trainable tensor, head
included, as a full fine-tuning row or a script's printout; total = every tensor), the recorded verdict (`status`:
match | mismatch | not counted) and the reason of every mismatch and of every cell that cannot be counted here
(no such model or method). The head (a sequence classifier's, two labels) is shown apart. A decoder is counted as a
causal LM: no head to train. Nothing is hidden: every row is printed, every mismatch with its reason, and a verdict
that differs from the recorded one (a count that changed, a mismatch recorded as a match, a mismatch without a
reason) is an error: the command exits 1.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowrank_bench import methods, models
from lowrank_bench.errors import LrbenchError
from lowrank_bench.models import Head

CONF_DIR = Path(__file__).resolve().parent / "conf"
PAPER_PARAMS = Path(__file__).resolve().parent / "reference" / "paper_params.csv"  # results/ links to it


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
        raise LrbenchError(f"model={model_cfg.name} has no `architecture:` in lowrank_bench/conf/model/{model_cfg.name}.yaml, so "
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


STATUSES = ("match", "mismatch", "not counted")
COUNTED = ("adapter", "trainable", "total")


def ours_for(counts: dict[str, int], counted: str) -> int:
    """The count the paper's cell is compared with: the adapter alone, everything trainable (head included), or the
    whole model."""
    if counted not in COUNTED:
        raise LrbenchError(f"counted={counted!r} in {PAPER_PARAMS.name}: choose one of {', '.join(COUNTED)}")
    return {"adapter": counts["adapter"], "trainable": counts["adapter"] + counts["head"],
            "total": counts["total"]}[counted]


def verdict(row: dict, ours: int | None) -> tuple[str, str]:
    """(status, problem): what our count says of the cell, and why that disagrees with the CSV's record (or "")."""
    recorded = row.get("status") or "match"
    if recorded not in STATUSES:
        return recorded, f"status {recorded!r}: choose one of {', '.join(STATUSES)}"
    if ours is None:
        status = "not counted"
    else:
        status = "match" if matches(ours, row) else "mismatch"
    if status != recorded:
        return status, f"recorded as {recorded}, counted as {status}"
    if status != "match" and not row.get("reason"):
        return status, f"a {status} without a reason"
    return status, ""


def comparison(rows: list[dict]) -> tuple[Table, list[dict]]:
    table = Table(title="The papers' #Params: ours (meta device, exact) and theirs")
    for column in ("paper", "table", "row", "model", "method", "settings", "counts", "ours", "paper's", "",
                   "head (apart)"):
        table.add_column(column, justify="right" if column in ("ours", "paper's", "head (apart)") else "left")
    checked = []
    for row in rows:
        settings = row["overrides"].split()
        counted = row.get("counted") or "adapter"
        counts = count(row["model"], row["method"], settings) if row["model"] and row["method"] else None
        ours = ours_for(counts, counted) if counts else None
        status, problem = verdict(row, ours)
        checked.append({**row, "ours": ours, "match": status == "match", "verdict": status, "problem": problem})
        shown = f"{row['params']}{row['suffix']}"
        if ours is None:
            mark = "[yellow]not counted"
        elif status == "match":
            mark = "[green]="
        else:
            gap = "" if row["unit"] else f" ({float(row['params']) - ours:+,.0f})"
            mark = f"[red]≠{gap}"
        if problem:
            mark += f" [bold red]UNEXPECTED: {escape(problem)}"
        table.add_row(*map(escape, (row["paper"], row["table"], row.get("row", ""))), row["model"] or "–",
                      row["method"] or "–", escape(" ".join(settings)), counted, f"{ours:,}" if ours is not None else "–", shown, mark,
                      f"{counts['head']:,}" if counts else "–")
    return table, checked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", type=Path, default=PAPER_PARAMS, help="the papers' counts (CSV)")
    args = parser.parse_args(argv)
    table, checked = comparison(read_paper_params(args.paper))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    console.print(summary(checked), markup=False, highlight=False)
    return 1 if any(r["problem"] for r in checked) else 0


def summary(checked: list[dict]) -> str:
    """The verdicts counted, then every mismatch and every cell not counted with its reason, then every verdict
    that disagrees with the CSV's record."""
    by = {s: [r for r in checked if r["verdict"] == s] for s in STATUSES}
    counted = len(by["match"]) + len(by["mismatch"])
    lines = [f"{len(by['match'])} of {counted} counted cells match the papers' ({len(by['mismatch'])} mismatch); "
             f"{len(by['not counted'])} not counted here."]
    for status, mark in (("mismatch", "≠"), ("not counted", "?")):
        rows = by[status]
        for reason in dict.fromkeys(r["reason"] or "no reason recorded" for r in rows):
            cells = ", ".join(f"{r['paper'].split(' (')[0]} {r.get('row', '')} {r['params']}{r['suffix']}"
                              + (f" (ours {r['ours']:,})" if r["ours"] is not None else "")
                              for r in rows if (r["reason"] or "no reason recorded") == reason)
            lines.append(f"{mark} {cells}: {reason}")
    lines += [f"UNEXPECTED {r['paper']} / {r['table']} / {r.get('row', '')}: {r['problem']}"
              for r in checked if r["problem"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
