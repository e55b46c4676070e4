"""Comparison tables from result rows: mean ± std over the seeds of each configuration.

    python -m lowrank_bench.tables [results/runs.csv] [--metric best_accuracy] [--paper results/paper_numbers.csv]
        [--where lr=1e-3 ...] [--show lr,batch_size] [--include-diverged]

A configuration is a task, model and method with one config hash (every setting but the seed), so runs that differ
in learning rate or precision are separate lines, never "seeds" of one. A seed that appears twice and runs that
predicted one class are flagged; diverged runs are left out (and listed) unless asked for.

Published numbers (results/paper_numbers.csv) are one per line: `source,method,model,task,metric,value` (what
`--paper` joins on), then where the number is printed (`paper,table,row,column`), its `unit` (percent: ours are
fractions shown x100; fraction; raw, e.g. a perplexity), the paper's ± (`paper_std`), `verified` (yes: read from
the repository or page itself; no: transcribed from the paper's table) and a `note`. Rows without the later columns
read as percent. `python -m lowrank_bench.reproduce` renders the papers' tables cell by cell from the same file.
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowrank_bench.results import read_rows


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


UNIT_SCALE = {"percent": 100.0, "fraction": 1.0, "raw": 1.0}


def unit_scale(unit: str | None) -> float:
    """The factor that brings one of our values (a fraction, or a raw number such as a perplexity) to `unit`."""
    unit = unit or "percent"
    if unit not in UNIT_SCALE:
        raise ValueError(f"unit {unit!r}; valid: {', '.join(UNIT_SCALE)}")
    return UNIT_SCALE[unit]


def metric_value(row: dict, metric: str) -> float | None:
    """A row's value of `metric`: its best evaluation's (`best_<metric>`) where the row has one, else the column
    itself (continual rows: `final_accuracy_mrpc`, `ppl_after`); None when blank (undefined) or absent."""
    cell = row.get(f"best_{metric}")
    if cell in (None, ""):
        cell = row.get(metric)
    try:
        return None if cell in (None, "") else float(cell)
    except ValueError:
        return None


def seeds_cell(members: list[dict]) -> str:
    """How many distinct seeds, and any seed that appears twice or a run that predicted one class only."""
    seeds = Counter(str(r.get("seed", "")) for r in members)
    notes = [f"seed {s} ×{n}" for s, n in sorted(seeds.items()) if n > 1]
    degenerate = sum(str(r.get("degenerate", "")).lower() == "true" for r in members)
    if degenerate:
        notes.append(f"{degenerate} degenerate")
    return f"{len(seeds)}" + (f" [red]({', '.join(notes)})" if notes else "")


def comparison(rows: list[dict], metrics: list[str] | None = None, show: list[str] = ()) -> Table:
    """One line per configuration (task, model, method and the config hash: every setting but the seed), its
    metrics as mean ± std over its rows; `show` adds row columns (lr, batch_size, ...) that tell the lines apart."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["model"], row["method"], row.get("config_hash", ""))].append(row)
    if metrics is None:  # every best_* metric present, main metric first
        seen = []
        for row in rows:
            for key, value in row.items():
                if key.startswith("best_") and key != "best_step" and value != "" and key not in seen:
                    seen.append(key)
        metrics = seen
    table = Table(title="lrbench comparison (metrics ×100, mean ± std over seeds)")
    for col in ("task", "model", "method", "config", *show, "seeds", "trainable"):
        table.add_column(col)
    for metric in metrics:
        table.add_column(metric.removeprefix("best_"), justify="right")
    table.add_column("ms/step", justify="right")
    for (task, model, method, config), members in sorted(groups.items()):
        cells = [fmt([float(r[m]) for r in members if r.get(m) not in (None, "")]) for m in metrics]
        step_ms = statistics.fmean(float(r["time_per_step_ms"]) for r in members)
        shown = [" ".join(sorted({str(r.get(k, "")) for r in members})) for k in show]
        table.add_row(task, model, method, config[:8] or "–", *shown, seeds_cell(members),
                      f"{int(members[0]['trainable_params']):,}", *cells, f"{step_ms:.1f}")
    return table


def where(rows: list[dict], conditions: list[str]) -> list[dict]:
    """Rows whose columns equal every `key=value` (numbers compared as numbers: lr=1e-3 matches 0.001)."""
    def equal(cell, wanted: str) -> bool:
        try:
            return float(cell) == float(wanted)
        except (TypeError, ValueError):
            return str(cell) == wanted

    pairs = [c.split("=", 1) for c in conditions]
    for pair in pairs:
        if len(pair) != 2:
            raise SystemExit(f"--where {pair[0]}: write key=value, e.g. --where lr=1e-3")
    return [r for r in rows if all(equal(r.get(k), v) for k, v in pairs)]


def against_papers(rows: list[dict], paper_rows: list[dict]) -> Table:
    """Our best value (mean ± std over seeds) next to every published number for the same method, model, task, in
    the paper's unit (percent: ours x100)."""
    table = Table(title="lrbench vs published numbers (in the paper's unit: percent = ours ×100)")
    for col in ("task", "model", "method", "metric", "ours", "seeds", "paper", "source"):
        table.add_column(col, justify="right" if col in ("ours", "paper") else "left")
    for paper in paper_rows:
        mine = [r for r in rows if (r["method"], r["model"], r["task"]) == (paper["method"], paper["model"], paper["task"])]
        values = [v for v in (metric_value(r, paper["metric"]) for r in mine) if v is not None]
        if values:
            where_printed = " ".join(paper.get(k) or "" for k in ("table", "row")).strip()
            table.add_row(paper["task"], paper["model"], paper["method"], paper["metric"],
                          fmt(values, unit_scale(paper.get("unit"))), str(len(values)), paper["value"],
                          paper["source"] + (f" · {where_printed}" if where_printed else ""))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", default="results/runs.csv")
    parser.add_argument("--metric", action="append", help="columns to show (default: every best_* metric)")
    parser.add_argument("--paper", help="a CSV of published numbers (results/paper_numbers.csv) to set ours against")
    parser.add_argument("--include-diverged", action="store_true", help="average diverged runs in too")
    parser.add_argument("--where", action="append", default=[], help="keep rows with key=value (repeatable)")
    parser.add_argument("--show", default="", help="row columns that tell configurations apart, e.g. lr,batch_size")
    args = parser.parse_args(argv)
    rows = [r for r in read_rows(Path(args.csv)) if r.get("mode", "train") != "eval"]  # evaluations: no best_*
    rows = where(rows, args.where)
    diverged = [r for r in rows if r.get("status") == "diverged"]
    if not args.include_diverged:
        rows = [r for r in rows if r.get("status") != "diverged"]
    if not rows:
        raise SystemExit(f"no result rows in {args.csv}")
    console = Console()
    if not console.is_terminal:  # piped or in CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(comparison(rows, args.metric, [k for k in args.show.split(",") if k]))
    if diverged and not args.include_diverged:
        console.print(f"left out: {len(diverged)} diverged run(s) ("
                      + ", ".join(f"{r['method']} {r['task']} seed {r['seed']}" for r in diverged)
                      + "); --include-diverged keeps them")
    if args.paper:
        console.print(against_papers(rows, read_rows(Path(args.paper))))


if __name__ == "__main__":
    main()
