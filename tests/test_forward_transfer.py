"""A sequence's stand-alone reference (`task.standalone_accuracy`): checked before training, the forward transfer and
the references in the row, the setting named; the figure's diagnostics kept in the checkpoint, old ones still load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lowrank_bench import curriculum
from lowrank_bench.errors import LrbenchError
from lowrank_bench.results import read_rows
from lowrank_bench.train import run
from tests.conftest import compose_cfg

FAST = ["trainer.max_steps=2", "trainer.progress=false", "trainer.eval_batch_size=64"]


def sequence(*overrides):
    """`++`: adds the key to a sequence YAML without it, and overrides it in one that has it (null)."""
    return curriculum.build(compose_cfg("task=continual/toy", "model=tiny-gpt2", "method=lora", "seed=4",
                                        *FAST, *overrides))


def test_the_row_has_the_forward_transfer_the_references_and_the_setting(tmp_path):
    s = sequence("++task.standalone_accuracy={first:0.7,second:0.6}")
    assert s.standalone == {"first": 0.7, "second": 0.6}
    s.matrix.rows = [[0.72, None], [0.65, 0.64]]
    s.run_dir = tmp_path
    row = s.measures(history=None)
    assert row["forward_transfer"] == pytest.approx(0.64 - 0.6)  # the second task only: R[1][1] - its reference
    assert (row["standalone_first"], row["standalone_second"]) == (0.7, 0.6)
    assert row["continual_setting"] == "task_incremental"
    assert s.title == "continual/toy · lora · tiny-gpt2 · seed 4"


@pytest.mark.parametrize("override", [None, "++task.standalone_accuracy=null",
                                      "++task.standalone_accuracy={first:0.7,second:null}"])
def test_without_a_reference_after_the_first_task_the_forward_transfer_is_none(tmp_path, override):
    s = sequence(*([override] if override else []))
    s.matrix.rows = [[0.72, None], [0.65, 0.64]]
    s.run_dir = tmp_path
    row = s.measures(history=None)
    assert row["forward_transfer"] is None and "standalone_second" not in row
    assert row["continual_setting"] == "task_incremental"


@pytest.mark.parametrize("override,message", [
    ("++task.standalone_accuracy={first:0.7,third:0.6}",
     "task.standalone_accuracy names unknown stage(s) ['third']; valid: first, second"),
    ("++task.standalone_accuracy={second:1.5}", "task.standalone_accuracy.second=1.5; give an accuracy in [0, 1]"),
    ("++task.standalone_accuracy={second:-0.1}", "task.standalone_accuracy.second=-0.1; give an accuracy in [0, 1]"),
    ("++task.standalone_accuracy={second:high}", "task.standalone_accuracy.second='high'; give an accuracy in [0, 1]"),
    ("++task.standalone_accuracy=0.7", "task.standalone_accuracy=0.7; give a mapping stage -> accuracy"),
])
def test_a_bad_reference_fails_before_training_without_a_row_or_a_folder(tmp_path, override, message):
    with pytest.raises(LrbenchError) as err:
        sequence(override)
    assert message in str(err.value)
    csv_path = Path(os.environ["LRBENCH_RESULTS_CSV"])
    before = len(read_rows(csv_path))
    with pytest.raises(LrbenchError):
        run(compose_cfg("task=continual/toy", "model=tiny-gpt2", *FAST, override), tmp_path / "run")
    assert not (tmp_path / "run").exists() and len(read_rows(csv_path)) == before


def test_a_stage_defined_but_left_out_of_the_sequence_may_keep_its_reference():
    s = sequence("task.sequence=[second]", "++task.standalone_accuracy={first:0.7,second:0.6}")
    assert s.standalone == {"second": 0.6}


def test_a_run_keeps_the_diagnostics_in_its_checkpoint_and_the_forward_transfer_in_its_row(tmp_path):
    cfg = compose_cfg("task=continual/toy", "model=tiny-gpt2", "method=lora", *FAST, "trainer.keep_checkpoint=true",
                      "++task.standalone_accuracy={second:0.5}")
    summary = run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = {(r["after_stage"], r["task"]): r for r in records if "after_stage" in r}
    assert summary["forward_transfer"] == pytest.approx(evaluations["second", "second"]["accuracy"] - 0.5)
    assert summary["standalone_second"] == 0.5 and summary["continual_setting"] == "task_incremental"
    (meta,) = tmp_path.glob("checkpoints/step-*/meta.json")
    state = json.loads(meta.read_text())["states"]["continual"]
    assert state["degenerate"] == [[evaluations["first", "first"]["degenerate"], None],
                                   [evaluations["second", "first"]["degenerate"],
                                    evaluations["second", "second"]["degenerate"]]]
    confusion = evaluations["second", "second"]["confusion"]
    assert state["majority"]["second"] == pytest.approx(max(map(sum, confusion)) / sum(map(sum, confusion)))
    assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_from_before_the_diagnostics_still_loads():
    s = sequence()
    s.load_state_dict({"rows": [[0.7, None], [None, None]], "perplexities": [None, None], "final": {}})
    assert s.degenerate == [[None, None], [None, None]] and s.majority == {}
    assert s.matrix.rows == [[0.7, None], [None, None]]
    s.degenerate[0][0], s.majority["first"] = True, 0.55
    again = sequence()
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))  # as a checkpoint's meta.json carries it
    assert again.degenerate[0][0] is True and again.majority == {"first": 0.55}
