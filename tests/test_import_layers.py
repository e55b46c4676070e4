"""The house's layering (pyproject.toml's import-linter contracts: entry points above the composition root above
curriculum and trainer above methods, tasks and models above utilities; no circles), and the one place that tells
one task from a sequence."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_the_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_only_the_curriculum_tells_a_task_from_a_sequence():
    kind_checks = re.compile(r"isinstance\([^)]*(Task|Sequence)\b|family\"?\)? ?== ?\"continual\"|ContinualTask")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "lowrank_bench").rglob("*.py")
                 if "curriculum" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if kind_checks.search(line)]
    assert offenders == []
