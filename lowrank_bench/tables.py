"""Comparison tables from result rows: mean ± std over the seeds of each configuration.

    python -m lowrank_bench.tables [results/runs.csv] [--metric best_accuracy] [--paper results/paper_numbers.csv]
        [--where lr=1e-3 ...] [--show lr,batch_size] [--include-diverged]

A configuration is a task, model and method with one config hash (every setting but the seed), so runs that differ
in learning rate or precision are separate lines, never "seeds" of one. A seed that appears twice and runs that
predicted one class are flagged; diverged runs are left out (and listed) unless asked for.

Each metric is shown in its own unit, by its kind in `metric_kinds` (never guessed from its name here): a
fraction (accuracy, F1, BLEU, ...) as a percent, its column marked (%); a perplexity, a loss, NIST or CIDEr as it
is. A continual run's row shows its own measures (final average accuracy, backward transfer, average forgetting,
perplexity before and after, each task's final accuracy) and one derived from them, `ppl_change` (%): the relative
change of the perplexity over the sequence, ppl_after / ppl_before - 1, per run and then averaged over the seeds.
Bad input (a missing, folder or non-UTF-8 file, a `--where`/`--show`/`--metric` column the file lacks, a filter that
keeps nothing) is one line, exit status 2.

Published numbers (results/paper_numbers.csv) are one per line: `source,method,model,task,metric,value` (what
`--paper` joins on), then where the number is printed (`paper,table,row,column`), its `unit` (percent: ours are
fractions shown x100; fraction; raw, e.g. a perplexity), the paper's ± (`paper_std`), `verified` (yes: read from
the repository or page itself; no: transcribed from the paper's table) and a `note`. Rows without the later columns
read as percent. `python -m lowrank_bench.reproduce` renders the papers' tables cell by cell from the same file.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowrank_bench import metric_kinds
from lowrank_bench.errors import LrbenchError, closest, input_text, report


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


def number(value: float, kind: str | None) -> str:
    """One value in its own unit: a fraction as a percent; anything else as written (thousands separated)."""
    if kind == metric_kinds.FRACTION:
        return f"{value * 100:.2f}"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"


def fmt_measure(values: list[float], kind: str | None) -> str:
    """Mean ± std over seeds of one measure, in its unit (`number`)."""
    if not values:
        return "–"
    mean = number(statistics.fmean(values), kind)
    return mean if len(values) == 1 else f"{mean} ± {number(statistics.stdev(values), kind)}"


def ppl_change(row: dict) -> float | None:
    """A continual run's relative perplexity change over its sequence, ppl_after / ppl_before - 1 (a fraction:
    0.05 is 5 % higher); None without both perplexities."""
    before, after = numbers([row], "ppl_before"), numbers([row], "ppl_after")
    if not before or not after or before[0] <= 0:
        return None
    return after[0] / before[0] - 1


#: measures computed from a row's own columns: name -> (its kind, its function of the row, the column it follows)
DERIVED = {"ppl_change": (metric_kinds.FRACTION, ppl_change, "ppl_after")}


def kind_of(column: str) -> str | None:
    """A column's kind: a derived measure's declared one, else the registry's (`metric_kinds.kind`)."""
    return DERIVED[column][0] if column in DERIVED else metric_kinds.kind(column)


def with_derived(row: dict) -> dict:
    """The row with each derived measure it has the columns for, right after the column it derives from."""
    extra = {name: value for name, (_, function, _) in DERIVED.items() if (value := function(row)) is not None}
    if not extra:
        return row
    out = {}
    for key, value in row.items():
        out[key] = value
        out.update({name: v for name, v in extra.items() if DERIVED[name][2] == key})
    out.update({name: v for name, v in extra.items() if name not in out})
    return out


def heading(column: str) -> str:
    name = column.removeprefix("best_")
    return f"{name} (%)" if kind_of(column) == metric_kinds.FRACTION else name


def numbers(rows: list[dict], column: str) -> list[float]:
    """The finite values of `column` in `rows` (blank: undefined, left out)."""
    out = []
    for row in rows:
        try:
            value = float(row.get(column))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out.append(value)
    return out


