"""Bad input to the command-line tools, one row per case: the command, the files it is given, the exit status, the
words its one-line message must hold. Every case checks the same promise (README, "bad input"): exactly one line
`lrbench error: ...` naming the value and what is valid, no traceback, the expected exit status, and nothing left
behind (the case's folder holds exactly the files the case wrote: no results row, no run or table folder).

Adding a case is adding a row to CASES. A tool is a name in TOOLS: its module (`python -m <module>`) and, where it
has one, an in-process `main(argv)` (fast: most rows run in process; rows with `via="python -m"` prove the real
exit status through a subprocess). `lrbench` itself (Hydra, no argv `main`) fits as a tool with `main=None`: its
rows run as subprocesses, with LRBENCH_RESULTS_CSV and LRBENCH_OUTPUT_DIR already pointing into the case's folder,
so that "no row, no run folder" is checked by the same snapshot.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lowrank_bench import e2e_metrics, reproduce, tables, train

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Tool:
    module: str
    main: Callable[[list[str]], int | None] | None = None


def in_process(prog: str, entry: Callable[[], int | None]) -> Callable[[list[str]], int | None]:
    """A Hydra app's entry (it reads sys.argv) as `main(argv)` in this process: a second or so, where a subprocess
    takes ~13 s."""
    def main(argv: list[str]) -> int | None:
        saved = sys.argv
        sys.argv = [prog, *argv]
        try:
            return entry()
        finally:
            sys.argv = saved

    return main


lrbench = in_process("lrbench", train.main)


TOOLS = {
    "lrbench": Tool("lowrank_bench.train", lrbench),
    "tables": Tool("lowrank_bench.tables", tables.main),
    "e2e-metrics": Tool("lowrank_bench.e2e_metrics", e2e_metrics.main),
    "reproduce": Tool("lowrank_bench.reproduce", reproduce.main),
}


@dataclass(frozen=True)
class Case:
    id: str
    tool: str
    argv: tuple[str, ...]                      # `{tmp}` stands for the case's folder
    code: int
    words: tuple[str, ...]                     # all in the one message line
    files: dict = field(default_factory=dict)  # path under {tmp} -> text, bytes, or None (an empty folder)
    via: str = "main"                          # "main" (in process) | "python -m" (a subprocess)


# -- fixtures: small, valid files that each case spoils one thing of ----------------------------------------------
RUN_COLUMNS = "method,model,task,seed,status,mode,lr,trainable_params,time_per_step_ms,best_accuracy\n"
RUNS = RUN_COLUMNS + ("lora,m,glue/mrpc,0,finished,train,0.001,10,2.0,0.85\n"
                      "lora,m,glue/mrpc,1,finished,train,0.001,10,2.0,0.87\n")
DIVERGED = RUN_COLUMNS + "lora,m,glue/mrpc,0,diverged,train,1e6,10,2.0,\n"
EVAL_ONLY = RUN_COLUMNS + "lora,m,glue/mrpc,0,finished,eval,0.001,10,2.0,\n"
NOT_UTF8 = b"\xff\xfe bad"
PAPERS = "source,method,model,task,metric,value,unit\ntest,lora,m,glue/mrpc,accuracy,88.0,percent\n"
REFS = "a pub in the centre\n\nanother pub\n"
HYPS = "a pub\nanother pub\n"
REFUSED = {"model": "tiny-roberta", "task": "toy/sentiment", "method": "lora", "trainer.batch_size": 0}
REGISTRY = yaml.safe_dump({
    "scales": {"full": {"output": "unused", "overrides": {}}, "smoke": {"output": "unused", "overrides": {}}},
    "tables": {"t": {"title": "T", "sources": [], "seeds": [0], "unit": "percent",
                     "columns": {"Toy": {"metric": "accuracy"}},
                     "runs": {"LoRA": REFUSED, "DoRA": {**REFUSED, "method": "dora"}}}},
})
REPRO = ("--registry", "{tmp}/tables.yaml", "--papers", "{tmp}/papers.csv", "--output", "{tmp}/out")
REPRO_FILES = {"tables.yaml": REGISTRY, "papers.csv": PAPERS}


def e2e(refs: str, hyps: str = "hyp.txt") -> tuple[str, ...]:
    return (f"{{tmp}}/{refs}", f"{{tmp}}/{hyps}")


TINY = ("model=tiny-roberta", "task=toy/sentiment", "logger=none")

CASES = [
    # lrbench itself (Hydra's entry, in process)
    Case("lrbench rank below 1", "lrbench", (*TINY, "method.r=-1"), 2, ("method.r=-1", "integer > 0")),
    Case("lrbench rank below 1 (subprocess)", "lrbench", (*TINY, "method.r=-1"), 2, ("method.r=-1", "integer > 0"),
         via="python -m"),
    # python -m lowrank_bench.tables: the file
    Case("tables missing file", "tables", ("{tmp}/runs.csv",), 2, ("results CSV", "runs.csv", "no such file")),
    Case("tables missing file, cli", "tables", ("{tmp}/runs.csv",), 2, ("results CSV", "no such file"),
         via="python -m"),
    Case("tables folder", "tables", ("{tmp}/runs",), 2, ("results CSV", "runs is a folder", "give a file"),
         {"runs": None}),
    Case("tables not utf-8", "tables", ("{tmp}/runs.csv",), 2, ("runs.csv:4", "not UTF-8", "0xff"),
         {"runs.csv": RUNS.encode() + NOT_UTF8}),
    Case("tables empty file", "tables", ("{tmp}/runs.csv",), 2, ("runs.csv", "the file is empty"), {"runs.csv": ""}),
    Case("tables not a results file", "tables", ("{tmp}/runs.csv",), 2, ("header lacks", "method, model, task, seed"),
         {"runs.csv": "a,b\n1,2\n"}),
    Case("tables header only", "tables", ("{tmp}/runs.csv",), 2, ("a header but no result rows",),
         {"runs.csv": RUN_COLUMNS}),
    Case("tables only evaluations", "tables", ("{tmp}/runs.csv",), 2, ("no training rows", "1 mode=eval row"),
         {"runs.csv": EVAL_ONLY}),
    Case("tables every row diverged", "tables", ("{tmp}/runs.csv",), 2, ("all 1 selected row(s) diverged",
                                                                          "--include-diverged"),
         {"runs.csv": DIVERGED}),
    # the options
    Case("tables --where unknown column", "tables", ("{tmp}/runs.csv", "--where", "lrr=1e-3"), 2,
         ("--where lrr", "no column 'lrr'", "did you mean lr?", "valid: method, model, task, seed"),
         {"runs.csv": RUNS}),
    Case("tables --where keeps nothing", "tables", ("{tmp}/runs.csv", "--where", "lr=5"), 2,
         ("--where lr=5", "no row of", "lr there: 0.001"), {"runs.csv": RUNS}),
    Case("tables --where without =", "tables", ("{tmp}/runs.csv", "--where", "lr"), 2,
         ("--where lr", "write key=value"), {"runs.csv": RUNS}),
    Case("tables --show unknown column", "tables", ("{tmp}/runs.csv", "--show", "lr,batchsize"), 2,
         ("--show batchsize", "no column 'batchsize'", "valid:"), {"runs.csv": RUNS}),
    Case("tables --metric unknown column", "tables", ("{tmp}/runs.csv", "--metric", "best_acuracy"), 2,
         ("--metric best_acuracy", "did you mean best_accuracy?"), {"runs.csv": RUNS}),
    Case("tables --paper missing", "tables", ("{tmp}/runs.csv", "--paper", "{tmp}/papers.csv"), 2,
         ("published numbers", "papers.csv", "no such file"), {"runs.csv": RUNS}),
    Case("tables --paper bad unit", "tables", ("{tmp}/runs.csv", "--paper", "{tmp}/papers.csv"), 2,
         ("papers.csv:2", "unit='permille'", "valid: percent, fraction, raw"),
         {"runs.csv": RUNS, "papers.csv": PAPERS.replace("percent", "permille")}),
    # lrbench-e2e-metrics REFS HYP
    Case("e2e refs missing", "e2e-metrics", e2e("refs.txt"), 2, ("references file", "refs.txt", "no such file"),
         {"hyp.txt": HYPS}),
    Case("e2e refs missing, cli", "e2e-metrics", e2e("refs.txt"), 2, ("references file", "no such file"),
         {"hyp.txt": HYPS}, via="python -m"),
    Case("e2e refs folder", "e2e-metrics", e2e("refs"), 2, ("references file", "refs is a folder"),
         {"refs": None, "hyp.txt": HYPS}),
    Case("e2e refs not utf-8", "e2e-metrics", e2e("refs.txt"), 2, ("refs.txt:4", "not UTF-8", "0xff"),
         {"refs.txt": REFS.encode() + NOT_UTF8, "hyp.txt": HYPS}),
    Case("e2e hyp missing", "e2e-metrics", e2e("refs.txt"), 2, ("hypotheses file", "hyp.txt", "no such file"),
         {"refs.txt": REFS}),
    Case("e2e hyp folder", "e2e-metrics", e2e("refs.txt", "hyp"), 2, ("hypotheses file", "hyp is a folder"),
         {"refs.txt": REFS, "hyp": None}),
    Case("e2e hyp not utf-8", "e2e-metrics", e2e("refs.txt"), 2, ("hypotheses file", "hyp.txt:2", "not UTF-8"),
         {"refs.txt": REFS, "hyp.txt": b"a pub\n\xe9\n"}),
    # the E2E CSV reader (e2e_metrics.read_table, which tasks/e2e.py reads its files with)
    Case("e2e csv unclosed quote", "e2e-metrics", e2e("refs.csv"), 2,
         ("refs.csv:3", "quote opened on this line is not closed", "lines 3-4 would be read as one row"),
         {"refs.csv": 'mr,ref\nname[A],A pub.\nname[B],"B is a pub.\nname[C],C pub.\n', "hyp.txt": HYPS}),
    Case("e2e csv unclosed quote at the end", "e2e-metrics", e2e("refs.csv"), 2,
         ("refs.csv:3", "not closed", "runs to the end of the file"),
         {"refs.csv": 'mr,ref\nname[A],A pub.\nname[B],"B is a pub.\n', "hyp.txt": HYPS}),
    Case("e2e csv unquoted comma", "e2e-metrics", e2e("refs.csv"), 2,
         ("refs.csv:3", "malformed row with 3 fields", "expected 2 (mr, ref)", "quote a field that holds a comma"),
         {"refs.csv": "mr,ref\nname[A],A pub.\nname[B],B is a pub, near the river.\n", "hyp.txt": HYPS}),
    Case("e2e tsv extra tab", "e2e-metrics", e2e("refs.tsv"), 2,
         ("refs.tsv:2", "malformed row with 3 fields", "holds a tab"),
         {"refs.tsv": "mr\tref\nname[A]\tA pub.\textra\n", "hyp.txt": HYPS}),
    Case("e2e csv not utf-8", "e2e-metrics", e2e("refs.csv"), 2, ("references file", "refs.csv:2", "not UTF-8"),
         {"refs.csv": b"mr,ref\nname[A],caf\xe9\n", "hyp.txt": HYPS}),
    # python -m lowrank_bench.reproduce
    Case("reproduce --seeds a,b", "reproduce", ("--seeds", "a,b", *REPRO), 2,
         ("--seeds a,b", "'a' is not a seed", "integers >= 0", "0,1,2"), REPRO_FILES),
    Case("reproduce --seeds a,b, cli", "reproduce", ("--seeds", "a,b", *REPRO), 2, ("--seeds a,b", "not a seed"),
         REPRO_FILES, via="python -m"),
    Case("reproduce --seeds negative", "reproduce", ("--seeds", "0,-1", *REPRO), 2, ("'-1' is not a seed",),
         REPRO_FILES),
    Case("reproduce registry missing", "reproduce", REPRO, 2, ("registry", "tables.yaml", "no such file"),
         {"papers.csv": PAPERS}),
    Case("reproduce registry folder", "reproduce", REPRO, 2, ("registry", "tables.yaml is a folder"),
         {"tables.yaml": None, "papers.csv": PAPERS}),
    Case("reproduce registry not utf-8", "reproduce", REPRO, 2, ("registry", "tables.yaml:1", "not UTF-8"),
         {"tables.yaml": NOT_UTF8, "papers.csv": PAPERS}),
    Case("reproduce registry not yaml", "reproduce", REPRO, 2, ("registry", "tables.yaml:3", "not valid YAML"),
         {"tables.yaml": "tables:\n  t: [unclosed\n", "papers.csv": PAPERS}),
    Case("reproduce registry without tables", "reproduce", REPRO, 2, ("no tables mapping", "`scales:` and `tables:`"),
         {"tables.yaml": "scales: {}\n", "papers.csv": PAPERS}),
    Case("reproduce papers missing", "reproduce", REPRO, 2, ("published numbers", "papers.csv", "no such file"),
         {"tables.yaml": REGISTRY}),
    Case("reproduce papers not utf-8", "reproduce", REPRO, 2, ("published numbers", "papers.csv:3", "not UTF-8"),
         {"tables.yaml": REGISTRY, "papers.csv": PAPERS.encode() + NOT_UTF8}),
    Case("reproduce --csv folder", "reproduce", (*REPRO, "--csv", "{tmp}/runs"), 2, ("results CSV", "is a folder"),
         {**REPRO_FILES, "runs": None}),
    Case("reproduce --output a file", "reproduce", (*REPRO[:-1], "{tmp}/papers.csv"), 2,
         ("--output", "papers.csv is a file", "give a folder"), REPRO_FILES),
    Case("reproduce unknown table", "reproduce", ("--table", "lora_glu", *REPRO), 2,
         ("--table", "['lora_glu']", "valid: t"), REPRO_FILES),
    Case("reproduce unknown scale", "reproduce", ("--scale", "tiny", *REPRO), 2, ("--scale tiny", "valid: full, smoke"),
         REPRO_FILES),
    Case("reproduce --override without =", "reproduce", ("--override", "trainer.lr", *REPRO), 2,
         ("--override trainer.lr", "write key=value"), REPRO_FILES),
    Case("reproduce every run refused", "reproduce", ("--collect-only", *REPRO), 2,
         ("every configuration was refused (2", "nothing can run"), REPRO_FILES),
]


def write(folder: Path, files: dict) -> None:
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def snapshot(folder: Path) -> dict[str, int | None]:
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else None) for p in folder.rglob("*")}


def run_case(case: Case, argv: list[str], capsys) -> tuple[int, str, str]:
    tool = TOOLS[case.tool]
    if case.via == "main" and tool.main is not None:
        capsys.readouterr()
        try:
            code = tool.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return (0 if code is None else code), out, err
    done = subprocess.run([sys.executable, "-m", tool.module, *argv], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120, env=os.environ.copy())
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_it_with_its_exit_status_and_nothing_left(case, tmp_path, monkeypatch, capsys):
    check(case, tmp_path, monkeypatch, capsys)


def check(case: Case, tmp_path: Path, monkeypatch, capsys) -> None:
    """The promise, for one case (other test files import this with their own CASES)."""
    monkeypatch.setenv("LRBENCH_RESULTS_CSV", str(tmp_path / "results" / "runs.csv"))
    monkeypatch.setenv("LRBENCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    write(tmp_path, case.files)
    before = snapshot(tmp_path)
    repo_outputs = (ROOT / "outputs" / "reproduce").exists()
    code, out, err = run_case(case, [a.replace("{tmp}", str(tmp_path)) for a in case.argv], capsys)
    assert code == case.code, (out, err)
    assert "Traceback" not in err, err
    lines = [line for line in (out + err).splitlines() if line.startswith("lrbench error: ")]
    assert len(lines) == 1 and err.strip() == lines[0], (out, err)  # one line, nothing else on stderr
    missing = [w for w in case.words if w not in lines[0]]
    assert not missing, (missing, lines[0])
    assert snapshot(tmp_path) == before  # no row, no run folder, no table
    assert (ROOT / "outputs" / "reproduce").exists() == repo_outputs


def test_every_item_of_the_issue_has_cases_and_every_tool_a_subprocess_case():
    tools = {c.tool for c in CASES}
    assert tools == set(TOOLS)
    assert {c.tool for c in CASES if c.via == "python -m"} == tools
    assert len(CASES) >= 40


def test_reproduce_with_one_configuration_refused_and_one_planned_exits_1_and_names_the_refusal(tmp_path, capsys):
    registry = yaml.safe_load(REGISTRY)
    registry["tables"]["t"]["runs"]["DoRA"]["trainer.batch_size"] = 8  # valid: planned, not run (collect only)
    write(tmp_path, {"tables.yaml": yaml.safe_dump(registry), "papers.csv": PAPERS})
    argv = [a.replace("{tmp}", str(tmp_path)) for a in ("--collect-only", *REPRO)]
    assert reproduce.main(argv) == 1
    out = capsys.readouterr().out
    assert "refused before running (LrbenchError: trainer.batch_size=0" in out
    assert "1 configuration(s) refused before running (listed above): their cells are missing" in out
    assert not (tmp_path / "out" / "runs.csv").exists()  # nothing ran
