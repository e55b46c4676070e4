"""Reproduce the papers' headline tables: run each table's sweep, skipping the runs already in the results CSV,
then render ours next to the published numbers, cell by cell.

    python -m lowrank_bench.reproduce                        # every table, full scale (GPU): results/tables/
    python -m lowrank_bench.reproduce --scale smoke          # tiny offline models, minutes on a CPU: results/tables/smoke/
    python -m lowrank_bench.reproduce --table lora_glue --seeds 0,1 --collect-only
    make reproduce-tables [SCALE=smoke] [COLLECT_ONLY=1]

What runs is data (lowrank_bench/conf/reproduce/tables.yaml, whose header explains it): per table its runs (Hydra overrides,
mostly a preset `experiment=<paper>/<setting>`), its columns (task and metric), its seeds and its smoke subset. The
published numbers are results/paper_numbers.csv. Each run is `python -m lowrank_bench.train -m ...` (pending runs
grouped into as few sweeps as their overrides allow) with LRBENCH_RESULTS_CSV at the scale's `runs.csv`. A run
counts as done when the CSV has a row with its method, model, task, seed and config hash (every setting but the
seed: results.config_hash), composed here exactly as lrbench composes it; a diverged row counts as done and is
left out of the numbers, and listed. `--collect-only` (or COLLECT_ONLY=1) runs nothing.

Each table is written as Markdown, LaTeX and a PNG: ours as mean ± std over seeds (in the paper's unit), the seed
count, the paper's value, the difference and whether it is within our seeds' spread (|ours - paper| <= std);
missing cells say why; runs that predicted a single class are flagged. The PNG is a grid of small panels, one per
column, a horizontal bar per run (at most 4 panels across: ~1,500 px wide). `index.md` lists every table in the
output folder, those of earlier invocations too, so `--table t` updates t's line and keeps the others. Paired comparisons across methods on the
same cells (e.g. BiDoRA vs DoRA, as the paper reports): Wilcoxon signed-rank test and a bootstrap 95% interval of
the mean difference, over the cells' seed means.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from lowrank_bench import assembly, validate
from lowrank_bench.errors import LrbenchError, input_text, report
from lowrank_bench.results import PROJECT_ROOT, check_folder, config_hash, read_rows
from lowrank_bench.tables import metric_value, unit_scale

REGISTRY = Path(__file__).resolve().parent / "conf" / "reproduce" / "tables.yaml"
PAPERS = Path(__file__).resolve().parent / "reference" / "paper_numbers.csv"  # results/ links to it
CONF = Path(__file__).resolve().parent / "conf"
MISSING = "missing"
NOT_TRANSCRIBED = "not transcribed"   # a table none of whose published numbers is in paper_numbers.csv (yet)


# -- the registry -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One cell of a table: a run (its label: the paper's row, or its column when the paper prints runs across)
    and a column. `overrides` is None where no run of this scale makes it (`why` says why); `mean_of` marks a
    derived column (a paper's Avg)."""

    run: str
    column: str
    metric: str | None
    unit: str
    overrides: tuple[tuple[str, object], ...] | None
    why: str = ""
    mean_of: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()      # this cell's seeds where its column sets its own (else the table's)
    paper_row: str = ""              # the paper's row label where it is not the run's (`paper_row:` in its runs entry)


@dataclass
class Table:
    name: str
    title: str
    sources: list[dict]
    paper_rows: str          # "runs" or "columns": which of our axes the paper prints as its rows
    seeds: list[int]
    runs: list[str]
    columns: list[str]
    cells: list[Cell]
    compare: list[dict]
    scale: str
    skip: str | None = None
    note: str = ""
    transcribed: bool = True     # False: no source of the table has a row in paper_numbers.csv (yet)

    def seeds_of(self, cell: Cell) -> list[int]:
        return list(cell.seeds or self.seeds)


