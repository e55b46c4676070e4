"""`python -m lowrank_bench.reproduce`: presets -> runs -> rows -> rendered tables, the skipping of finished runs,
the statistics, and the cells that have no value."""
from __future__ import annotations

import csv
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lowrank_bench import reproduce
from lowrank_bench.reproduce import (
    Result,
    batches,
    bootstrap_interval,
    hydra_value,
    load_registry,
    plan,
    plan_runs,
    signed_rank_test,
)
from lowrank_bench.results import read_rows

PAPER = {"paper": "Paper X", "table": "Table 9"}
NLG = {"paper": "Paper X", "table": "Table 10"}
SMOKE = {"model": "tiny-roberta", "task": "toy/sentiment", "task.max_train_samples": 32,
         "task.max_eval_samples": 32}
REGISTRY = {
    "scales": {
        "full": {"output": "unused", "overrides": {}},
        "smoke": {"output": "unused", "seeds": [0, 1],
                  "overrides": {"trainer.max_steps": 2, "trainer.batch_size": 8, "trainer.eval_batch_size": 32,
                                "trainer.eval_every": None, "trainer.progress": False, "save_adapter": False}},
    },
    "tables": {
        "glue": {
            "title": "A GLUE-like table", "sources": [PAPER], "seeds": [0, 1, 2], "unit": "percent",
            "columns": {"MRPC": {"task": "mrpc", "metric": "accuracy"},
                        "RTE": {"task": "rte", "metric": "accuracy"},
                        "Avg": {"mean_of": ["MRPC", "RTE"]}},
            "runs": {"LoRA": {"experiment": "lora/roberta_base_{task}", "method": "lora"},
                     "DoRA": {"experiment": "lora/roberta_base_{task}", "method": "dora"},
                     "Adapter": {"paper_only": "no Adapter method here"}},
            "compare": [{"name": "DoRA vs LoRA", "pairs": [["DoRA", "LoRA"]]}],
            "smoke": {"columns": ["MRPC"], "metric": "accuracy", "overrides": SMOKE},
        },
        "nlg": {
            "title": "A table whose family cannot run here", "sources": [NLG], "seeds": [110], "unit": "percent",
            "columns": {"BLEU": {"metric": "BLEU"}},
            "runs": {"LoRA": {"experiment": "lora/gpt2_medium_e2e"}},
            "smoke": {"skip": "no E2E data offline"},
        },
    },
}
PAPERS = [("LoRA", "MRPC", "88.0"), ("LoRA", "RTE", "70.0"), ("LoRA", "Avg", "79.0"), ("DoRA", "MRPC", "89.0"),
          ("Adapter", "MRPC", "87.0"), ("LoRA", "BLEU", "70.4")]
PAPER_FIELDS = ["source", "method", "model", "task", "metric", "value", "paper", "table", "row", "column", "unit",
                "paper_std", "verified", "note"]


def write_papers(path: Path, cells: list[tuple[str, str, str]]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, PAPER_FIELDS)
        writer.writeheader()
        for row, column, value in cells:
            writer.writerow({**(NLG if column == "BLEU" else PAPER), "row": row, "column": column, "value": value,
                             "unit": "percent", "verified": "no", "source": "test", "method": row.lower()})


@pytest.fixture
def setup(tmp_path):
    registry = tmp_path / "tables.yaml"
    registry.write_text(yaml.safe_dump(REGISTRY, sort_keys=False))
    papers = tmp_path / "papers.csv"
    write_papers(papers, PAPERS)
    out = tmp_path / "tables"
    args = ["--scale", "smoke", "--registry", str(registry), "--papers", str(papers), "--output", str(out)]
    return args, out


