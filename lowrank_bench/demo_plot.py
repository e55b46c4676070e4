"""Accuracy against trainable parameters, one point per method, from a results CSV: the picture `make demo` ends with.

    python -m lowrank_bench.demo_plot outputs/demo/runs.csv outputs/demo/accuracy_vs_params.png [--baseline 0.723]

x: `trainable_params` (log scale: full fine-tuning trains ~300x more than LoRA), y: `last_accuracy`, the mean over
the rows of one method (the demo has one seed each; several seeds draw their spread as an error bar). Rows that did
not finish (`status` other than finished) are left out and listed; a degenerate row (every prediction one class)
is drawn hollow and says so in the legend, since its accuracy is the share of that class. A dashed line marks the
accuracy of always predicting the majority class, the number a method must beat: read from the evaluated classes
(`last_confusion` in the runs' summary.json, when every run was evaluated on the same examples), or `--baseline X`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from lowrank_bench.errors import LrbenchError
from lowrank_bench.results import read_rows


def points(rows: list[dict], metric: str = "last_accuracy") -> dict[str, dict]:
    """method -> {params, values, degenerate}, over the finished rows that carry the metric."""
    out: dict[str, dict] = {}
    for row in rows:
        finished = row.get("status", "finished") in ("", "finished")
        if not finished or not row.get(metric) or not row.get("trainable_params"):
            continue
        point = out.setdefault(row["method"], {"params": int(float(row["trainable_params"])), "values": [],
                                               "degenerate": False})
        point["values"].append(float(row[metric]))
        point["degenerate"] |= str(row.get("degenerate")).lower() == "true"
    return out


def majority_share(rows: list[dict]) -> float | None:
    """The accuracy of always predicting the most frequent evaluated class, from the runs' confusion matrices (rows:
    true labels); None when a run has none, or when the runs were evaluated on different class counts."""
    shares = set()
    for row in rows:
        summary = Path(row.get("run_dir") or "") / "summary.json"
        try:
            confusion = json.loads(summary.read_text()).get("last_confusion")
        except (OSError, ValueError):
            return None
        if not confusion:
            return None
        counts = [sum(true_row) for true_row in confusion]
        shares.add((max(counts), sum(counts)))
    if len(shares) != 1:
        return None
    top, total = shares.pop()
    return top / total if total else None


def plot(rows: list[dict], path: Path, metric: str = "last_accuracy", baseline: float | None = None,
         title: str = "") -> dict[str, dict]:
    """Draw the figure into `path` (PNG, written to a temporary name and renamed); returns the points drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    drawn = points(rows, metric)
    if not drawn:
        raise LrbenchError(f"no finished row with {metric} and trainable_params to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:
        for i, (method, point) in enumerate(sorted(drawn.items(), key=lambda kv: kv[1]["params"])):
            values, color = point["values"], f"C{i}"
            mean = statistics.fmean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            label = f"{method} ({point['params']:,} trained)" + (" degenerate" if point["degenerate"] else "")
            ax.errorbar(point["params"], mean, yerr=spread or None, fmt="o", markersize=9, capsize=4, color=color,
                        markerfacecolor="none" if point["degenerate"] else color, label=label)
        if baseline is not None:
            ax.axhline(baseline, color="0.4", linestyle="--", linewidth=1,
                       label=f"majority class ({baseline:.1%})")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize="small")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.png")  # keeps .png: matplotlib picks the format from it
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowrank_bench.demo_plot", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="a results CSV (LRBENCH_RESULTS_CSV)")
    parser.add_argument("png", type=Path, help="the figure to write")
    parser.add_argument("--metric", default="last_accuracy", help="the column on the y axis (default: last_accuracy)")
    parser.add_argument("--baseline", type=float, default=None,
                        help="the majority class's accuracy (default: read from the runs' summary.json)")
    parser.add_argument("--title", default="", help="a title for the figure")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if not rows:
        raise SystemExit(f"{args.csv}: no rows")
    baseline = args.baseline if args.baseline is not None else majority_share(
        [r for r in rows if r.get("status", "finished") in ("", "finished")])
    try:
        drawn = plot(rows, args.png, args.metric, baseline, args.title)
    except LrbenchError as err:
        raise SystemExit(str(err)) from None
    left_out = sorted({r["method"] for r in rows} - set(drawn))
    print(f"wrote {args.png}: {', '.join(sorted(drawn))}" + (f" (left out, not finished: {', '.join(left_out)})"
                                                               if left_out else ""))


if __name__ == "__main__":
    main()
