"""One figure that compares methods on a continual sequence, from the rows of a results CSV.

    lrbench-continual-plot [results/runs.csv] --out compare.png [--where task=continual/offline model=gpt2 ...]
        [--by method] [--band minmax | std]

The continual rows (those with a `matrix_csv`: `lrbench task=continual/<name>` writes one per run) that pass the
`--where` filters (as `python -m lowrank_bench.tables --where`) are grouped by `--by` (default: the method; several
columns comma-separated, e.g. `--by method,lr`), each group's runs being its seeds. The figure holds

- one panel per task of the sequence: that task's accuracy after each stage from the one that trains it (x: after
  stage 1..T), one line per group, the mean over its runs, with a shaded band (min–max over the runs, or mean ± std
  with `--band std`; the figure says which); the task's majority-class share dotted (from the confusion matrices
  in the runs' metrics.jsonl: the largest true-class count over the total); y in [0, 1];
- when the runs measured perplexities: the perplexity's relative change from before the first stage, in percent,
  per group (mean and band), from the `perplexity_after` lines of metrics.jsonl (else the row's ppl_before and
  ppl_after only);
- the accuracy matrices R[i][j] (task j after stage i) as heatmaps side by side, one per group, the mean over its
  runs, each cell annotated, unseen cells blank.

The legend sits outside the data and gives each group's number of runs; the title names the sequence, its tasks
and the model. The figure is written atomically. A text summary follows on stdout: per group, the final average
accuracy (ACC), backward transfer (BWT) and average forgetting in percent points and the perplexity change in
percent, mean ± std over the runs, and n; with two groups that share seeds, each measure's mean paired difference
and a paired t-test over the seeds.

A group whose runs have different configurations (several `config_hash` values: e.g. two learning rates, or two
models) is refused rather than averaged: filter with `--where` or add the column that tells them apart to `--by`.
Bad input (a missing or foreign CSV, a `--where`/`--by` column it lacks, no continual rows left, a missing or
malformed matrix file, runs of different sequences) is one line, exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowrank_bench import forgetting, metric_kinds, tables
from lowrank_bench.errors import LrbenchError, choices, input_text, report

PROG = "lrbench-continual-plot"
BANDS = {"minmax": "min–max over seeds", "std": "mean ± std over seeds"}


@dataclass
class Run:
    """One continual run: its row, its accuracy matrix (T x T, NaN where unseen), its perplexities (before the
    first stage, then after each: T + 1 values, None where not measured; [] when none) and each task's
    majority-class share (where its confusion matrix is known)."""

    row: dict
    tasks: list[str]
    matrix: np.ndarray
    perplexities: list[float | None]
    majority: dict[str, float]


@dataclass
class Group:
    label: str
    runs: list[Run]


# -- reading ------------------------------------------------------------------------------------------------------
def continual_rows(path: Path, conditions: list[str]) -> list[dict]:
    """The finished continual rows of the results CSV at `path` that pass every `--where` condition."""
    header, rows = tables.load_rows(path, "results CSV", tables.RESULT_COLUMNS)
    tables.check_where(conditions, header, path)
    rows = tables.select(rows, conditions, path)
    kept = [r for r in rows if (r.get("matrix_csv") or "").strip() and r.get("status") != "diverged"]
    if not kept:
        tasks = sorted({str(r.get("task", "")) for r in rows})
        raise LrbenchError(f"results CSV {path}: no continual rows (with a matrix_csv) among the {len(rows)} row(s) "
                           f"kept{' by --where ' + ' '.join(conditions) if conditions else ''} (tasks there: "
                           f"{', '.join(tasks) or 'none'}); give the CSV of `lrbench task=continual/...` runs")
    return kept


def matrix_path(row: dict, csv_path: Path) -> Path:
    """The row's matrix file: as written, or, when relative and absent from here, beside the results CSV."""
    path = Path(row["matrix_csv"].strip())
    if not path.is_absolute() and not path.exists():
        return csv_path.parent / path
    return path