def md_line(text: str, run: str, column: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {run} | {column} |"))


def test_smoke_pipeline_runs_renders_and_a_second_invocation_skips_finished_runs(setup, monkeypatch, capsys):
    args, out = setup
    started = time.perf_counter()
    assert reproduce.main(args) == 0
    first = time.perf_counter() - started
    rows = read_rows(out / "runs.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [("dora", "0"), ("dora", "1"), ("lora", "0"), ("lora", "1")]
    for name in ("glue", "nlg"):
        for suffix in (".md", ".tex", ".png"):
            assert (out / f"{name}{suffix}").stat().st_size > 0
    text = (out / "glue.md").read_text()
    lora = md_line(text, "LoRA", "MRPC").split(" | ")
    mean = np.mean([float(r["best_accuracy"]) for r in rows if r["method"] == "lora"]) * 100
    assert lora[2].startswith(f"{mean:.2f} ± ") and lora[3] == "2/2" and lora[4] == "88.0"
    assert f"{mean - 88.0:+.2f}" in lora[6]
    assert "| Adapter | MRPC | missing | – | 87.0 |" in text and "no Adapter method here" in text
    assert "missing" in md_line(text, "LoRA", "RTE") and "not in the smoke scale's subset" in md_line(text, "LoRA", "RTE")
    assert md_line(text, "LoRA", "Avg").split(" | ")[2] == "missing"  # needs RTE too
    assert "| DoRA vs LoRA | 1 |" in text
    nlg = (out / "nlg.md").read_text()
    assert "| LoRA | BLEU | missing | – | 70.4 |" in nlg and "no E2E data offline" in nlg
    tex = (out / "glue.tex").read_text()
    assert r"\begin{longtable}" in tex and "88.0" in tex and r"$\pm$" in tex

    def no_runs(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(reproduce.subprocess, "run", no_runs)
    capsys.readouterr()
    started = time.perf_counter()
    assert reproduce.main(args) == 0
    second = time.perf_counter() - started
    assert "0 to do in 0 sweep(s)" in capsys.readouterr().out
    assert second < first / 2, (first, second)
    assert (out / "glue.md").read_text() == text


def planned_keys(args) -> dict:
    """The smoke plan's row keys per configuration, as lrbench would write them (method, model, task, seed,
    config hash): rows without training."""
    registry = load_registry(Path(args[args.index("--registry") + 1]))
    return plan_runs(plan(registry, "smoke"), rows=[]).keys


def row_for(key, **values) -> dict:
    method, model, task, seed, config_hash = key
    return {"method": method, "model": model, "task": task, "seed": seed, "config_hash": config_hash,
            "status": "finished", "degenerate": "False", **values}


def test_finished_and_diverged_rows_are_not_run_again_and_render_flagged(setup, tmp_path, monkeypatch):
    args, out = setup
    keys = planned_keys(args)
    (lora_mrpc,) = [ov for ov in keys if dict(ov)["method"] == "lora"]
    (dora_mrpc,) = [ov for ov in keys if dict(ov)["method"] == "dora"]
    rows = [row_for(keys[lora_mrpc][0], best_accuracy="0.80", degenerate="True"),
            row_for(keys[lora_mrpc][1], best_accuracy="nan", status="diverged", run_dir="/runs/diverged"),
            row_for(keys[dora_mrpc][0], best_accuracy="0.90"), row_for(keys[dora_mrpc][1], best_accuracy="0.70")]
    out.mkdir()
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("a finished run started again"))
    assert reproduce.main(args) == 0  # every planned run has its row (a diverged one counts as done)
    text = (out / "glue.md").read_text()
    lora = md_line(text, "LoRA", "MRPC").split(" | ")
    assert lora[2:8] == ["80.00", "1/2", "88.0", "no", "-8.00", "n/a (1 seed)"]
    assert "degenerate (one class predicted): 1 of 1" in lora[8] and "1 diverged run(s) left out" in lora[8]
    dora = md_line(text, "DoRA", "MRPC").split(" | ")
    assert dora[2:8] == ["80.00 ± 14.14", "2/2", "89.0", "no", "-9.00", "yes"]
    assert "/runs/diverged" in text.split("## Diverged runs")[1]
    assert "| LoRA | 80.00 / 88.0 | – / 70.0 | – / 79.0 |" in text  # the paper's layout

    rows.pop()  # DoRA's seed 1 is gone: --collect-only renders what there is and runs nothing
    (out / "runs.csv").write_text("")
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    assert reproduce.main([*args, "--collect-only"]) == 0
    assert md_line((out / "glue.md").read_text(), "DoRA", "MRPC").split(" | ")[2:4] == ["90.00", "1/2"]


def test_every_published_number_of_a_registry_table_lands_in_one_of_its_cells():
    registry = load_registry(reproduce.REGISTRY)
    papers = reproduce.paper_numbers()
    used = set()
    for table in plan(registry, "full"):
        for cell in table.cells:
            found = reproduce.paper_for(table, cell, papers)
            if found:
                used.add((found["paper"], found["table"], found["row"], found["column"]))
                assert Result(cell, paper=found).paper_value is not None
    sources = {(s["paper"], s["table"]) for spec in registry["tables"].values() for s in spec["sources"]}
    orphans = [key for key in papers if key[:2] in sources and key not in used]
    assert not orphans
    assert len(used) > 300


def test_signed_rank_test_matches_the_exact_distribution_enumerated_by_hand():
    differences = [1.5, -0.5, 2.0, 3.0, -4.0, 2.5]
    statistic, p_value = signed_rank_test(differences)
    ranks = {d: r for r, d in enumerate(sorted(differences, key=abs), 1)}  # no ties here
    w_plus = sum(ranks[d] for d in differences if d > 0)
    w_minus = sum(ranks[d] for d in differences if d < 0)
    assert statistic == min(w_plus, w_minus)
    n = len(differences)
    sums = [sum(r for r, sign in zip(range(1, n + 1), signs) if sign) for signs in itertools.product([0, 1], repeat=n)]
    exact = 2 * sum(s <= statistic for s in sums) / len(sums)
    assert p_value == pytest.approx(exact)
    assert signed_rank_test([0.0, 0.0]) == (None, None)


def test_bootstrap_interval_is_the_mean_for_constant_differences_and_about_the_normal_interval_otherwise():
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_interval([1.0]) is None
    sample = list(np.random.default_rng(1).normal(2.0, 1.0, size=400))
    low, high = bootstrap_interval(sample)
    half = 1.96 * np.std(sample, ddof=1) / math.sqrt(len(sample))
    assert low == pytest.approx(np.mean(sample) - half, abs=0.03)
    assert high == pytest.approx(np.mean(sample) + half, abs=0.03)


def test_pending_runs_merge_into_exact_cartesian_sweeps():
    grid = [{"experiment": e, "method": m, "seed": s} for e in ("a", "b") for m in ("lora", "dora") for s in (0, 1)]
    assert batches(grid) == [{"experiment": ["a", "b"], "method": ["lora", "dora"], "seed": [0, 1]}]
    pending = grid[:5] + [{"experiment": "c", "method": "lora", "method.r": 4, "seed": 0}]
    swept = [dict(zip(b, values)) for b in batches(pending) for values in itertools.product(*b.values())]
    assert sorted(map(repr, swept)) == sorted(map(repr, pending))  # every run once, nothing extra


def test_override_values_read_back_as_the_same_values():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in (None, True, 4, 2.5e-4, 1.0, "glue/mrpc", "README.md", "a b, c", "it's", [1, 2]):
        parsed = parser.parse_override(f"key={hydra_value(value)}").value()
        assert parsed == value, (value, hydra_value(value))


def test_dry_run_prints_the_sweeps_and_runs_nothing(setup, monkeypatch, capsys):
    args, out = setup
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("--dry-run ran something"))
    assert reproduce.main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "4 run(s), 4 to do in 1 sweep(s)" in printed
    assert "lrbench -m experiment=lora/roberta_base_mrpc method=lora,dora" in printed and "seed=0,1" in printed
    assert not out.exists()


def test_a_published_row_the_registry_lacks_is_added_and_a_table_without_numbers_says_not_transcribed(setup, monkeypatch):
    args, out = setup
    papers = Path(args[args.index("--papers") + 1])
    # a paper's numbers added later, as CSV rows alone: a row and a column tables.yaml does not list; Table 10's
    # numbers gone (not transcribed yet)
    write_papers(papers, [c for c in PAPERS if c[1] != "BLEU"] + [("VeRA", "MRPC", "86.5"), ("LoRA", "QQP", "90.1")])
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("--collect-only ran something"))
    assert reproduce.main([*args, "--collect-only"]) == 0
    text = (out / "glue.md").read_text()
    vera = md_line(text, "VeRA", "MRPC").split(" | ")
    assert vera[2:5] == ["missing", "–", "86.5"] and "published only" in vera[8]
    assert md_line(text, "LoRA", "QQP").split(" | ")[2:5] == ["missing", "–", "90.1"]
    assert md_line(text, "VeRA", "RTE").split(" | ")[4] == "missing"  # the paper prints no such cell
    assert "| LoRA | – / 88.0 | – / 70.0 | – / 79.0 | – / 90.1 |" in text  # QQP joins the paper's layout
    nlg = (out / "nlg.md").read_text()
    assert md_line(nlg, "LoRA", "BLEU").split(" | ")[2:5] == ["missing", "–", "not transcribed"]
    assert "The paper's numbers are **not transcribed**" in nlg and "| LoRA | – / not transcribed |" in nlg
    index = (out / "index.md").read_text()
    assert "| A table whose family cannot run here | 0/1 | not transcribed | 0 |" in index
    assert "| A GLUE-like table | 0/16 | 7 | 0 |" in index  # (3 runs + VeRA) x (MRPC, RTE, Avg + QQP); 7 published