def load_registry(path: Path = REGISTRY) -> dict:
    """The registry of tables; a missing, folder, non-UTF-8 or malformed file is one line naming it."""
    try:
        registry = yaml.safe_load(input_text(path, "registry"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise LrbenchError(f"registry {path}{where}: not valid YAML ({problem}); see lowrank_bench/conf/reproduce/tables.yaml") \
            from None
    mapping = registry if isinstance(registry, dict) else {}
    lacking = [k for k in ("scales", "tables") if not isinstance(mapping.get(k), dict)]
    if lacking:
        raise LrbenchError(f"registry {path}: no {' and no '.join(lacking)} mapping; a registry has `scales:` and "
                           "`tables:` (see lowrank_bench/conf/reproduce/tables.yaml)")
    return registry


def fill(template: dict, variables: dict) -> dict:
    """A run's overrides with `{name}` in its strings replaced by the column's variables."""
    def one(value):
        if not isinstance(value, str):
            return value
        return re.sub(r"\{(\w+)\}", lambda m: str(variables[m.group(1)]), value)

    return {key: one(value) for key, value in template.items()}


def plan_table(name: str, spec: dict, scale: str, scales: dict, seeds: list[int] | None = None,
               extra: dict | None = None) -> Table:
    """The table's cells at `scale`: the registry's runs and columns, with the scale's subset, seeds, metric and
    overrides (the scale's, then the table's at that scale, then `extra` from the command line)."""
    at_scale = spec.get(scale, {}) if scale != "full" else {}
    skip = at_scale.get("skip")
    keep_runs, keep_columns = at_scale.get("runs"), at_scale.get("columns")
    overrides = {**(scales[scale].get("overrides") or {}), **(at_scale.get("overrides") or {}), **(extra or {})}
    # the seeds: the command line's, else the scale's (the table's at that scale, then the scale's own), else the
    # column's own `seeds`, else the table's
    forced = seeds or at_scale.get("seeds") or scales[scale].get("seeds")
    cells = []
    for run, template in spec["runs"].items():
        for column, variables in spec["columns"].items():
            cell = plan_cell(run, template, column, variables, spec.get("unit", "percent"), skip,
                             keep_runs, keep_columns, at_scale.get("metric"), overrides, scale)
            if not forced and variables.get("seeds"):
                cell = replace(cell, seeds=tuple(variables["seeds"]))
            cells.append(cell)
    return Table(name, spec["title"], spec.get("sources", []), spec.get("paper_rows", "runs"),
                 list(forced or spec["seeds"]), list(spec["runs"]), list(spec["columns"]), cells,
                 spec.get("compare", []), scale, skip, " ".join(str(spec.get("note", "")).split()))


def plan_cell(run, template, column, variables, default_unit, skip, keep_runs, keep_columns, metric, overrides,
              scale) -> Cell:
    unit = variables.get("unit", default_unit)
    paper_row = template.get("paper_row", "")
    if "mean_of" in variables:
        return Cell(run, column, None, unit, None, mean_of=tuple(variables["mean_of"]), paper_row=paper_row)
    metric = metric or variables["metric"]
    if "paper_only" in template:
        return Cell(run, column, metric, unit, None, template["paper_only"], paper_row=paper_row)
    if skip:
        return Cell(run, column, metric, unit, None, f"not run at the {scale} scale: {skip}", paper_row=paper_row)
    if keep_runs is not None and run not in keep_runs or keep_columns is not None and column not in keep_columns:
        return Cell(run, column, metric, unit, None, f"not in the {scale} scale's subset", paper_row=paper_row)
    names = {k: v for k, v in variables.items() if k not in COLUMN_KEYS}
    settings = {k: v for k, v in template.items() if k not in RUN_KEYS}
    return Cell(run, column, metric, unit, tuple({**fill(settings, names), **overrides}.items()), paper_row=paper_row)


COLUMN_KEYS = ("metric", "unit", "seeds")     # a column's own settings; its other keys fill `{name}` in the runs
RUN_KEYS = ("paper_row",)                    # a run's own settings; its other keys are Hydra overrides


def add_published_cells(table: Table, papers: dict[tuple, dict]) -> Table:
    """Every published number of the table's sources gets a cell: a row or column that results/paper_numbers.csv
    has and tables.yaml does not is added as paper only (its cells missing on our side, and why). So a paper's
    numbers are added with CSV rows alone; a run line in tables.yaml, when there is one, fills our side."""
    sources = {(s["paper"], s["table"]) for s in table.sources}
    published = [r for key, r in papers.items() if key[:2] in sources]
    table.transcribed = bool(published)
    by_runs = table.paper_rows == "runs"
    rows_known = {c.paper_row or c.run for c in table.cells} if by_runs else set(table.columns)
    columns_known = set(table.columns) if by_runs else {c.paper_row or c.run for c in table.cells}
    units = {c.column: c.unit for c in table.cells}
    for r in published:
        paper_row, paper_column = r["row"], r["column"]
        run, column = (paper_row, paper_column) if by_runs else (paper_column, paper_row)
        if paper_row in rows_known and paper_column in columns_known:
            continue
        if run not in table.runs:
            table.runs.append(run)
        if column not in table.columns:
            table.columns.append(column)
        rows_known.add(paper_row), columns_known.add(paper_column)
    have = {(c.run, c.column) for c in table.cells}
    for run in table.runs:
        for column in table.columns:
            if (run, column) not in have:
                unit = units.get(column) or next((p["unit"] for p in published if (p["row"], p["column"]) == (
                    (run, column) if by_runs else (column, run))), None) or "percent"
                table.cells.append(Cell(run, column, None, unit, None, "published only: no run or column of "
                                        "lowrank_bench/conf/reproduce/tables.yaml makes this cell (add one there to run it)"))
                units.setdefault(column, unit)
    order = {(run, column): (i, j) for i, run in enumerate(table.runs) for j, column in enumerate(table.columns)}
    table.cells.sort(key=lambda c: order[(c.run, c.column)])
    return table


def check_table(name: str, spec, scale: str) -> None:
    """A table of the registry has the shape plan_table reads (see lowrank_bench/conf/reproduce/tables.yaml): a mapping with a
    title, `runs` (name -> Hydra overrides), `columns` (name -> metric, or mean_of), `seeds` (integers >= 0) and
    `sources` (paper, table); else one line naming the table and the entry, never a KeyError deep in the plan."""
    where = f"registry table {name}"
    if not isinstance(spec, dict):
        raise LrbenchError(f"{where} is a {type(spec).__name__}, not a mapping with title, runs, columns, seeds "
                           "(see lowrank_bench/conf/reproduce/tables.yaml)")
    lacking = [key for key in ("title", "runs", "columns", "seeds") if key not in spec]
    if lacking:
        raise LrbenchError(f"{where} lacks {', '.join(lacking)} (a table has title, runs, columns, seeds; see "
                           "lowrank_bench/conf/reproduce/tables.yaml)")
    for key in ("runs", "columns"):
        if not isinstance(spec[key], dict) or not spec[key]:
            raise LrbenchError(f"{where}: {key} must be a mapping of {key[:-1]} name -> settings, not {spec[key]!r}")
        bad = next((k for k, v in spec[key].items() if not isinstance(v, dict)), None)
        if bad is not None:
            raise LrbenchError(f"{where}: {key}.{bad} is {spec[key][bad]!r}; give a mapping ("
                               + ("Hydra overrides, e.g. {method: lora, task: glue/mrpc}" if key == "runs" else
                                  "metric: <a result column>, or mean_of: [columns]") + ")")
    no_metric = [c for c, v in spec["columns"].items() if "metric" not in v and "mean_of" not in v]
    at_scale = spec.get(scale) if scale != "full" else None
    if no_metric and not (isinstance(at_scale, dict) and at_scale.get("metric")):
        raise LrbenchError(f"{where}: column(s) {no_metric} name no metric; give each `metric: <a result column>` "
                           "(e.g. accuracy) or `mean_of: [columns]`")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
        raise LrbenchError(f"{where}: seeds={seeds!r}; give a list of integers >= 0, e.g. [0, 1, 2]")
    sources = spec.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, dict) and {"paper", "table"} <= set(s) for s in sources):
        raise LrbenchError(f"{where}: sources must be a list of {{paper: ..., table: ...}}, as in "
                           "results/paper_numbers.csv")
    if scale != "full" and at_scale is not None and not isinstance(at_scale, dict):
        raise LrbenchError(f"{where}: its `{scale}` entry is {at_scale!r}; give a mapping (runs, columns, seeds, "
                           "overrides, skip)")


