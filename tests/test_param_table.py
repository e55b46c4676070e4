"""Exact trainable-parameter counts on the papers' models, from their architectures on the meta device (no weights),
against the numbers the papers print (results/paper_params.csv)."""
from __future__ import annotations

import csv

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.param_table import PAPER_PARAMS, comparison, count, main, read_paper_params


@pytest.mark.parametrize("model, method, overrides, adapter", [
    ("roberta-base", "lora", ["method.r=8"], 12 * 2 * 8 * (768 + 768)),                       # 294,912
    ("roberta-base", "bidora", ["method.r=4"], 12 * 2 * 4 * (768 + 768) + 12 * 2 * 768),        # 165,888: 0.17M
    ("mistral-7b", "curlora", ["method.r=16", "method.targets=qkv"], 32 * 3 * 16 ** 2),         # 24,576
    ("mistral-7b", "lora", ["method.r=16", "method.targets=qkv"], 32 * 16 * (8192 + 5120 + 5120)),  # 9,437,184
    ("roberta-base", "lotr", ["method.r=8"], 1536 * 8 + 24 * 8 ** 2),                          # one L and R, 24 cores
    ("gpt2-large", "lora", ["method.r=8", "method.targets=qkv"], 36 * 8 * (1280 + 3840)),      # the fused c_attn
])
def test_counts_on_the_meta_device_are_the_closed_forms(model, method, overrides, adapter):
    counted = count(model, method, overrides)
    assert counted["adapter"] == adapter
    if model == "roberta-base":  # the classifier apart: dense 768x768 + 768 and out_proj 768x2 + 2
        assert counted["head"] == 768 * 768 + 768 + 768 * 2 + 2
    if model == "mistral-7b":
        assert counted["head"] == 0 and counted["total"] == 7_248_023_552 + adapter  # the paper's full FT count


def test_every_paper_count_is_counted_as_recorded_and_every_mismatch_says_why():
    table, checked = comparison(read_paper_params(PAPER_PARAMS))
    assert table.row_count == len(checked) == 61  # every #Params cell the papers print, none left out
    assert not [r for r in checked if r["problem"]]  # each verdict is the one the CSV records
    verdicts = {status: sum(r["verdict"] == status for r in checked) for status in ("match", "mismatch", "not counted")}
    assert verdicts == {"match": 16, "mismatch": 22, "not counted": 23}
    for row in checked:
        if row["verdict"] != "match":
            assert row["reason"], row
        if row["table"].startswith("repository data/table"):  # LoTR's table: +1,536 at every rank, both methods
            assert int(row["params"]) - row["ours"] == 1536


def row_of(checked: list[dict], paper: str, row: str) -> dict:
    (found,) = [r for r in checked if r["paper"].startswith(paper) and r["row"] == row]
    return found


def test_bidora_large_counts_contradict_the_printed_039m_and_the_docstring_count_of_lotr_matches():
    _, checked = comparison(read_paper_params(PAPER_PARAMS))
    lora, dora, bidora = (row_of(checked, "BiDoRA", f"R_l {m}") for m in ("LoRA", "DoRA", "BiDoRA"))
    assert lora["ours"] == 24 * 2 * 4 * (1024 + 1024) == 393_216 and lora["verdict"] == "match"
    for row in (dora, bidora):  # the magnitudes (one per output feature of q and v) make 0.44M, not 0.39M
        assert row["ours"] == 393_216 + 24 * 2 * 1024 == 442_368
        assert row["params"] == "0.39" and row["verdict"] == "mismatch" and "49,152" in row["reason"]
    assert row_of(checked, "BiDoRA", "R_b DoRA")["verdict"] == "match"  # 165,888: 0.17M
    assert row_of(checked, "LoTR", "LoTR r=2 adapter")["ours"] == 1536 * 2 + 24 * 2 ** 2 == 595_298 - 592_130
    assert row_of(checked, "LoTR", "LoTR r=2 total")["ours"] == 124_650_338  # the docstring's total, exactly
    gpt2_m = row_of(checked, "LoRA", "GPT-2 M LoRA")  # the E2E cell: 0.35M printed, q and v at r=4 make 0.39M
    assert gpt2_m["ours"] == 24 * (2 * 4 * 1024 + 2 * 1024 * 4) and gpt2_m["verdict"] == "mismatch"


def write_params(path, rows: list[dict]) -> None:
    fields = ["paper", "table", "row", "model", "method", "overrides", "counted", "params", "unit", "decimals",
              "suffix", "verified", "status", "reason", "source"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows({f: r.get(f, "") for f in fields} for r in rows)


def test_a_mismatch_recorded_as_a_match_or_without_a_reason_is_flagged_and_fails_the_command(tmp_path, capsys):
    base = {"paper": "Paper X", "table": "T1", "model": "roberta-base", "method": "lora", "overrides": "method.r=8",
            "counted": "adapter", "unit": "1000000", "decimals": "2", "suffix": "M"}
    rows = [{**base, "row": "claimed match", "params": "0.39", "status": "match"},            # ours 0.29M
            {**base, "row": "bare mismatch", "params": "0.39", "status": "mismatch"},         # no reason
            {**base, "row": "true match", "params": "0.29", "status": "match"},
            {**base, "row": "explained", "params": "0.39", "status": "mismatch", "reason": "the paper's rounding"},
            {**base, "row": "no model", "model": "", "method": "", "params": "1.0", "status": "not counted",
             "reason": "no such model here"}]
    path = tmp_path / "params.csv"
    write_params(path, rows)
    _, checked = comparison(read_paper_params(path))
    problems = {r["row"]: r["problem"] for r in checked}
    assert problems == {"claimed match": "recorded as match, counted as mismatch",
                        "bare mismatch": "a mismatch without a reason", "true match": "", "explained": "",
                        "no model": ""}
    assert [r["ours"] for r in checked] == [294_912] * 4 + [None]
    assert main(["--paper", str(path)]) == 1
    printed = capsys.readouterr().out
    assert "UNEXPECTED Paper X / T1 / claimed match: recorded as match, counted as mismatch" in printed
    assert "≠ Paper X explained 0.39M (ours 294,912): the paper's rounding" in printed
    write_params(path, rows[2:])
    assert main(["--paper", str(path)]) == 0


def test_a_model_without_an_architecture_says_so():
    with pytest.raises(LrbenchError, match="model=tiny-roberta has no `architecture:`"):
        count("tiny-roberta", "lora")