def read_matrix(path: Path, row: dict) -> tuple[list[str], np.ndarray]:
    """`after_stage,<task1>,...` (forgetting.AccuracyMatrix.to_csv) as the task names and a T x T array, NaN where
    a cell is blank (unseen) or a stage is not done."""
    what = f"accuracy matrix of {row.get('method')} seed {row.get('seed')} (matrix_csv)"
    lines = list(csv.reader(io.StringIO(input_text(path, what), newline="")))
    if not lines or lines[0][:1] != ["after_stage"] or len(lines[0]) < 2:
        raise LrbenchError(f"{what} {path}: its header is not after_stage,<task>,...; give the accuracy_matrix.csv "
                           "of a continual run")
    tasks = lines[0][1:]
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    for number, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue  # a blank line
        try:
            stage = int(cells[0]) - 1
            values = [float(c) if c.strip() else np.nan for c in cells[1:]]
        except (ValueError, IndexError):
            raise LrbenchError(f"{what} {path}:{number}: {','.join(cells)!r} is not a stage number and accuracies; "
                               "give the accuracy_matrix.csv of a continual run") from None
        if not 0 <= stage < len(tasks) or len(values) != len(tasks):
            raise LrbenchError(f"{what} {path}:{number}: stage {stage + 1} with {len(values)} value(s); give stages "
                               f"1..{len(tasks)} with one value per task ({len(tasks)})")
        matrix[stage] = values
    return tasks, matrix


def read_records(folder: Path) -> list[dict]:
    """The JSON lines of the run's metrics.jsonl; [] when the file is absent (the figure then goes without what
    only it holds: the majority levels and the perplexity after each stage)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in input_text(path, "metrics file").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed writer: the rest still counts
        if isinstance(record, dict):
            records.append(record)
    return records


def majority_levels(records: list[dict]) -> dict[str, float]:
    """Each task's majority-class share (forgetting.majority_share: the largest true-class count over the total),
    from its first evaluation line (`after_stage`, `task`, `confusion`)."""
    out: dict[str, float] = {}
    for record in records:
        task = record.get("task")
        if "after_stage" in record and task not in out and record.get("confusion") is not None:
            share = forgetting.majority_share(record["confusion"])
            if share is not None:
                out[task] = share
    return out


def perplexity_curve(records: list[dict], row: dict, tasks: list[str]) -> list[float | None]:
    """The perplexity before the first stage and after each (T + 1 values, None where not measured), from the
    `perplexity_after` lines ("start", "after <task>"); without them the row's ppl_before and ppl_after; [] when
    the run measured none."""
    slots = {"start": 0, **{f"after {task}": i + 1 for i, task in enumerate(tasks)}}
    curve: list[float | None] = [None] * (len(tasks) + 1)
    for record in records:
        if record.get("perplexity_after") in slots and record.get("perplexity") is not None:
            curve[slots[record["perplexity_after"]]] = float(record["perplexity"])
    if curve[0] is None:
        before, after = tables.numbers([row], "ppl_before"), tables.numbers([row], "ppl_after")
        curve = [before[0] if before else None] + [None] * (len(tasks) - 1) + [after[0] if after else None]
    return curve if curve[0] is not None and any(p is not None for p in curve[1:]) else []


def load_run(row: dict, csv_path: Path) -> Run:
    path = matrix_path(row, csv_path)
    tasks, matrix = read_matrix(path, row)
    records = read_records(path.parent)
    return Run(row, tasks, matrix, perplexity_curve(records, row, tasks), majority_levels(records))


def check_one_sequence(runs: list[Run]) -> None:
    """Every run trained the same tasks in the same order (one figure, one x axis)."""
    names = sorted({str(r.row.get("task")) for r in runs})
    if len(names) > 1:
        raise LrbenchError(f"the rows hold {len(names)} continual tasks ({', '.join(names)}); choose one with "
                           f"--where task=<one of them>")
    for run in runs[1:]:
        if run.tasks != runs[0].tasks:
            raise LrbenchError(f"{run.row.get('method')} seed {run.row.get('seed')} trained {run.tasks} but "
                               f"{runs[0].row.get('method')} seed {runs[0].row.get('seed')} {runs[0].tasks}; "
                               "choose runs of one sequence with --where")


def group_runs(runs: list[Run], by: list[str]) -> list[Group]:
    """One group per value of the `by` columns, in order of first appearance; a group of several configurations
    (config_hash) is refused: its runs are not seeds of one setting."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(str(run.row.get(k, "")) for k in by), []).append(run)
    out = []
    for key, members in groups.items():
        label = " ".join(key)
        configs = sorted({r.row.get("config_hash") or "" for r in members})
        if len(configs) > 1:
            raise LrbenchError(f"--by {','.join(by)}: group {label!r} holds {len(configs)} configurations "
                               f"(config_hash {', '.join(c[:8] or '–' for c in configs)}), not seeds of one; "
                               f"{differing_hint([r.row for r in members])}")
        out.append(Group(label, members))
    return out