def test_a_column_sets_its_own_seeds_and_a_variant_row_is_compared_with_the_papers_row(tmp_path):
    registry = yaml.safe_load(yaml.safe_dump(REGISTRY))
    spec = registry["tables"]["glue"]
    spec["columns"]["RTE"]["seeds"] = [0, 1, 2, 3]
    spec["runs"]["DoRA (variant)"] = {"experiment": "lora/roberta_base_{task}", "method": "dora",
                                      "method.r": 4, "paper_row": "DoRA"}
    full = {(c.run, c.column): c for c in plan(registry, "full", ["glue"])[0].cells}
    assert [plan(registry, "full", ["glue"])[0].seeds_of(full[("LoRA", c)]) for c in ("MRPC", "RTE")] == \
        [[0, 1, 2], [0, 1, 2, 3]]
    smoke = plan(registry, "smoke", ["glue"])[0]
    assert {tuple(smoke.seeds_of(c)) for c in smoke.cells} == {(0, 1)}  # the scale's seeds win
    forced = plan(registry, "full", ["glue"], seeds=[7])[0]
    assert {tuple(forced.seeds_of(c)) for c in forced.cells} == {(7,)}  # so do --seeds
    variant = full[("DoRA (variant)", "MRPC")]
    assert dict(variant.overrides) == {"experiment": "lora/roberta_base_mrpc", "method": "dora", "method.r": 4}
    papers = {(PAPER["paper"], PAPER["table"], row, column): {"value": value, "unit": "percent"}
              for row, column, value in PAPERS}
    table = plan(registry, "full", ["glue"])[0]
    assert reproduce.paper_for(table, variant, papers)["value"] == "89.0"  # DoRA's published MRPC
    assert reproduce.paper_for(table, full[("DoRA", "MRPC")], papers)["value"] == "89.0"


