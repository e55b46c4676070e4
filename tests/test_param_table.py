"""Exact trainable-parameter counts on the papers' models, from their architectures on the meta device (no weights),
against the numbers the papers print (results/paper_params.csv)."""
from __future__ import annotations

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.param_table import PAPER_PARAMS, comparison, count, read_paper_params


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


def test_every_paper_count_matches_or_says_why():
    table, checked = comparison(read_paper_params(PAPER_PARAMS))
    assert len(checked) == 13 and table.row_count == 13
    for row in checked:
        if row["match"]:
            continue
        assert row["reason"], row  # a mismatch is explained in the CSV
        assert row["paper"].startswith("LoTR") and int(row["params"]) - row["ours"] == 1536  # the table's offset
    assert sum(r["match"] for r in checked) == 7


def test_a_model_without_an_architecture_says_so():
    with pytest.raises(LrbenchError, match="model=tiny-roberta has no `architecture:`"):
        count("tiny-roberta", "lora")
