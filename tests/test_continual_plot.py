"""lrbench-continual-plot: the figure that compares methods on a continual sequence, from handcrafted runs (rows
written by results.append_row, matrices by forgetting.AccuracyMatrix.to_csv, metrics.jsonl lines as a run writes
them): no training."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowrank_bench import continual_plot, forgetting
from lowrank_bench.results import append_row

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["mrpc", "sst2"]
CONFUSION = {"mrpc": [[30, 10], [20, 40]], "sst2": [[45, 5], [5, 45]]}  # majority shares 60/100 and 50/100
# method -> seed -> (R after stage 1 and 2, perplexity before and after each stage)
RUNS = {
    "lora": {0: ([[0.8, None], [0.7, 0.9]], [10.0, 11.0, 12.0]),
             1: ([[0.6, None], [0.5, 0.7]], [20.0, 20.0, 21.0])},
    "curlora": {0: ([[0.75, None], [0.75, 0.65]], [10.0, 10.0, 10.5]),
                1: ([[0.85, None], [0.8, 0.55]], [10.0, 10.2, 10.4])},
}


def write_run(folder: Path, csv_path: Path, method: str, seed: int, R, perplexities, *, records: bool = True,
              **extra) -> dict:
    """One continual run's folder (accuracy_matrix.csv, metrics.jsonl) and its row in the results CSV."""
    folder.mkdir(parents=True)
    matrix = forgetting.AccuracyMatrix(TASKS)
    for i, row in enumerate(R):
        for j, value in enumerate(row):
            if value is not None:
                matrix.record(i, TASKS[j], value)
    matrix.to_csv(folder / "accuracy_matrix.csv")
    if records:
        lines = [{"perplexity_after": "start", "perplexity": perplexities[0], "tokens": 100}] if perplexities else []
        for i, stage in enumerate(TASKS):
            lines += [{"after_stage": stage, "stage_index": i, "task": task, "accuracy": R[i][j],
                       "confusion": CONFUSION[task], "degenerate": False} for j, task in enumerate(TASKS[:i + 1])]
            if perplexities:
                lines.append({"perplexity_after": f"after {stage}", "perplexity": perplexities[i + 1], "tokens": 100})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = matrix.summary()
    row = {"method": method, "model": "tiny-gpt2", "task": "continual/offline", "seed": seed,
           "config_hash": f"{method}-hash", "status": "finished", "metric": "final_average_accuracy",
           "final_average_accuracy": summary["average_accuracy"], "backward_transfer": summary["backward_transfer"],
           "average_forgetting": summary["average_forgetting"],
           "ppl_before": perplexities[0] if perplexities else "", "ppl_after": perplexities[-1] if perplexities else "",
           **{f"final_accuracy_{t}": R[-1][j] for j, t in enumerate(TASKS)},
           "matrix_csv": str(folder / "accuracy_matrix.csv"), "run_dir": str(folder), **extra}
    append_row(csv_path, row)
    return row


@pytest.fixture
def runs_csv(tmp_path) -> Path:
    csv_path = tmp_path / "runs.csv"
    append_row(csv_path, {"method": "lora", "model": "tiny-gpt2", "task": "glue/mrpc", "seed": 0,
                          "config_hash": "single", "status": "finished", "best_accuracy": 0.8})
    for method, seeds in RUNS.items():
        for seed, (R, perplexities) in seeds.items():
            write_run(tmp_path / f"{method}-{seed}", csv_path, method, seed, R, perplexities)
    return csv_path


def axes_by_gid(fig) -> dict:
    return {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}


def legend_texts(fig) -> list[str]:
    """The figure's legend (on its upper subfigure, outside the panels)."""
    return [t.get_text() for sub in fig.subfigs for legend in sub.legends for t in legend.get_texts()]


def lines(ax, prefix: str = "mean:") -> dict:
    return {line.get_gid().removeprefix(prefix): line for line in ax.get_lines()
            if (line.get_gid() or "").startswith(prefix)}


