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


# -- every metric in its own unit ------------------------------------------------------------------------------------
def grid(text: str) -> dict[str, dict[str, str]]:
    """A printed comparison as {task: {heading: cell}}, from its header line (┃) and its rows (│)."""
    header = next(line for line in text.splitlines() if line.startswith("┃") and "task" in line)
    names = [cell.strip() for cell in header.strip("┃").split("┃")]
    out = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            out[cells[0]] = dict(zip(names, cells))
    return out


def test_a_mixed_results_csv_prints_every_metric_in_its_own_unit(tmp_path, capsys):
    from lowrank_bench import tables
    from lowrank_bench.results import append_row

    csv_path = tmp_path / "runs.csv"
    common = {"model": "m", "trainable_params": "1000", "time_per_step_ms": "12.5", "status": "finished"}
    for seed, accuracy in ((0, 0.8725), (1, 0.8775)):
        append_row(csv_path, {"method": "lora", "task": "glue/mrpc", "seed": seed, **common,
                              "best_accuracy": accuracy, "best_f1": 0.9061, "best_step": 40})
    append_row(csv_path, {"method": "lora", "task": "ner/conll2003", "seed": 0, **common, "best_f1": 0.8428,
                          "best_precision": 0.8323, "best_step": 40})
    append_row(csv_path, {"method": "lora", "task": "e2e", "seed": 0, **common, "best_BLEU": 0.6812,
                          "best_NIST": 1.7102, "best_METEOR": 0.4512, "best_ROUGE_L": 0.7034, "best_CIDEr": 2.3039})
    append_row(csv_path, {"method": "lora", "task": "sft/law", "seed": 0, **common, "best_eval_loss": 10.312,
                          "best_perplexity": 30092.0, "best_token_accuracy": 0.0421})
    append_row(csv_path, {"method": "curlora", "task": "continual/offline", "seed": 0, **common,
                          "metric": "final_average_accuracy", "final_average_accuracy": 0.5538,
                          "backward_transfer": 0.0016667, "average_forgetting": -0.0033, "ppl_before": 15.1959,
                          "ppl_after": 15.2676, "final_accuracy_mrpc": 0.635, "degenerate": False})
    capsys.readouterr()
    assert tables.main([str(csv_path)]) == 0
    text = capsys.readouterr().out
    cells = grid(text)
    assert cells["glue/mrpc"]["accuracy (%)"] == "87.50 ± 0.35" and cells["glue/mrpc"]["f1 (%)"] == "90.61 ± 0.00"
    assert cells["ner/conll2003"]["f1 (%)"] == "84.28" and cells["ner/conll2003"]["precision (%)"] == "83.23"
    e2e = cells["e2e"]
    assert (e2e["BLEU (%)"], e2e["METEOR (%)"], e2e["ROUGE_L (%)"]) == ("68.12", "45.12", "70.34")
    assert (e2e["NIST"], e2e["CIDEr"]) == ("1.71", "2.30")  # raw: never x100
    sft = cells["sft/law"]
    assert (sft["perplexity"], sft["eval_loss"], sft["token_accuracy (%)"]) == ("30,092.00", "10.31", "4.21")
    continual = cells["continual/offline"]
    assert continual["final_average_accuracy (%)"] == "55.38" and continual["backward_transfer (%)"] == "0.17"
    assert continual["average_forgetting (%)"] == "-0.33" and continual["final_accuracy_mrpc (%)"] == "63.50"
    assert (continual["ppl_before"], continual["ppl_after"]) == ("15.20", "15.27")
    assert continual["accuracy (%)"] == "–" and cells["glue/mrpc"]["perplexity"] == "–"
    assert "3,009,200" not in text and "1031.20" not in text and "171.02" not in text and "…" not in text


