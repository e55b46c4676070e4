"""The comparison tables: mean ± std over seeds, and ours next to the published numbers."""
from __future__ import annotations

from rich.console import Console

from lowrank_bench.tables import against_papers, comparison, fmt


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
