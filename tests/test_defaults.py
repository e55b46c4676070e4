"""Each setting's default lives once, in its YAML: the code reads the composed config and has no second default
that could disagree with it (as BiDoRA's direction_reg 0.0 against the YAML's 1e-5 once did)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods import build
from tests.conftest import CONF, ROOT, base_model, batch_for, method_cfg
from tests.methods.common import TARGET_SETS

PACKAGE = ROOT / "lowrank_bench"
SCANNED = [p for folder in ("methods", "tasks", "curriculum") for p in sorted((PACKAGE / folder).glob("*.py"))] + [
    PACKAGE / "optim.py"]
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
READ_BY_THE_STAGE_PLAN = {"name", "lr", "bilevel", "retrain"}  # stages.py and the optimiser read these, not methods/
EXERCISE = {"bilora": {"lambda_param": "binary"}}  # binary_reg is read only under the binary parameterisation
UNREAD = {("ft", "targets")}  # ft trains everything; the key lets one `method.targets=...` sweep include ft


def setting_lookup(node: ast.AST) -> bool:
    """`x.get("literal", ...)`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def second_defaults(path: Path, root: Path = ROOT) -> list[str]:
    """`x.get("key", default)` with a default other than None, and `x.get("key") or <literal>`: each a value the
    code uses when the config lacks one (`or ()`, `or self.name` say what null means, and are allowed; a `.get`
    whose key is not a string literal is a lookup in data, not a setting)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (setting_lookup(node) and len(node.args) == 2
                and not (isinstance(node.args[1], ast.Constant) and node.args[1].value is None)):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
        if (isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and setting_lookup(node.values[0])
                and isinstance(node.values[-1], ast.Constant) and node.values[-1].value is not None):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_sees_both_shapes_of_a_second_default(tmp_path):
    code = tmp_path / "m.py"
    code.write_text('p = c.get("dropout", 0.0)\nq = c.get("metric") or "BLEU"\nr = c.get("skip") or ()\n'
                    'i = labels.get(tag, -100)\n', encoding="utf-8")
    assert [hit.split(": ", 1)[1] for hit in second_defaults(code, tmp_path)] == [
        "c.get('dropout', 0.0)", "c.get('metric') or 'BLEU'"]


def test_methods_tasks_and_the_optimiser_read_settings_without_a_second_default():
    found = [hit for path in SCANNED for hit in second_defaults(path)]
    assert not found, "defaults belong in conf/ YAML; read cfg.key instead:\n" + "\n".join(found)


@pytest.mark.parametrize("name,key", [(name, key) for name in METHODS
                                      for key in OmegaConf.load(CONF / "method" / f"{name}.yaml")
                                      if key not in READ_BY_THE_STAGE_PLAN and (name, key) not in UNREAD])
def test_a_method_yaml_without_one_of_its_settings_fails_naming_it(name, key):
    """Build from the YAML less one key, apply, run a step's forward and regularisers: the key's absence must
    surface as an error that names it, never as a silent code default."""
    cfg = method_cfg(name, **EXERCISE.get(name, {}))
    del cfg[key]
    model, tokenizer = base_model("tiny-roberta")
    with pytest.raises((ConfigAttributeError, ConfigKeyError, LrbenchError), match=rf"\b{re.escape(key)}\b"):
        method = build(cfg)
        method.apply(model, ["classifier"], TARGET_SETS)
        model(**batch_for(tokenizer))
        method.regularizer(model)
        method.upper_regularizer(model)