#: the row columns that most often tell two configurations apart (named in the refusal of a mixed group)
SETTINGS = ("method", "model", "rank", "lr", "batch_size", "precision", "train_steps")


def differing_hint(rows: list[dict]) -> str:
    differ = [c for c in SETTINGS if len({str(r.get(c, "")) for r in rows}) > 1]
    if not differ:
        return "filter with --where <column>=<value>, or add the column that differs to --by"
    values = ", ".join(sorted({str(r.get(differ[0], "")) for r in rows}))
    return (f"they differ in {', '.join(differ)}: filter with --where {differ[0]}=<one of {values}>, or add "
            f"{differ[0]} to --by")


# -- statistics ---------------------------------------------------------------------------------------------------
def spread(values: np.ndarray, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and band (low, high) over the first axis (the runs), NaN entries left out: min–max, or mean ± the
    sample std (0 with one run)."""
    values = np.asarray(values, dtype=float)
    counts = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(values, axis=0)
        mean = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
        if band == "minmax":
            filled_low = np.where(np.isnan(values), np.inf, values).min(axis=0)
            filled_high = np.where(np.isnan(values), -np.inf, values).max(axis=0)
            return mean, np.where(counts > 0, filled_low, np.nan), np.where(counts > 0, filled_high, np.nan)
        squares = np.nansum((values - mean) ** 2, axis=0)
        std = np.where(counts > 1, np.sqrt(squares / np.maximum(counts - 1, 1)), 0.0)
    return mean, mean - std, mean + std


def mean_matrix(group: Group) -> np.ndarray:
    return spread(np.stack([run.matrix for run in group.runs]), "minmax")[0]


def perplexity_changes(group: Group) -> np.ndarray | None:
    """Each run's relative change from before the first stage, 100 * (p / p0 - 1), one row per run that measured
    perplexities (NaN where not measured); None when none did."""
    curves = [run.perplexities for run in group.runs if run.perplexities]
    if not curves:
        return None
    return np.array([[np.nan if p is None else 100.0 * (p / curve[0] - 1.0) for p in curve] for curve in curves])


def legend_label(group: Group) -> str:
    return f"{group.label} (n={len(group.runs)})"


# -- the figure ---------------------------------------------------------------------------------------------------
def comparison_figure(groups: list[Group], band: str = "minmax", title: str = ""):
    """The comparison as a matplotlib Figure (not attached to pyplot: nothing to close). Axes carry gids for
    readers and tests: `task:<name>` (one per task), `perplexity` (when any run measured it), `matrix:<label>` (one
    per group); in a task or perplexity panel each group's mean line has the gid `mean:<label>` (its x the stage
    plus a small offset per group, `dodge`), its band `band:<label>`, the majority level `majority`."""
    from matplotlib.figure import Figure

    tasks = groups[0].runs[0].tasks
    changes = {g.label: perplexity_changes(g) for g in groups}
    with_ppl = any(c is not None for c in changes.values())
    top_panels = len(tasks) + with_ppl
    fig = Figure(figsize=(max(3.4 * max(top_panels, len(groups)), 8.0) + 2.5, 7.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.15])
    axes = np.atleast_1d(top.subplots(1, top_panels))
    styles = {g.label: Style(f"C{i % 10}", dodge(i, len(groups))) for i, g in enumerate(groups)}
    for j, task in enumerate(tasks):
        draw_task(axes[j], j, tasks, groups, styles, band)
    if with_ppl:
        draw_perplexity(axes[-1], tasks, groups, changes, styles, band)
    with_majority = any(run.majority for g in groups for run in g.runs)
    top.legend(handles=legend_handles(groups, styles, band, with_majority), loc="outside right upper",
               fontsize="small")
    draw_matrices(bottom, tasks, groups)
    fig.suptitle(title or default_title(groups))
    return fig


@dataclass
class Style:
    """A group's colour, and how far its points sit beside the stage's x (so that bars and points of groups with
    equal values stay apart)."""

    colour: str
    offset: float


def dodge(index: int, count: int) -> float:
    step = min(0.06, 0.4 / count)
    return (index - (count - 1) / 2) * step


def stage_ticks(ax, tasks: list[str], with_before: bool = False) -> None:
    labels = [f"{i + 1}: {task}" for i, task in enumerate(tasks)]
    start = 0 if with_before else 1
    ax.set_xticks(range(start, len(tasks) + 1), (["before"] if with_before else []) + labels)
    ax.set_xlim(start - 0.4, len(tasks) + 0.4)
    ax.tick_params(axis="x", labelrotation=30, labelsize="small")
    ax.set_xlabel("after stage")
    ax.grid(alpha=0.3)


def draw_band(ax, xs, mean, low, high, style: Style, label: str) -> None:
    """The group's mean line and its band, beside the stages' x by the group's offset: shaded between points, an
    error bar where a task has one point only."""
    xs = xs + style.offset
    ax.plot(xs, mean, marker="o", color=style.colour, label=label, gid=f"mean:{label}")
    if len(xs) > 1:
        ax.fill_between(xs, low, high, color=style.colour, alpha=0.2, linewidth=0, gid=f"band:{label}")
    else:
        ax.errorbar(xs, mean, yerr=[mean - low, high - mean], fmt="none", ecolor=style.colour, elinewidth=2,
                    capsize=4, gid=f"band:{label}")


def draw_task(ax, j: int, tasks: list[str], groups: list[Group], styles: dict, band: str) -> None:
    """Task j's accuracy after stages j+1..T, per group; its majority-class share dotted (mean over the runs that
    know it: the same evaluation rows give the same share)."""
    xs = np.arange(j + 1, len(tasks) + 1)
    for group in groups:
        mean, low, high = spread(np.stack([run.matrix[j:, j] for run in group.runs]), band)
        seen = ~np.isnan(mean)
        if seen.any():
            draw_band(ax, xs[seen], mean[seen], low[seen], high[seen], styles[group.label], group.label)
    shares = [run.majority[tasks[j]] for g in groups for run in g.runs if tasks[j] in run.majority]
    if shares:
        ax.axhline(statistics.fmean(shares), color="0.3", linestyle=":", linewidth=1.5, label="_majority",
                   gid="majority")
    ax.set_gid(f"task:{tasks[j]}")
    ax.set_title(f"{tasks[j]} (trained at stage {j + 1})", fontsize="medium")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    stage_ticks(ax, tasks)


def draw_perplexity(ax, tasks: list[str], groups: list[Group], changes: dict, styles: dict, band: str) -> None:
    xs = np.arange(len(tasks) + 1)
    for group in groups:
        if changes[group.label] is None:
            continue
        mean, low, high = spread(changes[group.label], band)
        seen = ~np.isnan(mean)
        draw_band(ax, xs[seen], mean[seen], low[seen], high[seen], styles[group.label], group.label)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_gid("perplexity")
    ax.set_title("perplexity change from before", fontsize="medium")
    ax.set_ylabel("perplexity change (%)")
    stage_ticks(ax, tasks, with_before=True)


def draw_matrices(subfigure, tasks: list[str], groups: list[Group]) -> None:
    """One heatmap per group: the mean R[i][j] over its runs on [0, 1], each seen cell annotated, unseen blank."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    axes = np.atleast_1d(subfigure.subplots(1, len(groups)))
    image = None
    for ax, group in zip(axes, groups):
        R = mean_matrix(group)
        image = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(R):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                        color="black" if value > 0.6 else "white")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize="small")
        ax.set_yticks(range(len(tasks)), [f"after {i + 1}" for i in range(len(tasks))], fontsize="small")
        ax.set_xlabel("task")
        ax.set_title(f"accuracy matrix: {legend_label(group)}", fontsize="medium")
        ax.set_gid(f"matrix:{group.label}")
    subfigure.colorbar(image, ax=list(axes), label="accuracy (mean over seeds)", shrink=0.9)