def plan(registry: dict, scale: str, names: list[str] | None = None, seeds: list[int] | None = None,
         extra: dict | None = None) -> list[Table]:
    tables = registry["tables"]
    unknown = [n for n in names or [] if n not in tables]
    if unknown:
        raise LrbenchError(f"--table: unknown table(s) {unknown}; valid: {', '.join(tables)}")
    if scale not in registry["scales"]:
        raise LrbenchError(f"--scale {scale}: valid: {', '.join(registry['scales'])}")
    if not isinstance(registry["scales"][scale], dict):
        raise LrbenchError(f"registry scale {scale} is {registry['scales'][scale]!r}; give a mapping (output, "
                           "overrides, seeds)")
    for name in names or tables:
        check_table(name, tables[name], scale)
    return [plan_table(n, tables[n], scale, registry["scales"], seeds, extra) for n in names or tables]


# -- which runs exist ---------------------------------------------------------------------------------------------
def hydra_value(value) -> str:
    """One override value as Hydra's command-line grammar reads it back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if re.fullmatch(r"[\w./:@+\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_args(overrides) -> list[str]:
    return [f"{key}={hydra_value(value)}" for key, value in overrides]


class Composer:
    """Composes a configuration as `lrbench` will (Hydra's compose API on conf/), checks its settings, and names
    the rows that are its runs: (method, model, task, seed, config hash). One composition per configuration, the seed set afterwards
    (a config may interpolate ${seed}, so the hash is taken per seed)."""

    def __init__(self):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        self.context = initialize_config_dir(config_dir=str(CONF), version_base="1.3")
        self.context.__enter__()
        self.cache: dict = {}

    def close(self) -> None:
        self.context.__exit__(None, None, None)

    def keys(self, overrides, seeds: list[int]) -> dict[int, tuple]:
        from hydra import compose

        if overrides not in self.cache:
            cfg = compose(config_name="config", overrides=override_args(overrides))
            validate.check(cfg)  # what lrbench refuses before any work is refused here, before any sweep
            assembly.check_model_kind(cfg)  # (an encoder for a causal LM's task)
            self.cache[overrides] = cfg
        cfg = self.cache[overrides]
        out = {}
        for seed in seeds:
            cfg.seed = seed
            out[seed] = (cfg.method.name, cfg.model.name, cfg.task.name, str(seed), config_hash(cfg))
        return out


def index_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("mode", "train") == "eval":
            continue
        key = (row.get("method"), row.get("model"), row.get("task"), str(row.get("seed")), row.get("config_hash"))
        out.setdefault(key, []).append(row)
    return out


@dataclass
class Plan:
    """Every configuration of the selected tables with its run keys per seed, and what is still to run."""

    keys: dict[tuple, dict[int, tuple]] = field(default_factory=dict)   # overrides -> seed -> row key
    errors: dict[tuple, str] = field(default_factory=dict)              # overrides -> why it does not compose
    pending: list[dict] = field(default_factory=list)                   # {**overrides, "seed": s}


def plan_runs(tables: list[Table], rows: list[dict]) -> Plan:
    found = index_rows(rows)
    result, scheduled = Plan(), set()
    composer = Composer()
    try:
        for table in tables:
            for cell in table.cells:
                if cell.overrides is None or cell.overrides in result.errors:
                    continue
                try:
                    keys = composer.keys(cell.overrides, table.seeds_of(cell))
                except Exception as err:  # noqa: BLE001 (a bad preset or override: that configuration only)
                    result.errors[cell.overrides] = f"{type(err).__name__}: {err}"
                    continue
                result.keys.setdefault(cell.overrides, {}).update(keys)
                for seed, key in keys.items():
                    if key not in found and key not in scheduled:  # one run per key, whichever cells share it
                        scheduled.add(key)
                        result.pending.append({**dict(cell.overrides), "seed": seed})
    finally:
        composer.close()
    return result


def batches(points: list[dict]) -> list[dict[str, list]]:
    """Pending runs as few `-m` sweeps as possible: runs whose overrides differ in one key only merge into one
    sweep over that key, until no two do. Each sweep is an exact Cartesian product: nothing runs twice, nothing
    extra runs."""
    blocks = [{key: [value] for key, value in point.items()} for point in points]
    keys = sorted({key for point in points for key in point}, key=lambda k: (k != "seed", k))
    merged_any = True
    while merged_any:
        merged_any = False
        for key in keys:
            groups: dict[tuple, dict] = {}
            kept = []
            for block in blocks:
                if key not in block:
                    kept.append(block)
                    continue
                rest = tuple(sorted((k, repr(v)) for k, v in block.items() if k != key))
                if rest in groups:
                    groups[rest][key] += block[key]
                    merged_any = True
                else:
                    groups[rest] = block
                    kept.append(block)
            blocks = kept
    return blocks


# -- running ------------------------------------------------------------------------------------------------------
def sweep_command(block: dict[str, list]) -> list[str]:
    """The sweep as `lrbench -m` arguments. Where a config group (experiment, method, ...) is swept, Hydra first
    composes the config without the swept values (the default method), so a setting that only the swept group
    defines (BiDoRA's method.orientation) is refused there: such sweeps set their dotted keys with `++` (add or
    override). Every configuration was composed here with plain overrides first (Composer.keys), so a misspelt key
    is still refused before any sweep."""
    group_swept = any(len(values) > 1 and "." not in key and key != "seed" for key, values in block.items())

    def name(key: str) -> str:
        return f"++{key}" if group_swept and "." in key and not key.startswith(("~", "+")) else key

    return [sys.executable, "-m", "lowrank_bench.train", "-m",
            *(f"{name(key)}={','.join(hydra_value(v) for v in values)}" for key, values in block.items())]


def work_root() -> Path:
    """Where the scale's tables and the sweeps' run folders go: the repository when running from a checkout (its
    results/tables/ are committed), else the current folder, as lrbench writes results/ and outputs/ there."""
    return PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()


def run_sweeps(blocks: list[dict[str, list]], csv_path: Path, output_dir: Path) -> list[str]:
    """Each sweep in a subprocess, one after the other; returns the failed ones (the others go on), whose output
    is kept in <output_dir>/logs/."""
    env = {**os.environ, "LRBENCH_RESULTS_CSV": str(Path(csv_path).resolve()),
           "LRBENCH_OUTPUT_DIR": str(Path(output_dir).resolve())}  # absolute: the sweeps run in work_root()
    failed = []
    for i, block in enumerate(blocks, 1):
        command = sweep_command(block)
        shown = "lrbench -m " + " ".join(command[4:])
        print(f"[{i}/{len(blocks)}] {math.prod(len(v) for v in block.values())} run(s): {shown}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, check=False, cwd=work_root(), env=env, capture_output=True, text=True)
        print(f"    exit {done.returncode} after {time.perf_counter() - started:.1f} s", flush=True)
        if done.returncode != 0:
            log = output_dir / "logs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{i}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{shown}\n\n{done.stdout}\n{done.stderr}")
            failed.append(f"{shown} (exit {done.returncode}; output: {log})")
    return failed


# -- collecting ---------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What a cell holds: our values per seed (in the cell's unit), flags, and the paper's number."""

    cell: Cell
    values: dict[int, float] = field(default_factory=dict)
    degenerate: int = 0
    diverged: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paper: dict | None = None
    paper_why: str = MISSING   # what the paper's side says without a number: missing | not transcribed

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    @property
    def paper_value(self) -> float | None:
        """The paper's number in this cell's unit."""
        if not self.paper:
            return None
        value, unit = float(self.paper["value"]), self.paper.get("unit") or "percent"
        if unit == self.cell.unit:
            return value
        if "raw" in (unit, self.cell.unit):
            raise ValueError(f"{self.cell}: the paper's unit {unit} cannot become {self.cell.unit}")
        return value / unit_scale(unit) * unit_scale(self.cell.unit)

    @property
    def diff(self) -> float | None:
        return None if self.mean is None or self.paper_value is None else self.mean - self.paper_value

    @property
    def within(self) -> str:
        if self.diff is None:
            return "–"
        if self.std is None:
            return "n/a (1 seed)"
        return "yes" if abs(self.diff) <= self.std else "no"


def matrix_value(row: dict, metric: str) -> float | None:
    """`matrix:<after stage>:<task>`: R[after][task] from the run's accuracy_matrix.csv (continual runs)."""
    _, after, task = metric.split(":")
    path = Path(row.get("matrix_csv") or "")
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        matrix = list(csv.DictReader(handle))
    names = list(matrix[0])[1:] if matrix else []
    if after not in names or names.index(after) >= len(matrix) or matrix[names.index(after)].get(task) in (None, ""):
        return None
    return float(matrix[names.index(after)][task])


def row_value(row: dict, metric: str) -> float | None:
    return matrix_value(row, metric) if metric.startswith("matrix:") else metric_value(row, metric)


def is_degenerate(row: dict, metric: str) -> bool:
    """Whether the cell's classifier predicted one class at its last evaluation: the row's flag, or for a continual
    run (which names its degenerate tasks) the final accuracy of the cell's own task."""
    if str(row.get("degenerate", "")).lower() != "true":
        return False
    tasks = row.get("degenerate_tasks")
    if tasks is None:
        return True
    return metric.startswith("final_accuracy_") and metric.removeprefix("final_accuracy_") in tasks.split()


def collect_cell(cell: Cell, seeds: list[int], plan_: Plan, found: dict) -> Result:
    result = Result(cell)
    if cell.overrides is None:
        if cell.why:
            result.notes.append(cell.why)
        return result
    if cell.overrides in plan_.errors:
        result.notes.append(f"refused before running: {plan_.errors[cell.overrides]}")
        return result
    scale = unit_scale(cell.unit)
    for seed in seeds:
        rows = found.get(plan_.keys[cell.overrides][seed], [])
        finished = [r for r in rows if r.get("status", "finished") != "diverged"]
        result.diverged += [r for r in rows if r.get("status") == "diverged"]
        if not finished:
            continue
        row = finished[-1]
        value = row_value(row, cell.metric)
        if value is None:
            result.notes.append(f"seed {seed}: no {cell.metric} in its row")
            continue
        result.values[seed] = value * scale
        result.degenerate += is_degenerate(row, cell.metric)
    if result.degenerate:
        result.notes.append(f"degenerate (one class predicted): {result.degenerate} of {len(result.values)}")
    if result.diverged:
        result.notes.append(f"{len(result.diverged)} diverged run(s) left out")
    return result


def derive(cell: Cell, row_results: dict[str, Result]) -> Result:
    """A mean over other columns (a paper's Avg), per seed; only where every one of them has that seed."""
    result = Result(cell)
    parts = [row_results[c] for c in cell.mean_of]
    seeds = set.intersection(*(set(p.values) for p in parts)) if parts else set()
    for seed in sorted(seeds):
        result.values[seed] = statistics.fmean(p.values[seed] for p in parts)
    if not seeds:
        result.notes.append(f"the mean of {len(parts)} columns: needs them all")
    return result


def paper_numbers(path: Path = PAPERS) -> dict[tuple, dict]:
    return {(r.get("paper"), r.get("table"), r.get("row"), r.get("column")): r for r in read_rows(path)}


def paper_for(table: Table, cell: Cell, papers: dict[tuple, dict]) -> dict | None:
    """The published number of the cell: matched on (paper, table, row, column), the row being the run's
    `paper_row` where it has one (a variant of a published row, e.g. BiDoRA (official) beside BiDoRA)."""
    label = cell.paper_row or cell.run
    row, column = (label, cell.column) if table.paper_rows == "runs" else (cell.column, label)
    for source in table.sources:
        found = papers.get((source["paper"], source["table"], row, column))
        if found:
            return found
    return None


def collect(table: Table, plan_: Plan, rows: list[dict], papers: dict[tuple, dict]) -> dict[tuple, Result]:
    found = index_rows(rows)
    results: dict[tuple, Result] = {}
    for run in table.runs:
        row_results = {}
        for cell in (c for c in table.cells if c.run == run):
            row_results[cell.column] = (derive(cell, row_results) if cell.mean_of
                                        else collect_cell(cell, table.seeds_of(cell), plan_, found))
            row_results[cell.column].paper = paper_for(table, cell, papers)
            if not table.transcribed:
                row_results[cell.column].paper_why = NOT_TRANSCRIBED
            results[(run, cell.column)] = row_results[cell.column]
    return results


# -- statistics ---------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    name: str
    differences: list[float]      # first minus second, one per cell both have (seed means)
    statistic: float | None
    p_value: float | None
    interval: tuple[float, float] | None
    paper: str = ""


def signed_rank_test(differences: list[float]) -> tuple[float | None, float | None]:
    """Wilcoxon signed-rank (two-sided; zero differences dropped); None where no difference is non-zero."""
    from scipy.stats import wilcoxon

    if not any(d != 0 for d in differences):
        return None, None
    test = wilcoxon(differences)
    return float(test.statistic), float(test.pvalue)


def bootstrap_interval(differences: list[float], level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap (BCa) `level` interval of the mean difference; None under two values."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(differences) < 2:
        return None
    if min(differences) == max(differences):  # no spread: every resample has the same mean
        return differences[0], differences[0]
    ci = bootstrap((np.asarray(differences),), np.mean, confidence_level=level,
                   rng=np.random.default_rng(seed)).confidence_interval
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):  # BCa undefined on a degenerate sample
        ci = bootstrap((np.asarray(differences),), np.mean, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def compare(table: Table, spec: dict, results: dict[tuple, Result]) -> Comparison:
    columns = spec.get("columns") or [c for c in table.columns
                                       if not results[(table.runs[0], c)].cell.mean_of]
    differences = []
    for first, second in spec["pairs"]:
        for column in columns:
            a, b = results[(first, column)].mean, results[(second, column)].mean
            if a is not None and b is not None:
                differences.append(a - b)
    statistic, p_value = signed_rank_test(differences)
    return Comparison(spec["name"], differences, statistic, p_value, bootstrap_interval(differences),
                      " ".join(str(spec.get("paper", "")).split()))


# -- rendering ----------------------------------------------------------------------------------------------------
DECIMALS = {"percent": 2, "fraction": 3, "raw": 2}


def number(value: float | None, unit: str, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{DECIMALS[unit]}f}" if signed else f"{value:.{DECIMALS[unit]}f}"


def ours_text(r: Result) -> str:
    if not r.values:
        return MISSING
    return number(r.mean, r.cell.unit) + (f" ± {number(r.std, r.cell.unit)}" if r.std is not None else "")


def paper_text(r: Result) -> str:
    if not r.paper:
        return r.paper_why
    return r.paper["value"] + (f" ± {r.paper['paper_std']}" if r.paper.get("paper_std") else "")


def line(table: Table, r: Result) -> list[str]:
    """One cell in the long table: ours, the seeds found of those planned, the paper's, and how they differ."""
    planned = (f"{len(r.values)}/{len(table.seeds_of(r.cell))}" if r.cell.overrides is not None or r.cell.mean_of
               else "–")
    notes = r.notes + ([f"paper: {r.paper['note']}"] if r.paper and r.paper.get("note") else [])
    return [r.cell.run, r.cell.column, ours_text(r), planned, paper_text(r),
            (r.paper.get("verified") or "–") if r.paper else "–", number(r.diff, r.cell.unit, signed=True),
            r.within, "; ".join(notes)]


HEADER = ["run", "column", "ours (mean ± std)", "seeds", "paper", "verified", "diff", "within spread", "notes"]


def grid(table: Table, results: dict[tuple, Result]) -> list[list[str]]:
    """The table in the paper's own layout, each cell `ours / paper` (header first)."""
    def text(r: Result) -> str:
        return f"{ours_text(r) if r.values else '–'} / {paper_text(r) if r.paper or not table.transcribed else '–'}"

    if table.paper_rows == "runs":
        return [["", *table.columns]] + [[run, *(text(results[(run, c)]) for c in table.columns)]
                                         for run in table.runs]
    return [["", *table.runs]] + [[c, *(text(results[(run, c)]) for run in table.runs)] for c in table.columns]


def diverged_runs(results: dict[tuple, Result]) -> list[str]:
    seen = {}
    for r in results.values():
        for row in r.diverged:
            seen[row.get("run_dir", id(row))] = (f"{r.cell.run} / {r.cell.column}: {row.get('method')} "
                                                 f"{row.get('task')} seed {row.get('seed')} ({row.get('run_dir', '')})")
    return sorted(seen.values())


def intro(table: Table) -> list[str]:
    sources = "; ".join(f"{s['paper']}, {s['table']}" for s in table.sources) or "none"
    lines = [(f"Scale: **{table.scale}**. Seeds: {', '.join(map(str, table.seeds))}. Published numbers: {sources} "
              "(results/paper_numbers.csv; verified: yes = read from the repository or page itself, no = "
              "transcribed from the paper's table). Ours: mean ± std over seeds in the paper's unit (percent = "
              "x100). Within spread: |ours - paper| <= the std of our seeds.")]
    if not table.transcribed:
        lines.append(f"The paper's numbers are **{NOT_TRANSCRIBED}**: no row of results/paper_numbers.csv names "
                     f"{sources}. Adding them is a matter of CSV rows alone (docs/reproducing.md).")
    column_seeds = {c.column: c.seeds for c in table.cells if c.seeds}
    if column_seeds:
        lines.append("Seeds per column: " + "; ".join(f"{column}: {', '.join(map(str, s))}"
                                                        for column, s in column_seeds.items()) + ".")
    if table.note:
        lines.append(f"Note: {table.note}")
    if table.scale != "full":
        lines.append("At this scale every run is a tiny random model on a toy task for a few steps: the numbers "
                     "test the pipeline from presets to tables, not the papers.")
    if table.skip:
        lines.append(f"Not run at this scale: {table.skip}.")
    return lines


def comparison_lines(c: Comparison) -> list[str]:
    interval = f"[{c.interval[0]:+.3f}, {c.interval[1]:+.3f}]" if c.interval else "n/a (< 2 pairs)"
    mean = f"{statistics.fmean(c.differences):+.3f}" if c.differences else "–"
    test = (f"{c.statistic:g}", f"{c.p_value:.3g}") if c.statistic is not None else \
        ("n/a", "n/a (no non-zero difference)" if c.differences else "n/a (no cell on both sides)")
    return [c.name, str(len(c.differences)), mean, interval, *test, c.paper or "–"]


COMPARISON_HEADER = ["comparison", "cells", "mean diff", "bootstrap 95% CI", "Wilcoxon W", "p", "paper"]


def markdown(table: Table, results: dict[tuple, Result], comparisons: list[Comparison]) -> str:
    def md_row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    layout = grid(table, results)
    out = [f"# {table.title}", "", *intro(table), "", "## Ours / paper, in the paper's layout", "",
           md_row(layout[0]), md_row(["---"] * len(layout[0])), *map(md_row, layout[1:]), "",
           "## Cell by cell", "", md_row(HEADER), md_row(["---"] * len(HEADER))]
    out += [md_row(line(table, r)) for r in results.values()]
    if comparisons:
        out += ["", "## Paired comparisons (first minus second, over the cells' seed means)", "",
                md_row(COMPARISON_HEADER), md_row(["---"] * len(COMPARISON_HEADER))]
        out += [md_row(comparison_lines(c)) for c in comparisons]
    diverged = diverged_runs(results)
    out += ["", "## Diverged runs (left out of the numbers)", ""] + ([f"- {d}" for d in diverged] or ["none"])
    out += ["", f"Regenerate: `python -m lowrank_bench.reproduce --scale {table.scale} --table {table.name}`", ""]
    return "\n".join(out)


def latex_escape(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}").replace("±", r"$\pm$") \
        .replace("–", "--").replace("→", r"$\to$")


def latex(table: Table, results: dict[tuple, Result], comparisons: list[Comparison]) -> str:
    def tex_row(cells: list[str]) -> str:
        return " & ".join(latex_escape(c) for c in cells) + r" \\"

    layout = grid(table, results)
    out = [f"% {table.title} ({table.scale} scale); needs \\usepackage{{booktabs,longtable}}",
           r"\begin{tabular}{l" + "r" * (len(layout[0]) - 1) + "}", r"\toprule", tex_row(layout[0]), r"\midrule",
           *map(tex_row, layout[1:]), r"\bottomrule", r"\end{tabular}", "",
           r"\begin{longtable}{llrrrlrlp{5cm}}", r"\caption{" + latex_escape(table.title) + r"}\\", r"\toprule",
           tex_row(HEADER), r"\midrule", r"\endhead"]
    out += [tex_row(line(table, r)) for r in results.values()]
    out += [r"\bottomrule", r"\end{longtable}"]
    if comparisons:
        out += [r"\begin{tabular}{lrrrrrp{5cm}}", r"\toprule", tex_row(COMPARISON_HEADER), r"\midrule"]
        out += [tex_row(comparison_lines(c)) for c in comparisons]
        out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


PANELS_ACROSS = 4   # panels per row of a table's figure
PANEL_WIDTH = 3.1   # inches
FIGURE_DPI = 100    # 4 panels and the run labels: at most ~1,500 px wide


def plot(table: Table, results: dict[tuple, Result], path: Path) -> None:
    """A grid of small panels, one per column of the table (its task and measure), one horizontal bar per run:
    ours (mean, the std over seeds as an error bar), the paper's value a red mark; a raw measure spanning more than
    a factor of 100 (perplexities) on a log axis. Run names are read once per row of panels, unrotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    across = min(PANELS_ACROSS, len(table.columns))
    rows = -(-len(table.columns) // across)
    labels = max(len(run) for run in table.runs) * 0.075 + 0.3  # inches for the run names (8 pt)
    fig, axes = plt.subplots(rows, across, squeeze=False, sharey=True,
                             figsize=(labels + across * PANEL_WIDTH, rows * (0.7 + 0.24 * len(table.runs)) + 0.9))
    for ax, column in zip(axes.flat, table.columns):
        panel(ax, column, [results[(run, column)] for run in table.runs])
    for ax in axes.flat[len(table.columns):]:
        ax.set_visible(False)
    axes[0, 0].set_yticks(range(len(table.runs)), table.runs)
    axes[0, 0].invert_yaxis()  # the registry's first run on top
    fig.suptitle(f"{table.title} ({table.scale})", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.8),
               plt.Line2D([], [], color="tab:red", marker="|", linestyle="", markersize=10, markeredgewidth=2)]
    fig.legend(handles, ["ours (mean ± std over seeds)", "paper"], loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)


def panel(ax, column: str, cells: list[Result]) -> None:
    """One column of the table: a bar per run (its position in `cells`), the paper's value marked."""
    import textwrap

    ours = [(y, r.mean, r.std or 0.0) for y, r in enumerate(cells) if r.mean is not None]
    paper = [(y, r.paper_value) for y, r in enumerate(cells) if r.paper_value is not None]
    values = [v for _, v, _ in ours] + [v for _, v in paper]
    unit = cells[0].cell.unit
    if unit == "raw" and values and min(values) > 0 and max(values) > 100 * min(values):
        ax.set_xscale("log")
    if ours:
        ax.barh([y for y, _, _ in ours], [m for _, m, _ in ours], xerr=[s for _, _, s in ours], height=0.6,
                color="tab:blue", alpha=0.8, error_kw={"capsize": 2, "elinewidth": 1})
    if paper:
        ax.plot([v for _, v in paper], [y for y, _ in paper], "|", color="tab:red", markersize=10,
                markeredgewidth=2)
    for y, r in enumerate(cells):
        if r.mean is None:
            ax.text(0.02, y, "missing", transform=ax.get_yaxis_transform(), va="center", fontsize=7, color="0.5")
    ax.set_title(textwrap.fill(column, 30), fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    if unit == "percent" and values and max(values) <= 100:
        ax.set_xlim(0, 100)


def write_table(table: Table, results: dict[tuple, Result], comparisons: list[Comparison], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{table.name}.md").write_text(markdown(table, results, comparisons))
    (output / f"{table.name}.tex").write_text(latex(table, results, comparisons))
    plot(table, results, output / f"{table.name}.png")


def write_index(output: Path, failed: list[str]) -> None:
    """index.md over every table in `output`, those of earlier runs of the command too (`--table t` adds t's line,
    it does not drop the others'): each line read back from the table's own Markdown."""
    lines = ["# Reproduced tables", "", "| table | cells with ours | with the paper's | both | files |",
             "|---|---|---|---|---|"]
    for path in sorted(output.glob("*.md")):
        entry = index_entry(path.read_text())
        if entry:
            title, ours, total, papers, both = entry
            lines.append(f"| {title} | {ours}/{total} | {papers} | {both} | [{path.name}]({path.name}), .tex, .png |")
    lines += ["", "## Failed sweeps", ""] + ([f"- {f}" for f in failed] or ["none"]) + [""]
    (output / "index.md").write_text("\n".join(lines))


def index_entry(text: str) -> tuple[str, int, int, int | str, int] | None:
    """(title, cells with ours, cells, with the paper's or NOT_TRANSCRIBED, both) of a table's Markdown; None for a
    file that is not one."""
    if not text.startswith("# ") or "\n## Cell by cell\n" not in text:
        return None
    block = text.split("\n## Cell by cell\n", 1)[1].split("\n## ", 1)[0]
    cells = [re.split(r"(?<!\\) \| ", row.strip()[2:-2]) for row in block.splitlines()
             if row.startswith("| ") and not row.startswith(("| run |", "| --- |"))]
    ours = [c[2] != MISSING for c in cells]
    paper = [c[4] not in (MISSING, NOT_TRANSCRIBED) for c in cells]
    transcribed = f"The paper's numbers are **{NOT_TRANSCRIBED}**" not in text
    return (text.splitlines()[0][2:], sum(ours), len(cells), sum(paper) if transcribed else NOT_TRANSCRIBED,
            sum(o and p for o, p in zip(ours, paper)))


# -- the command --------------------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise LrbenchError(f"--override {item}: write key=value, e.g. --override task.data_dir=/data/cola")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value) if value else ""
    return out


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2`: integers >= 0, comma-separated; None (the registry's seeds) when not given."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items):
        bad = next(item for item in items if not item.isdigit())
        raise LrbenchError(f"--seeds {text}: {bad!r} is not a seed; give integers >= 0 separated by commas, e.g. "
                           "--seeds 0,1,2")
    return [int(item) for item in items]


def check_inputs(args) -> None:
    """The files and folders the command line names, before anything is composed or run."""
    input_text(args.papers, "published numbers")
    if args.csv and Path(args.csv).exists():  # a results CSV that does not exist yet is made by the runs
        text = input_text(args.csv, "results CSV")
        header = next(csv.reader(io.StringIO(text)), []) if text.strip() else ["method", "model", "task", "seed"]
        if not {"method", "model", "task", "seed"} <= set(header):
            raise LrbenchError(f"--csv {args.csv} is not an lrbench results file (its header lacks method, model, "
                               "task, seed); give the CSV the runs write (LRBENCH_RESULTS_CSV)")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise LrbenchError(f"--output {args.output} is a file; give a folder for the tables")


def check_output(output: Path, given: bool) -> None:
    """The tables' folder can be written (tried, then removed if this made it): found out before any sweep runs,
    not when the tables are written at the end."""
    check_folder(output, f"--output {output}" if given else f"the scale's output folder {output} (or give --output)")


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when every table rendered and every run ran; 1 when a sweep failed or a configuration was
    refused while others ran; 2 (one line) on bad input, including a plan whose every configuration is refused."""
    parser = argparse.ArgumentParser(prog="python -m lowrank_bench.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default=os.environ.get("SCALE") or "full", help="full (default) or smoke")
    parser.add_argument("--table", action="append", help="a table of the registry (repeatable; default: all)")
    parser.add_argument("--collect-only", action="store_true",
                        default=os.environ.get("COLLECT_ONLY", "").lower() in ("1", "true", "yes"),
                        help="run nothing; render from the rows there are (also COLLECT_ONLY=1)")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps that would run, then stop")
    parser.add_argument("--seeds", help="seeds for every selected table, e.g. 0,1,2 (default: the registry's)")
    parser.add_argument("--override", action="append", default=[], help="key=value for every run (repeatable)")
    parser.add_argument("--registry", default=str(REGISTRY))
    parser.add_argument("--papers", default=str(PAPERS), help="the published numbers")
    parser.add_argument("--output", help="where tables go (default: the scale's output in the registry)")
    parser.add_argument("--csv", help="the results CSV (default: <output>/runs.csv)")
    args = parser.parse_args(argv)
    try:
        return reproduce(args)
    except LrbenchError as err:
        return report(err)


def reproduce(args) -> int:
    started = time.perf_counter()
    seeds = parse_seeds(args.seeds)
    check_inputs(args)
    registry = load_registry(Path(args.registry))
    papers = paper_numbers(Path(args.papers))
    tables = [add_published_cells(t, papers)
              for t in plan(registry, args.scale, args.table, seeds, parse_overrides(args.override))]
    if not args.output and "output" not in registry["scales"][args.scale]:
        raise LrbenchError(f"registry scale {args.scale} names no output folder; add `output:` there or give --output")
    output = Path(args.output or work_root() / registry["scales"][args.scale]["output"])
    check_output(output, bool(args.output))
    csv_path = Path(args.csv) if args.csv else output / "runs.csv"
    plan_ = plan_runs(tables, read_rows(csv_path))
    blocks = batches(plan_.pending)
    unique = {key for keys in plan_.keys.values() for key in keys.values()}
    print(f"{len(tables)} table(s) at scale {args.scale}: {len(unique)} run(s), "
          f"{len(plan_.pending)} to do in {len(blocks)} sweep(s); rows: {csv_path}", flush=True)
    for overrides, error in plan_.errors.items():
        print(f"refused before running ({error}): {' '.join(override_args(overrides))}")
    if plan_.errors and not plan_.keys:
        raise LrbenchError(f"every configuration was refused ({len(plan_.errors)}, reasons above); nothing can run: "
                           "fix the presets or the --override values")
    if args.dry_run:
        for block in blocks:
            print("lrbench -m " + " ".join(sweep_command(block)[4:]))
        return 0
    failed = []
    if blocks and not args.collect_only:
        failed = run_sweeps(blocks, csv_path, work_root() / "outputs" / "reproduce" / args.scale)
    rows = read_rows(csv_path)
    for table in tables:
        results = collect(table, plan_, rows, papers)
        comparisons = [compare(table, spec, results) for spec in table.compare]
        write_table(table, results, comparisons, output)
    write_index(output, failed)
    print(f"wrote {len(tables)} table(s) to {output} in {time.perf_counter() - started:.1f} s"
          + (f"; {len(failed)} sweep(s) failed:\n  " + "\n  ".join(failed) if failed else ""))
    if plan_.errors:
        print(f"{len(plan_.errors)} configuration(s) refused before running (listed above): their cells are missing")
    return 1 if failed or plan_.errors else 0


if __name__ == "__main__":
    sys.exit(main())