def test_each_metric_has_one_declared_kind_whatever_its_split_or_column_prefix():
    from lowrank_bench import metric_kinds
    from lowrank_bench.e2e_metrics import METRICS as E2E
    from lowrank_bench.tasks.ner import METRICS as NER

    fraction, raw = metric_kinds.FRACTION, metric_kinds.RAW
    assert [metric_kinds.kind(m) for m in E2E] == [fraction, raw, fraction, fraction, raw]
    assert {metric_kinds.kind(f"best_{m}") for m in NER} == {fraction}
    assert metric_kinds.kind("best_matched_accuracy") == fraction and metric_kinds.kind("last_test_NIST") == raw
    assert metric_kinds.kind("search_best_accuracy") == fraction
    assert metric_kinds.kind("final_accuracy_sst2") == fraction
    assert metric_kinds.kind("best_perplexity") == raw and metric_kinds.kind("ppl_after") == raw
    assert metric_kinds.kind("best_mystery") is None
    assert tables_number(0.8725, fraction) == "87.25" and tables_number(30092.0, raw) == "30,092.00"
    assert tables_number(0.0123, raw) == "0.0123" and tables_number(0.0123, None) == "0.0123"


def tables_number(value, kind):
    from lowrank_bench.tables import number

    return number(value, kind)


def test_a_continual_configuration_shows_acc_bwt_forgetting_and_the_perplexity_change_over_its_seeds(tmp_path,
                                                                                                      capsys):
    from lowrank_bench import tables
    from lowrank_bench.results import append_row

    csv_path = tmp_path / "runs.csv"
    # two seeds of one configuration: ACC 0.8 / 0.6, BWT -0.1 / -0.05, forgetting 0.1 / 0.05, ppl 10 -> 12, 20 -> 21
    for seed, acc, bwt, forgot, before, after in ((0, 0.8, -0.1, 0.1, 10.0, 12.0), (1, 0.6, -0.05, 0.05, 20.0, 21.0)):
        append_row(csv_path, {"method": "curlora", "model": "gpt2", "task": "continual/offline", "seed": seed,
                              "config_hash": "abcd1234", "status": "finished", "metric": "final_average_accuracy",
                              "final_average_accuracy": acc, "backward_transfer": bwt, "average_forgetting": forgot,
                              "forgetting_mrpc": forgot, "ppl_before": before, "ppl_after": after,
                              "final_accuracy_mrpc": acc - 0.1, "matrix_csv": "accuracy_matrix.csv"})
    append_row(csv_path, {"method": "lora", "model": "gpt2", "task": "glue/mrpc", "seed": 0, "best_accuracy": 0.9})
    capsys.readouterr()
    assert tables.main([str(csv_path)]) == 0
    text = capsys.readouterr().out
    cells = grid(text)
    continual = cells["continual/offline"]
    assert continual["seeds"] == "2"
    # percent points: mean of 80 and 60 is 70, sample std sqrt(2 * 10^2) = 14.14; BWT -7.50 ± 3.54
    assert continual["final_average_accuracy (%)"] == "70.00 ± 14.14"
    assert continual["backward_transfer (%)"] == "-7.50 ± 3.54"
    assert continual["average_forgetting (%)"] == "7.50 ± 3.54"
    # perplexities as they are; the change per run, 12/10 - 1 = 20 % and 21/20 - 1 = 5 %, then 12.50 ± 10.61
    assert (continual["ppl_before"], continual["ppl_after"]) == ("15.00 ± 7.07", "16.50 ± 6.36")
    assert continual["ppl_change (%)"] == "12.50 ± 10.61" and cells["glue/mrpc"]["ppl_change (%)"] == "–"
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert header.index("ppl_after") < header.index("ppl_change (%)") < header.index("final_accuracy_mrpc (%)")
    # a derived measure can be asked for by name, as any column of the file
    assert tables.main([str(csv_path), "--metric", "ppl_change", "--where", "task=continual/offline"]) == 0
    assert grid(capsys.readouterr().out)["continual/offline"]["ppl_change (%)"] == "12.50 ± 10.61"