# -- the figure ---------------------------------------------------------------------------------------------------
def test_the_figure_draws_each_methods_mean_per_task_the_perplexity_change_and_a_matrix_per_method(runs_csv):
    groups = continual_plot.load_groups(runs_csv, ["task=continual/offline"])
    assert [(g.label, len(g.runs)) for g in groups] == [("lora", 2), ("curlora", 2)]
    fig = continual_plot.comparison_figure(groups)
    axes = axes_by_gid(fig)
    assert set(axes) == {"task:mrpc", "task:sst2", "perplexity", "matrix:lora", "matrix:curlora"}

    mrpc, sst2 = lines(axes["task:mrpc"]), lines(axes["task:sst2"])
    assert set(mrpc) == set(sst2) == {"lora", "curlora"}  # one line per method in each task panel
    # mrpc after stages 1 and 2: lora (0.8+0.6)/2, (0.7+0.5)/2; curlora (0.75+0.85)/2, (0.75+0.8)/2
    np.testing.assert_allclose(mrpc["lora"].get_ydata(), [0.7, 0.6])
    np.testing.assert_allclose(mrpc["curlora"].get_ydata(), [0.8, 0.775])
    np.testing.assert_allclose(sst2["lora"].get_ydata(), [0.8])  # trained at stage 2: one point
    np.testing.assert_allclose(sst2["curlora"].get_ydata(), [0.6])
    np.testing.assert_allclose(np.round(mrpc["lora"].get_xdata()), [1, 2])
    np.testing.assert_allclose(np.round(sst2["lora"].get_xdata()), [2])
    # the band of a one-point task is an error bar: min-max over the seeds
    bar = next(c for c in axes["task:sst2"].collections if c.get_gid() == "band:lora")
    np.testing.assert_allclose(bar.get_segments()[0][:, 1], [0.7, 0.9])
    for task, share in (("mrpc", 0.6), ("sst2", 0.5)):
        ax = axes[f"task:{task}"]
        assert ax.get_ylim() == (0.0, 1.0)
        np.testing.assert_allclose(lines(ax, "majority")[""].get_ydata(), [share, share])

    ppl = lines(axes["perplexity"])  # 100 * (p / p_before - 1), mean over seeds
    np.testing.assert_allclose(ppl["lora"].get_ydata(), [0.0, (10 + 0) / 2, (20 + 5) / 2])
    np.testing.assert_allclose(ppl["curlora"].get_ydata(), [0.0, (0 + 2) / 2, (5 + 4) / 2])

    for method, expected in (("lora", [[0.7, np.nan], [0.6, 0.8]]), ("curlora", [[0.8, np.nan], [0.775, 0.6]])):
        ax = axes[f"matrix:{method}"]
        (image,) = ax.get_images()
        shown = image.get_array()
        assert shown.mask.tolist() == [[False, True], [False, False]]  # the unseen cell is blank
        np.testing.assert_allclose(shown.filled(np.nan), expected)
        annotated = sorted(float(t.get_text()) for t in ax.texts)  # the seen cells, to 2 decimals
        np.testing.assert_allclose(annotated, sorted(v for v in np.ravel(expected) if not np.isnan(v)), atol=0.005)

    legend = legend_texts(fig)
    assert legend[:2] == ["lora (n=2)", "curlora (n=2)"] and any("min–max over seeds" in t for t in legend)
    assert "majority class" in legend
    assert "continual/offline" in fig._suptitle.get_text() and "tiny-gpt2" in fig._suptitle.get_text()
    assert "mrpc → sst2" in fig._suptitle.get_text()


def test_std_bands_and_no_perplexity_panel_without_perplexities(tmp_path):
    csv_path = tmp_path / "runs.csv"
    for seed, (R, _) in RUNS["lora"].items():
        write_run(tmp_path / f"lora-{seed}", csv_path, "lora", seed, R, [])
    groups = continual_plot.load_groups(csv_path)
    fig = continual_plot.comparison_figure(groups, band="std")
    axes = axes_by_gid(fig)
    assert "perplexity" not in axes and set(axes) == {"task:mrpc", "task:sst2", "matrix:lora"}
    bar = next(c for c in axes["task:sst2"].collections if c.get_gid() == "band:lora")
    std = np.std([0.9, 0.7], ddof=1)
    np.testing.assert_allclose(bar.get_segments()[0][:, 1], [0.8 - std, 0.8 + std])
    assert any("mean ± std over seeds" in t for t in legend_texts(fig))


def test_without_metrics_jsonl_the_perplexity_comes_from_the_row_and_there_is_no_majority_level(tmp_path):
    csv_path = tmp_path / "runs.csv"
    write_run(tmp_path / "run", csv_path, "lora", 0, *RUNS["lora"][0], records=False)
    fig = continual_plot.comparison_figure(continual_plot.load_groups(csv_path))
    axes = axes_by_gid(fig)
    line = lines(axes["perplexity"])["lora"]  # before and after the last stage only: 10 -> 12
    np.testing.assert_allclose(np.round(line.get_xdata()), [0, 2])
    np.testing.assert_allclose(line.get_ydata(), [0.0, 20.0])
    assert not lines(axes["task:mrpc"], "majority") and "majority class" not in legend_texts(fig)