def measure_columns(rows: list[dict]) -> list[str]:
    """Every column of `rows` that holds a measure (`metric_kinds.is_measure_column`) with a number in some row."""
    seen: list[str] = []
    for row in rows:
        for key in row:
            measure = metric_kinds.is_measure_column(key) or key in DERIVED
            if key and key not in seen and measure and numbers([row], key):
                seen.append(key)
    return seen


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
    measures as mean ± std over its rows, each in its own unit (`metric_kinds`; derived measures: `DERIVED`); `show`
    adds row columns (lr, batch_size, ...) that tell the lines apart."""
    rows = [with_derived(row) for row in rows]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["model"], row["method"], row.get("config_hash") or "")].append(row)
    if metrics is None:  # every measure present: best_* and a continual row's own columns
        metrics = measure_columns(rows)
    table = Table(title="lrbench comparison (mean ± std over seeds; (%): a fraction ×100, other columns in their "
                        "own unit)")
    for col in ("task", "model", "method", "config", *show, "seeds", "trainable"):
        table.add_column(col)
    for metric in metrics:  # a narrow terminal folds a number onto two lines rather than cut it with "…"
        table.add_column(heading(metric), justify="right", overflow="fold")
    table.add_column("ms/step", justify="right")
    for (task, model, method, config), members in sorted(groups.items()):
        cells = [fmt_measure(numbers(members, m), kind_of(m)) for m in metrics]
        step_ms = numbers(members, "time_per_step_ms")
        trainable = numbers(members[:1], "trainable_params")
        shown = [" ".join(sorted({str(r.get(k, "")) for r in members})) for k in show]
        table.add_row(task, model, method, config[:8] or "–", *shown, seeds_cell(members),
                      f"{int(trainable[0]):,}" if trainable else "–", *cells,
                      f"{statistics.fmean(step_ms):.1f}" if step_ms else "–")
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
            raise LrbenchError(f"--where {pair[0]}: write key=value, e.g. --where lr=1e-3")
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


RESULT_COLUMNS = ("method", "model", "task", "seed")
PAPER_COLUMNS = ("source", "method", "model", "task", "metric", "value")


def load_rows(path: Path, what: str, required: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """The header and rows of a CSV the user named; a missing, folder, non-UTF-8, empty or foreign file is an
    LrbenchError naming it."""
    reader = csv.DictReader(io.StringIO(input_text(path, what), newline=""))
    header = [c for c in reader.fieldnames or [] if c]
    if not header:
        raise LrbenchError(f"{what} {path}: the file is empty; give a CSV whose header has {', '.join(required)}")
    lacking = [c for c in required if c not in header]
    if lacking:
        raise LrbenchError(f"{what} {path}: its header lacks {', '.join(lacking)}; give a CSV whose header has "
                           f"{', '.join(required)}")
    return header, list(reader)


def check_column(name: str, header: list[str], option: str, path: Path) -> None:
    if name in header:
        return
    close = closest(name, header)
    hint = f"did you mean {close}? " if close else ""
    raise LrbenchError(f"{option} {name}: {path} has no column {name!r}; {hint}valid: {', '.join(header)}")


def select(rows: list[dict], conditions: list[str], path: Path) -> list[dict]:
    """`where`, one condition at a time, so that a filter that keeps nothing is named with the values there are."""
    for condition in conditions:
        kept = where(rows, [condition])
        if rows and not kept:
            key = condition.split("=", 1)[0]
            there = sorted({str(r.get(key, "")) for r in rows})
            listed = ", ".join(there[:10]) + (f" (and {len(there) - 10} more)" if len(there) > 10 else "")
            raise LrbenchError(f"--where {condition}: no row of {path} has it; {key} there: {listed}")
        rows = kept
    return rows


def check_where(conditions: list[str], header: list[str], path: Path) -> None:
    """Every `--where` condition is key=value with a key the file has."""
    for condition in conditions:
        if "=" not in condition:
            raise LrbenchError(f"--where {condition}: write key=value, e.g. --where lr=1e-3")
        check_column(condition.split("=", 1)[0], header, "--where", path)


def render(args) -> None:
    path = Path(args.csv)
    header, rows = load_rows(path, "results CSV", RESULT_COLUMNS)
    conditions = args.where
    check_where(conditions, header, path)
    show = [k for k in args.show.split(",") if k]
    for key in show:
        check_column(key, header, "--show", path)
    for metric in args.metric or []:
        check_column(metric, header + [d for d in DERIVED if d not in header], "--metric", path)
    if not rows:
        raise LrbenchError(f"results CSV {path}: a header but no result rows; give a file lrbench has written to")
    trained = [r for r in rows if r.get("mode", "train") != "eval"]  # evaluations: no best_*
    if not trained:
        raise LrbenchError(f"results CSV {path}: no training rows, only {len(rows)} mode=eval row(s) (an evaluation "
                           "carries no best_ metric); give the file of the training runs")
    rows = select(trained, conditions, path)
    diverged = [r for r in rows if r.get("status") == "diverged"]
    if not args.include_diverged:
        rows = [r for r in rows if r.get("status") != "diverged"]
    if not rows:
        raise LrbenchError(f"results CSV {path}: all {len(diverged)} selected row(s) diverged; --include-diverged "
                           "shows them")
    papers = None
    if args.paper:
        _, papers = load_rows(Path(args.paper), "published numbers", PAPER_COLUMNS)
        for line, paper in enumerate(papers, start=2):
            if (paper.get("unit") or "percent") not in UNIT_SCALE:
                raise LrbenchError(f"published numbers {args.paper}:{line}: unit={paper['unit']!r}; valid: "
                                   f"{', '.join(UNIT_SCALE)} (blank: percent)")
    console = Console()
    if not console.is_terminal:  # piped or in CI: the table at its own width, never a number cut short by "…"
        console = Console(width=100_000)
    console.print(comparison(rows, args.metric, show))
    if diverged and not args.include_diverged:
        console.print(f"left out: {len(diverged)} diverged run(s) ("
                      + ", ".join(f"{r['method']} {r['task']} seed {r['seed']}" for r in diverged)
                      + "); --include-diverged keeps them")
    if papers is not None:
        console.print(against_papers(rows, papers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_bench.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", default="results/runs.csv")
    parser.add_argument("--metric", action="append", help="columns to show (default: every measure)")
    parser.add_argument("--paper", help="a CSV of published numbers (results/paper_numbers.csv) to set ours against")
    parser.add_argument("--include-diverged", action="store_true", help="average diverged runs in too")
    parser.add_argument("--where", action="append", default=[], help="keep rows with key=value (repeatable)")
    parser.add_argument("--show", default="", help="row columns that tell configurations apart, e.g. lr,batch_size")
    args = parser.parse_args(argv)
    try:
        render(args)
    except LrbenchError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
