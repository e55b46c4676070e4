"""The Markdown tables of results/reference/continual/README.md, from the runs' rows, matrices and metrics.jsonl
(read through lrbench-continual-plot's loaders): per model and method, the diagonal cells R[i][i] beside each task's
majority class, the mean accuracy matrix, ACC / BWT / forgetting (mean ± std over seeds), the perplexity before
and after every task, wall time and peak memory.

    python results/reference/continual/report.py results/reference/continual/runs.csv
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

from lowrank_bench import continual_plot, tables


def pm(values, scale=100.0, digits=2) -> str:
    values = [v * scale for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def column(group, name) -> list[float]:
    return tables.numbers([tables.with_derived(run.row) for run in group.runs], name)


def report(csv_path: Path) -> str:
    out = []
    for model in ("minilm-l6", "smollm2-135m"):
        try:
            groups = continual_plot.load_groups(csv_path, [f"model={model}"])
        except Exception:  # noqa: BLE001 (a model without runs yet)
            continue
        tasks = groups[0].runs[0].tasks
        out.append(f"### {model}\n")
        out.append("| method | seeds | " + " | ".join(f"R[{t}][{t}] (majority)" for t in tasks)
                   + " | ACC | BWT | forgetting | wall time per run (s) | peak memory (MB) |")
        out.append("|---" * (len(tasks) + 7) + "|")
        for g in groups:
            cells = []
            for j, t in enumerate(tasks):
                majority = statistics.fmean(r.majority[t] for r in g.runs if t in r.majority)
                cells.append(f"{pm([r.matrix[j, j] for r in g.runs])} ({majority * 100:.1f})")
            seeds = ",".join(sorted(str(r.row["seed"]) for r in g.runs))
            out.append(f"| {g.label} | {seeds} | " + " | ".join(cells) + f" | {pm(column(g, 'final_average_accuracy'))}"
                       f" | {pm(column(g, 'backward_transfer'))} | {pm(column(g, 'average_forgetting'))}"
                       f" | {pm(column(g, 'wall_time_s'), 1, 0)} | {pm(column(g, 'peak_mem_mb'), 1, 0)} |")
        out.append("\nMean accuracy matrix (%), R[i][j]: task j after training stage i:\n")
        out.append("| method | after | " + " | ".join(tasks) + " |")
        out.append("|---" * (len(tasks) + 2) + "|")
        for g in groups:
            for i, t in enumerate(tasks):
                row = [pm([r.matrix[i, j] for r in g.runs]) if j <= i else "" for j in range(len(tasks))]
                out.append(f"| {g.label if i == 0 else ''} | {i + 1}: {t} | " + " | ".join(row) + " |")
        if any(r.perplexities for g in groups for r in g.runs):
            out.append("\nWikiText-2 perplexity (raw test, first 1,024 tokens, one window), mean ± std over seeds:\n")
            out.append("| method | before | " + " | ".join(f"after {t}" for t in tasks) + " | change |")
            out.append("|---" * (len(tasks) + 3) + "|")
            for g in groups:
                curve = [pm([r.perplexities[k] for r in g.runs if r.perplexities], 1, 2) for k in range(len(tasks) + 1)]
                out.append(f"| {g.label} | " + " | ".join(curve) + f" | {pm(column(g, 'ppl_change'), 100, 1)} % |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "results/reference/continual/runs.csv")))