PAPERLESS = ("bilora_glue", "cola_domains", "lotr_glue")   # their papers' tables could not be read


def test_bilora_cola_and_lotr_have_tables_at_both_scales_whose_paper_cells_say_not_transcribed():
    registry = load_registry(reproduce.REGISTRY)
    papers = reproduce.paper_numbers()
    for scale in ("full", "smoke"):
        tables = [reproduce.add_published_cells(t, papers) for t in plan(registry, scale, list(PAPERLESS))]
        for table in tables:
            assert not table.transcribed and not table.skip, table.name
            runnable = [c for c in table.cells if c.overrides is not None]
            assert runnable, (table.name, scale)
            assert not any(reproduce.paper_for(table, c, papers) for c in table.cells)
        if scale == "smoke":  # every smoke configuration composes and passes lrbench's checks
            assert plan_runs(tables, rows=[]).errors == {}
    lotr = {(c.run, c.column): c for c in plan(registry, "full", ["lotr_glue_ranks"])[0].cells}
    table = plan(registry, "full", ["lotr_glue_ranks"])[0]
    assert lotr[("LoTR r=8", "MRPC")].metric == "f1"  # the repository's MRPC values: most likely F1
    assert {tuple(table.seeds_of(c)) for c in table.cells} == {(0, 1, 2)}  # every repository value: a mean of 2-3 runs
    assert dict(lotr[("LoRA r=8", "MRPC")].overrides)["method.init_a"] == "kaiming_fan_rank"
    assert "F1" in table.note
    lotr_paper = plan(registry, "full", ["lotr_glue"])[0]
    assert {c.overrides for c in lotr_paper.cells} == {c.overrides for c in lotr.values()}  # the same runs


