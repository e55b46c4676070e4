"""Every `lrbench` command the README, the docs, the Makefile and the presets' comments show passes the command
line's checks (configs.check_command_line) and composes: a documentation check, beside the bad-input tables."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_bad_input_config import allowed

from lowrank_bench.errors import LrbenchError

ROOT = Path(__file__).resolve().parents[1]


def documented_commands(*files: Path) -> list[list[str]]:
    """Every `lrbench ...` (or `python -m lowrank_bench.train ...`) command of these files whose words are all
    literal (no <placeholder>, no $VAR, no `...`), continuation lines joined."""
    commands = []
    for path in files:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())
        for line in text.splitlines():
            for match in re.finditer(r"(?:^|[`\s#])(?:lrbench|lowrank_bench\.train)((?: +[^\s`#|;&\"']+)+)", line):
                words = match.group(1).split()
                if any(c in w for w in words for c in "<>$…*\\") or "..." in match.group(1):
                    continue
                words = [w for w in words if w not in ("--cfg", "job")]
                if words and all("=" in w or w == "-m" for w in words) and words not in commands:
                    commands.append(words)
    return commands


def refused_commands(commands: list[list[str]]) -> list[str]:
    failures = []
    for words in commands:
        try:
            allowed(*[w for w in words if w != "-m"], multirun="-m" in words)
        except LrbenchError as err:
            failures.append(f"lrbench {' '.join(words)}: {err}")
    return failures


def test_every_command_of_the_readme_and_docs_passes():
    commands = documented_commands(ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md")))
    assert len(commands) >= 15, commands
    assert refused_commands(commands) == []


@pytest.mark.slow
def test_every_command_in_the_configs_comments_passes():
    """The presets' own comments (lowrank_bench/conf/experiment/..., lowrank_bench/conf/task/...): 80 commands, ~30 s on 2 cores."""
    commands = documented_commands(*sorted((ROOT / "lowrank_bench" / "conf").rglob("*.yaml")))
    assert len(commands) >= 50, len(commands)
    assert refused_commands(commands) == []