# -- the command --------------------------------------------------------------------------------------------------
def test_the_command_writes_the_png_and_prints_each_methods_summary(runs_csv, tmp_path, capsys):
    out = tmp_path / "figures" / "compare.png"
    assert continual_plot.main([str(runs_csv), "--where", "task=continual/offline", "model=tiny-gpt2",
                                "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]  # no temporary file left
    text = capsys.readouterr().out
    header, *rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[:3]]
    assert header == ["group", "n", "ACC (%)", "BWT (%)", "forgetting (%)", "ppl change (%)"]
    summary = {cells[0]: cells[1:] for cells in rows}
    # lora: ACC 0.8 and 0.6, BWT -0.1 twice, forgetting 0.1 twice, ppl 12/10 - 1 and 21/20 - 1
    assert summary["lora"] == ["2", "70.00 ± 14.14", "-10.00 ± 0.00", "10.00 ± 0.00", "12.50 ± 10.61"]
    # curlora: ACC 0.7 and 0.675, BWT 0 and -0.05, forgetting 0 and 0.05, ppl 5 % and 4 %
    assert summary["curlora"] == ["2", "68.75 ± 1.77", "-2.50 ± 3.54", "2.50 ± 3.54", "4.50 ± 0.71"]


def refused(capsys, *argv) -> str:
    capsys.readouterr()
    assert continual_plot.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lrbench-continual-plot error: "), err
    return err


def test_bad_input_is_one_line_and_exit_status_2(runs_csv, tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert "no such file" in refused(capsys, tmp_path / "absent.csv", "--out", out)
    err = refused(capsys, runs_csv, "--where", "task=glue/mrpc", "--out", out)
    assert "no continual rows" in err and "glue/mrpc" in err
    assert "--where task=continual/none" in refused(capsys, runs_csv, "--where", "task=continual/none", "--out", out)
    assert "no column 'colour'" in refused(capsys, runs_csv, "--where", "colour=red", "--out", out)
    assert "--by methd" in refused(capsys, runs_csv, "--by", "methd", "--out", out)
    assert "--band" in refused(capsys, runs_csv, "--band", "iqr", "--out", out)
    err = refused(capsys, runs_csv, "--by", "model", "--out", out)  # lora and curlora: not seeds of one setting
    assert "2 configurations" in err and "--where method=" in err
    assert "not a figure format" in refused(capsys, runs_csv, "--out", tmp_path / "compare.pngx")
    (tmp_path / "curlora-0" / "accuracy_matrix.csv").write_text("stage,mrpc\n1,0.5\n")
    assert "is not after_stage,<task>" in refused(capsys, runs_csv, "--out", out)
    (tmp_path / "curlora-0" / "accuracy_matrix.csv").write_text("after_stage,mrpc,sst2\n1,half,\n")
    assert "curlora-0/accuracy_matrix.csv:2" in refused(capsys, runs_csv, "--out", out)
    (tmp_path / "lora-1" / "accuracy_matrix.csv").unlink()
    err = refused(capsys, runs_csv, "--out", out)
    assert "accuracy matrix of lora seed 1" in err and "no such file" in err
    assert not out.exists()


def test_runs_of_two_sequences_are_refused(tmp_path, capsys):
    csv_path = tmp_path / "runs.csv"
    write_run(tmp_path / "a", csv_path, "lora", 0, *RUNS["lora"][0])
    write_run(tmp_path / "b", csv_path, "lora", 1, *RUNS["lora"][1], task="continual/toy")
    err = refused(capsys, csv_path, "--out", tmp_path / "x.png")
    assert "2 continual tasks" in err and "--where task=" in err


def test_python_m_refuses_a_missing_file_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lowrank_bench.continual_plot", str(tmp_path / "absent.csv")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such file" in done.stderr


def test_two_methods_sharing_seeds_get_a_paired_difference_and_t_test(runs_csv, tmp_path, capsys):
    assert continual_plot.main([str(runs_csv), "--where", "task=continual/offline", "--out",
                                str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "paired over seeds 0, 1: curlora - lora" in text
    # ACC differences per seed: 0.7 - 0.8 = -0.1, 0.675 - 0.6 = +0.075; mean -1.25 points; t = -0.0125 / (0.12374 /
    # sqrt 2) = -0.1429 with 1 degree of freedom (a Cauchy): p = 1 - 2 atan(0.1429) / pi = 0.910
    assert "ACC (%): -1.25 (paired t-test p = 0.91, n = 2)" in text
    # BWT: 0 - (-0.1) = 0.1, -0.05 - (-0.1) = 0.05; mean +7.5; t = 0.075 / 0.025 = 3: p = 1 - 2 atan(3) / pi = 0.205
    assert "BWT (%): +7.50 (paired t-test p = 0.205, n = 2)" in text


def test_no_paired_lines_for_one_group(runs_csv):
    groups = continual_plot.load_groups(runs_csv, ["task=continual/offline", "method=lora"])
    assert continual_plot.paired_lines(groups) == []