def legend_handles(groups: list[Group], styles: dict, band: str, with_majority: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=styles[g.label].colour, marker="o", label=legend_label(g)) for g in groups]
    handles.append(Patch(facecolor="0.5", alpha=0.3, label=f"line: mean; band: {BANDS[band]}"))
    if with_majority:
        handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=1.5, label="majority class"))
    return handles


def default_title(groups: list[Group]) -> str:
    rows = [run.row for g in groups for run in g.runs]
    sequence = min(str(r.get("task")) for r in rows)
    models = ", ".join(sorted({str(r.get("model")) for r in rows}))
    return f"{sequence}: {' → '.join(groups[0].runs[0].tasks)} · {models}"


def save(fig, path: Path) -> None:
    """The figure to `path`, atomically, in the format its suffix names (.png, .pdf, .svg, ...)."""
    formats = fig.canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise LrbenchError(f"--out {path}: {'.' + suffix if suffix else 'no suffix'} is not a figure format; valid: "
                           f"{choices('.' + f for f in formats)}")
    if path.is_dir():
        raise LrbenchError(f"--out {path} is a folder; give a file name such as {path / 'compare.png'}")
    try:  # the temporary name keeps the suffix: matplotlib picks the format from it
        forgetting.write_atomically(path, path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}"),
                         lambda tmp: fig.savefig(tmp, dpi=120))
    except OSError as err:
        raise LrbenchError(f"--out {path}: cannot be written ({err.strerror}); give a writable path") from None