def test_bidora_tables_compare_the_official_rows_and_carry_table_4():
    registry = load_registry(reproduce.REGISTRY)
    papers = reproduce.paper_numbers()
    table = plan(registry, "full", ["bidora_glue"])[0]
    cells = {(c.run, c.column): c for c in table.cells}
    official = cells[("R_l BiDoRA (official)", "MNLI")]
    assert dict(official.overrides)["method.orientation"] == "official"
    assert dict(official.overrides)["trainer.precision"] == "fp32"  # the official runs never autocast
    assert dict(official.overrides)["method.bilevel.perturb"] == "whole_model" and official.metric == \
        "matched_mismatched_accuracy"
    assert reproduce.paper_for(table, official, papers)["value"] == "90.6"  # the paper's R_l BiDoRA MNLI
    assert papers[("BiDoRA (arXiv 2410.09758)", "Table 1", "R_l BiDoRA", "MNLI")]["metric"] == \
        "matched_mismatched_accuracy"
    protein = reproduce.add_published_cells(plan(registry, "smoke", ["bidora_protein"])[0], papers)
    found = [reproduce.paper_for(protein, c, papers) for c in protein.cells]
    assert len(protein.cells) == 4 * 12 and all(found) and all(c.overrides is None for c in protein.cells)
    assert found[protein.cells.index(next(c for c in protein.cells if (c.run, c.column) == ("BiDoRA", "MIC MSE")))][
        "value"] == "0.2818"


# -- figures and the index -------------------------------------------------------------------------------------------
def drawn_figures(monkeypatch) -> list:
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
    return figures


@pytest.mark.parametrize("name", ["bidora_glue", "bidora_protein", "curlora_gpt2"])
def test_a_tables_figure_is_a_grid_of_panels_at_most_1600_px_wide_with_unrotated_labels(name, tmp_path, monkeypatch):
    from matplotlib.image import imread

    papers = reproduce.paper_numbers()
    (table,) = [reproduce.add_published_cells(t, papers) for t in plan(load_registry(reproduce.REGISTRY), "full",
                                                                       [name])]
    results = {(c.run, c.column): Result(c, values={0: 40.0 + i % 7, 1: 41.0 + i % 5} if i % 4 else {},
                                         paper=reproduce.paper_for(table, c, papers))
               for i, c in enumerate(table.cells)}
    figures = drawn_figures(monkeypatch)
    reproduce.plot(table, results, tmp_path / "t.png")
    height, width = imread(tmp_path / "t.png").shape[:2]
    assert width <= 1600 and height <= 1600, (width, height)
    panels = [ax for ax in figures[0].axes if ax.get_visible()]
    assert [ax.get_title().replace("\n", " ") for ax in panels] == table.columns  # one panel per column
    labels = [t for ax in panels for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert all(t.get_rotation() == 0 for t in labels)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == table.runs
    assert min(t.get_fontsize() for t in labels) >= 7


def test_a_single_table_run_keeps_the_other_tables_in_the_index(setup, monkeypatch):
    args, out = setup
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("--collect-only ran something"))
    assert reproduce.main([*args, "--collect-only", "--table", "glue"]) == 0
    assert reproduce.main([*args, "--collect-only", "--table", "nlg"]) == 0
    index = (out / "index.md").read_text()
    assert "| A GLUE-like table | 0/9 | 5 | 0 | [glue.md](glue.md), .tex, .png |" in index
    assert "| A table whose family cannot run here | 0/1 | 1 | 0 | [nlg.md](nlg.md), .tex, .png |" in index
    (out / "notes.md").write_text("# Notes\n\nnot a table\n")
    assert reproduce.main([*args, "--collect-only", "--table", "glue"]) == 0
    assert "Notes" not in (out / "index.md").read_text() and "nlg.md" in (out / "index.md").read_text()
