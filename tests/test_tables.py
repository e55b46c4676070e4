"""The comparison tables: mean ± std over seeds, and ours next to the published numbers."""
from __future__ import annotations

from rich.console import Console

from lowrank_bench.tables import against_papers, comparison, fmt, where


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