# -- the text summary ---------------------------------------------------------------------------------------------
SUMMARY = (("ACC (%)", "final_average_accuracy"), ("BWT (%)", "backward_transfer"),
           ("forgetting (%)", "average_forgetting"), ("ppl change (%)", "ppl_change"))


def summary_lines(groups: list[Group]) -> list[str]:
    """Per group: ACC, BWT and forgetting in percent points, the perplexity change in percent, mean ± std over its
    runs (tables.fmt_measure), and n."""
    width = max(len("group"), *(len(g.label) for g in groups))
    lines = [f"{'group':<{width}}  {'n':>3}  " + "  ".join(f"{name:>16}" for name, _ in SUMMARY)]
    for group in groups:
        rows = [tables.with_derived(run.row) for run in group.runs]
        cells = [tables.fmt_measure(tables.numbers(rows, column), metric_kinds.FRACTION) for _, column in SUMMARY]
        lines.append(f"{group.label:<{width}}  {len(rows):>3}  " + "  ".join(f"{c:>16}" for c in cells))
    return lines


def paired_lines(groups: list[Group]) -> list[str]:
    """Two groups whose runs share seeds: per measure, the mean difference (second minus first) over the shared
    seeds and a paired t-test's two-sided p-value (scipy's ttest_rel; seeds are the pairs: same data order and
    heads). Nothing for other group counts or fewer than two shared seeds."""
    if len(groups) != 2:
        return []
    seeded = [{run.row.get("seed"): tables.with_derived(run.row) for run in g.runs} for g in groups]
    seeds = sorted(set(seeded[0]) & set(seeded[1]), key=str)
    if len(seeds) < 2:
        return []
    from scipy import stats

    first, second = (g.label for g in groups)
    lines = [f"paired over seeds {', '.join(map(str, seeds))}: {second} - {first}"]
    for name, column in SUMMARY:
        pairs = []
        for seed in seeds:
            x, y = (tables.numbers([runs[seed]], column) for runs in seeded)
            if x and y:
                pairs.append((x[0], y[0]))
        if len(pairs) < 2:
            continue
        diffs = [y - x for x, y in pairs]
        p = stats.ttest_rel(*zip(*pairs)).pvalue if len(set(diffs)) > 1 else float("nan")
        lines.append(f"  {name}: {statistics.fmean(diffs) * 100:+.2f} (paired t-test p = {p:.3g}, n = {len(pairs)})")
    return lines


# -- the command --------------------------------------------------------------------------------------------------
def load_groups(path: Path, where: list[str] = (), by: str = "method") -> list[Group]:
    """The continual runs of the results CSV at `path` kept by `where`, grouped by the `by` columns."""
    rows = continual_rows(path, list(where))
    columns = [k.strip() for k in by.split(",") if k.strip()]
    if not columns:
        raise LrbenchError(f"--by {by!r}: give one or more columns, comma-separated, e.g. --by method")
    for key in columns:
        tables.check_column(key, list(rows[0]), "--by", path)
    runs = [load_run(row, path) for row in rows]
    check_one_sequence(runs)
    return group_runs(runs, columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", default="results/runs.csv", help="the results CSV (default: %(default)s)")
    parser.add_argument("--where", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="keep rows with key=value (several, or repeated)")
    parser.add_argument("--by", default="method", help="the column(s) that make a line, comma-separated")
    parser.add_argument("--band", default="minmax", help=f"the band around each mean: {', '.join(BANDS)}")
    parser.add_argument("--title", default="", help="the figure's title (default: the sequence, tasks and model)")
    parser.add_argument("--out", default="continual_compare.png", help="the figure file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.band not in BANDS:
            raise LrbenchError(f"--band {args.band}; valid: {choices(BANDS)}")
        groups = load_groups(Path(args.csv), args.where, args.by)
        save(comparison_figure(groups, args.band, args.title), Path(args.out))
    except LrbenchError as err:
        return report(err, PROG)
    print("\n".join(summary_lines(groups) + paired_lines(groups)))
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
