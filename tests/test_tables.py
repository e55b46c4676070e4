"""The comparison tables: mean ± std over seeds, and ours next to the published numbers."""
from __future__ import annotations

import pytest
from rich.console import Console

from lowrank_bench.tables import against_papers, comparison, fmt, metric_value, unit_scale, where


def render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_mean_and_std_over_seeds():
    assert fmt([0.8, 0.9]) == "85.00 ± 7.07"
    assert fmt([0.5]) == "50.00" and fmt([]) == "–"
    rows = [{"task": "glue/rte", "model": "m", "method": "lora", "trainable_params": "10", "time_per_step_ms": "2",
             "best_accuracy": str(v)} for v in (0.6, 0.7)]
    assert "65.00 ± 7.07" in render(comparison(rows))


def test_against_papers_joins_on_method_model_task_and_metric():
    rows = [{"task": "glue/cola", "model": "roberta-base", "method": "bidora", "best_matthews_correlation": "0.61"}]
    paper = [{"source": "BiDoRA Table 1", "method": "bidora", "model": "roberta-base", "task": "glue/cola",
              "metric": "matthews_correlation", "value": "61.3"},
             {"source": "BiDoRA Table 1", "method": "bidora", "model": "roberta-base", "task": "glue/rte",
              "metric": "accuracy", "value": "76.0"}]
    text = render(against_papers(rows, paper))
    assert "61.00" in text and "61.3" in text and "76.0" not in text


def test_two_learning_rates_are_two_configurations_and_a_duplicate_seed_is_flagged():
    def row(lr, seed, config, accuracy):
        return {"task": "glue/mrpc", "model": "minilm-l6", "method": "lora", "trainable_params": "10",
                "time_per_step_ms": "2", "lr": lr, "seed": seed, "config_hash": config, "best_accuracy": accuracy}

    rows = [row("0.001", "0", "aaaa1111", "0.80"), row("0.001", "1", "aaaa1111", "0.82"),
            row("0.001", "1", "aaaa1111", "0.84"), row("0.0001", "0", "bbbb2222", "0.70")]
    text = render(comparison(rows, show=["lr"]))
    lines = [line for line in text.splitlines() if "glue/mrpc" in line]
    assert len(lines) == 2  # one line per configuration, not one averaged over both rates
    assert any("0.001" in line and "2 (seed 1 ×2)" in line and "82.00 ± 2.00" in line for line in lines)
    assert any("0.0001" in line and "70.00" in line for line in lines)
    assert [r["seed"] for r in where(rows, ["lr=1e-3", "seed=1"])] == ["1", "1"]


def test_published_numbers_in_fractions_and_raw_units_are_compared_in_their_unit():
    rows = [{"task": "continual/curlora", "model": "gpt2-large", "method": "curlora", "final_accuracy_mrpc": "0.7",
             "ppl_after": "28.5"}]
    paper = [{"source": "CURLoRA Table 2", "method": "curlora", "model": "gpt2-large", "task": "continual/curlora",
              "metric": "final_accuracy_mrpc", "value": "0.70", "unit": "fraction", "table": "Table 2",
              "row": "MRPC (after S140)"},
             {"source": "CURLoRA Table 2", "method": "curlora", "model": "gpt2-large", "task": "continual/curlora",
              "metric": "ppl_after", "value": "28.25", "unit": "raw"}]
    text = render(against_papers(rows, paper))
    assert "0.70" in text and "28.50" in text and "70.00" not in text and "Table 2 MRPC (after S140)" in text


def test_a_rows_value_is_its_best_evaluation_else_its_own_column_and_blank_is_none():
    assert metric_value({"best_accuracy": "0.8", "accuracy": "0.1"}, "accuracy") == 0.8
    assert metric_value({"ppl_before": "5.44"}, "ppl_before") == 5.44
    assert metric_value({"best_pearson": ""}, "pearson") is None
    assert (unit_scale(None), unit_scale("fraction"), unit_scale("raw")) == (100.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        unit_scale("permille")
