"""Bad input that lives in files and folders, one row per case, under the promise of tests/test_bad_input_table.py
(one line `lrbench error: ...` naming the value and what is valid, the exit status, nothing left behind): a model
of the wrong family for the task (issue 26, item 7), damaged run folders, model folders and checkpoints (item 9),
where results, runs and caches go (item 10), lrbench-mc's and lrbench-export's inputs and reproduce's plan
(item 12), and a subject that names a path (item 14).

`lrbench-mc` and `lrbench-export` join the table's tools here (for this file's tests only: `monkeypatch.setitem`
on the shared TOOLS). A case may set environment variables (`env`, `{tmp}` standing for its folder)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save

from lowrank_bench import export, mc_eval, reproduce
from lowrank_bench.checkpoint import fingerprint, identity
from test_bad_input_table import NOT_UTF8, PAPERS, TOOLS, Case, Tool, check, in_process
from conftest import compose_cfg


MORE_TOOLS = {"mc": Tool("lowrank_bench.mc_eval", in_process("lrbench-mc", mc_eval.main)), "export": Tool("lowrank_bench.export", export.main)}


@dataclass(frozen=True)
class FileCase(Case):
    env: dict = field(default_factory=dict)  # environment variables for the case ({tmp}: its folder)


# -- fixtures: small files, each case spoils one ---------------------------------------------------------------
TINY = ("model=tiny-roberta", "task=toy/sentiment", "logger=none")
DECODER = ("model=tiny-gpt2", "logger=none")


def run_config_text(*overrides: str) -> str:
    """A run's config_resolved.yaml, as `lrbench` writes it."""
    return OmegaConf.to_yaml(compose_cfg(*overrides), resolve=True)


def safetensors_bytes(n: int = 64) -> bytes:
    return save({"weight": torch.arange(n, dtype=torch.float32)})


RUN_CONFIG = run_config_text(*TINY)
ADAPTER = safetensors_bytes()  # whole (its tensors fit no model: cases that pass the checks fail on the fit)
RUN = {"run/config_resolved.yaml": RUN_CONFIG, "run/adapter.safetensors": ADAPTER,
       "run/summary.json": json.dumps({"status": "finished", "task": "toy/sentiment"}), "run/status": "finished\n"}
DIVERGED_RUN = {"run/config_resolved.yaml": RUN_CONFIG, "run/status": "diverged\n",
                "run/summary.json": json.dumps({"status": "diverged", "diverged_stage": "train",
                                                "diverged_at_step": 3})}
CLASSIFIER_RUN = {**RUN, "run/config_resolved.yaml": run_config_text(*DECODER)}  # tiny-gpt2 on toy: a classifier


def drop(files: dict, *names: str) -> dict:
    return {k: v for k, v in files.items() if k not in names}


def damaged(**files) -> dict:
    """The run folder with some of its files replaced (None: removed)."""
    out = {**RUN, **{f"run/{name.replace('__', '.')}": text for name, text in files.items()}}
    return {k: v for k, v in out.items() if v is not ...}


BAD_YAML = "model:\n  name: tiny-roberta\n  kind: [encoder\n"
NOT_A_RUN = "just: a mapping\n"
TRUNCATED = ADAPTER[:-40]
ITEMS_CSV = "question,A,B,C,D,answer\nWhat is 1 + 1?,2,3,4,5,A\nWhat is 2 + 1?,2,3,4,5,B\n"
MC = ("eval=mc/mmlu", *DECODER, "trainer.device=cpu")
EVIL = json.dumps([{"question": "q", "A": "a", "B": "b", "answer": "A", "subject": "../../evil"}])


def mc_files(*names: str) -> tuple[str, ...]:
    return (f"eval.files=[{','.join('{tmp}/' + n for n in names)}]",)


def export_argv(folder: str = "{tmp}/run", out: str = "{tmp}/out", fmt: str = "merged") -> tuple[str, ...]:
    return (folder, "--format", fmt, "--out", out)


EVAL = ("mode=eval", "run_dir={tmp}/run")
MODEL_DIR = ("model=roberta-base", "model.path={tmp}/model", "task=toy/sentiment", "logger=none")
MODEL_CONFIG = json.dumps({"model_type": "roberta", "vocab_size": 30522, "hidden_size": 32})


def model_folder(**files) -> dict:
    base = {"model/config.json": MODEL_CONFIG, "model/model.safetensors": safetensors_bytes()}
    out = {**base, **{f"model/{name.replace('__', '.')}": text for name, text in files.items()}}
    return {k: v for k, v in out.items() if v is not ...}


def checkpoint_files(meta: str | None = None, tensors: bytes | None = None) -> dict:
    """A checkpoint of TINY's identity under the case's output folder, with a damaged meta.json or tensors file."""
    cfg = compose_cfg(*TINY, "trainer.max_steps=2")
    print_ = fingerprint(identity(cfg))
    meta_json = json.dumps({"format": 1, "fingerprint": print_, "identity": identity(cfg), "wall_s": 1.0,
                            "position": {"stage": 0, "stage_name": "train", "step": 1}, "global_step": 1})
    root = "outputs/runs/earlier/checkpoints"
    return {f"{root}/latest": json.dumps({"checkpoint": "step-00000001", "fingerprint": print_, "finished": False,
                                          "written_at": 1.0}),
            f"{root}/step-00000001/meta.json": meta if meta is not None else meta_json,
            f"{root}/step-00000001/tensors.safetensors": tensors if tensors is not None else ADAPTER,
            f"{root}/step-00000001/optimizer.pt": b"",
            "outputs/runs/earlier/status": "interrupted\n"}


def registry(runs: dict) -> str:
    return yaml.safe_dump({
        "scales": {"full": {"output": "unused", "overrides": {}}},
        "tables": {"t": {"title": "T", "sources": [], "seeds": [0], "unit": "percent",
                         "columns": {"E2E": {"metric": "BLEU"}}, "runs": runs}},
    })


def spoilt(table) -> dict:
    """REPRO's files with the registry's one table replaced by `table` (a mapping's keys over the valid table's, or
    anything else in its place)."""
    valid = yaml.safe_load(registry({"LoRA": ENCODER_E2E}))
    t = {**valid["tables"]["t"], **table} if isinstance(table, dict) else table
    return {"tables.yaml": yaml.safe_dump({**valid, "tables": {"t": t}}), "papers.csv": PAPERS}


REPRO = ("--collect-only", "--registry", "{tmp}/tables.yaml", "--papers", "{tmp}/papers.csv", "--output", "{tmp}/out")
ENCODER_E2E = {"model": "tiny-roberta", "task": "e2e", "method": "lora"}

CASES = [
    # item 7: the model's family for the task
    FileCase("encoder for e2e", "lrbench", (*TINY[:1], "task=e2e", "logger=none"), 2,
             ("task e2e needs a decoder (causal LM)", "model=tiny-roberta is an encoder", "decoders:", "tiny-gpt2")),
    FileCase("encoder for sft/math", "lrbench", (*TINY[:1], "task=sft/math", "logger=none"), 2,
             ("task sft/math needs a decoder (causal LM)", "model=tiny-roberta is an encoder", "smollm2-135m")),
    FileCase("encoder for sft with eval=mc", "lrbench", (*TINY[:1], "task=sft/law", "eval=mc/mmlu_law", "logger=none"),
             2, ("task sft/law needs a decoder", "model=tiny-roberta is an encoder")),
    FileCase("mode=eval of an encoder run on task=e2e", "lrbench", (*EVAL, "task=e2e"), 2,
             ("task e2e needs a decoder", "model=tiny-roberta is an encoder"), RUN),
    FileCase("mc on an encoder", "mc", ("eval=mc/mmlu", *TINY[:1], *mc_files("items.csv")), 2,
             ("eval=mc/mmlu needs a decoder (causal LM)", "model=tiny-roberta is an encoder", "decoders:"),
             {"items.csv": ITEMS_CSV}),
    FileCase("mc on a classification run", "mc", (*MC, "eval.adapter={tmp}/run", *mc_files("items.csv")), 2,
             ("eval.adapter=", "trained a sequence_classification head", "task=sft/<domain>"),
             {**CLASSIFIER_RUN, "items.csv": ITEMS_CSV}),
    FileCase("reproduce: every configuration an encoder for e2e", "reproduce", REPRO, 2,
             ("every configuration was refused (1",),
             {"tables.yaml": registry({"LoRA": ENCODER_E2E}), "papers.csv": PAPERS}),
    FileCase("reproduce: a table not a mapping", "reproduce", REPRO, 2,
             ("registry table t is a int, not a mapping", "title, runs, columns, seeds"), spoilt(5)),
    FileCase("reproduce: a table without runs", "reproduce", REPRO, 2, ("registry table t lacks runs",),
             {**spoilt({}), "tables.yaml": spoilt({})["tables.yaml"].replace("    runs:", "    rows:")}),
    FileCase("reproduce: a run not a mapping", "reproduce", REPRO, 2, ("runs.LoRA is 5", "give a mapping"),
             spoilt({"runs": {"LoRA": 5}})),
    FileCase("reproduce: a column without a metric", "reproduce", REPRO, 2,
             ("column(s) ['E2E'] name no metric", "mean_of"), spoilt({"columns": {"E2E": {"unit": "raw"}}})),
    FileCase("reproduce: seeds not a list", "reproduce", REPRO, 2, ("seeds='x'", "integers >= 0"),
             spoilt({"seeds": "x"})),
    FileCase("reproduce: sources without paper", "reproduce", REPRO, 2, ("sources must be a list of",),
             spoilt({"sources": [{"table": "Table 1"}]})),
    FileCase("reproduce: --output cannot be made", "reproduce", (*REPRO[:-1], "/proc/nope/out"), 2,
             ("--output /proc/nope/out", "is not writable", "making the folder /proc/nope failed"),
             {"tables.yaml": registry({"LoRA": {**ENCODER_E2E, "model": "tiny-gpt2"}}), "papers.csv": PAPERS}),
    FileCase("reproduce: --csv not a results file", "reproduce", (*REPRO, "--csv", "{tmp}/runs.csv"), 2,
             ("--csv", "runs.csv is not an lrbench results file", "method, model, task, seed"),
             {**spoilt({}), "runs.csv": "question,A,B,answer\nq,a,b,A\n"}),
    FileCase("reproduce: --csv not UTF-8", "reproduce", (*REPRO, "--csv", "{tmp}/runs.csv"), 2,
             ("results CSV", "runs.csv:1", "not UTF-8"), {**spoilt({}), "runs.csv": NOT_UTF8}),
    # item 9: damaged run folders (mode=eval)
    FileCase("eval: config not YAML", "lrbench", EVAL, 2,
             ("run_dir=", "config_resolved.yaml:3", "not valid YAML", "while parsing a flow sequence"),
             damaged(config_resolved__yaml=BAD_YAML)),
    FileCase("eval: config not a run's", "lrbench", EVAL, 2,
             ("config_resolved.yaml lacks model, method, task, trainer, optimizer, seed", "not a resolved run config"),
             damaged(config_resolved__yaml=NOT_A_RUN)),
    FileCase("eval: config a list", "lrbench", EVAL, 2, ("config_resolved.yaml", "a YAML list, not the mapping"),
             damaged(config_resolved__yaml="- a\n- b\n")),
    FileCase("eval: config not UTF-8", "lrbench", EVAL, 2, ("config_resolved.yaml:1", "not UTF-8"),
             damaged(config_resolved__yaml=NOT_UTF8)),
    FileCase("eval: config with a bad value", "lrbench", EVAL, 2,
             ("config_resolved.yaml", "method.r=-1: must be an integer > 0"),
             damaged(config_resolved__yaml=RUN_CONFIG.replace("  r: 8\n", "  r: -1\n"))),
    FileCase("eval: config with a broken interpolation", "lrbench", EVAL, 2,
             ("config_resolved.yaml", "Interpolation key 'nowhere' not found", "restore it"),
             damaged(config_resolved__yaml=RUN_CONFIG.replace("  r: 8\n", "  r: ${nowhere}\n"))),
    FileCase("eval: adapter truncated", "lrbench", EVAL, 2,
             ("adapter.safetensors", "not a whole safetensors file", "truncated or damaged"),
             damaged(adapter__safetensors=TRUNCATED)),
    FileCase("eval: adapter empty", "lrbench", EVAL, 2, ("adapter.safetensors", "the file is empty"),
             damaged(adapter__safetensors=b"")),
    FileCase("eval: adapter= truncated", "lrbench", ("mode=eval", "adapter={tmp}/run/adapter.safetensors"), 2,
             ("adapter=", "not a whole safetensors file"), damaged(adapter__safetensors=TRUNCATED)),
    FileCase("eval: adapter= a folder", "lrbench", ("mode=eval", "adapter={tmp}/run"), 2,
             ("adapter=", "a folder; give the adapter file", "run_dir="), RUN),
    FileCase("eval: summary.json not JSON", "lrbench", EVAL, 2, ("summary.json", "not valid JSON"),
             damaged(summary__json="{\"status\": ")),
    FileCase("eval: summary.json a list", "lrbench", EVAL, 2, ("summary.json", "is a JSON list, not an object"),
             damaged(summary__json="[]")),
    FileCase("eval: a diverged run", "lrbench", EVAL, 2,
             ("run_dir=", "the run diverged (stage train, step 3)", "saves no adapter"), DIVERGED_RUN),
    FileCase("eval: an unfinished run", "lrbench", EVAL, 2, ("not finished (status: running)",),
             {**drop(DIVERGED_RUN, "run/summary.json"), "run/status": "running\n"}),
    # item 9: damaged run folders (lrbench-export)
    FileCase("export: config not YAML", "export", export_argv(), 2, ("config_resolved.yaml:3", "not valid YAML"),
             damaged(config_resolved__yaml=BAD_YAML)),
    FileCase("export: config not YAML (subprocess)", "export", export_argv(), 2, ("not valid YAML",),
             damaged(config_resolved__yaml=BAD_YAML), via="python -m"),
    FileCase("export: config not a run's", "export", export_argv(), 2, ("lacks model, method, task",),
             damaged(config_resolved__yaml=NOT_A_RUN)),
    FileCase("export: adapter truncated", "export", export_argv(), 2,
             ("adapter.safetensors", "not a whole safetensors file"), damaged(adapter__safetensors=TRUNCATED)),
    FileCase("export: adapter empty", "export", export_argv(), 2, ("the file is empty",),
             damaged(adapter__safetensors=b"")),
    FileCase("export: summary.json not JSON", "export", export_argv(), 2, ("summary.json", "not valid JSON"),
             damaged(summary__json="{oops")),
    FileCase("export: summary.json not UTF-8", "export", export_argv(), 2, ("summary.json:1", "not UTF-8"),
             damaged(summary__json=NOT_UTF8)),
    FileCase("export: a diverged run", "export", export_argv(), 2,
             ("the run diverged (stage train, step 3)", "saves no adapter"), DIVERGED_RUN),
    FileCase("export: a diverged run without summary", "export", export_argv(), 2, ("the run diverged;",),
             drop(DIVERGED_RUN, "run/summary.json")),
    FileCase("export: an interrupted run", "export", export_argv(), 2,
             ("interrupted", "trainer.resume=<its folder>"), {**DIVERGED_RUN, "run/status": "interrupted\n"}),
    FileCase("export: the run folder a file", "export", export_argv(), 2, ("is a file; give a run folder",),
             {"run": "not a folder"}),
    FileCase("export: --out unwritable", "export", export_argv(out="/proc/nope/out"), 2,
             ("--out /proc/nope/out", "cannot write in /proc"), RUN),
    FileCase("export: --out under a file", "export", export_argv(out="{tmp}/blocked/out"), 2,
             ("--out", "blocked is a file, not a folder"), {**RUN, "blocked": "a file"}),
    # item 9: a damaged model folder (model.path)
    FileCase("model.path: config.json not JSON", "lrbench", MODEL_DIR, 2,
             ("model.path=", "config.json", "not valid JSON"), model_folder(config__json="{not json")),
    FileCase("model.path: config.json a list", "lrbench", MODEL_DIR, 2,
             ("config.json is not a transformers model config", "model_type", "a JSON list"),
             model_folder(config__json="[1, 2]")),
    FileCase("model.path: config.json without model_type", "lrbench", MODEL_DIR, 2,
             ("not a transformers model config", "found keys ['a']"), model_folder(config__json='{"a": 1}')),
    FileCase("model.path: no config.json", "lrbench", MODEL_DIR, 2, ("no config.json in",),
             model_folder(config__json=...)),
    FileCase("model.path: weights truncated", "lrbench", MODEL_DIR, 2,
             ("model.safetensors", "not a whole safetensors file", "truncated or damaged"),
             model_folder(model__safetensors=TRUNCATED)),
    FileCase("model.path: weights empty", "lrbench", MODEL_DIR, 2, ("model.safetensors", "the file is empty"),
             model_folder(model__safetensors=b"")),
    FileCase("model.path: .bin weights truncated", "lrbench", MODEL_DIR, 2,
             ("pytorch_model.bin", "not a whole PyTorch checkpoint"),
             model_folder(model__safetensors=..., pytorch_model__bin=b"PK\x03\x04 cut")),
    FileCase("model.path: an index naming a missing shard", "lrbench", MODEL_DIR, 2,
             ("model.safetensors.index.json names model-00001-of-00002.safetensors",),
             model_folder(model__safetensors=..., model__safetensors__index__json=json.dumps(
                 {"weight_map": {"w": "model-00001-of-00002.safetensors"}}))),
    # item 9: a damaged checkpoint taken by trainer.resume=auto (checkpoint.py)
    FileCase("resume=auto: meta.json not JSON", "lrbench", (*TINY, "trainer.max_steps=2", "trainer.resume=auto"), 2,
             ("meta.json", "not valid JSON"), checkpoint_files(meta="{cut")),
    FileCase("resume=auto: tensors truncated", "lrbench", (*TINY, "trainer.max_steps=2", "trainer.resume=auto"), 2,
             ("tensors.safetensors",), checkpoint_files(tensors=TRUNCATED)),
    # item 10: where results, runs and caches go
    FileCase("results_csv=/proc/nope", "lrbench", (*TINY, "results_csv=/proc/nope"), 2,
             ("/proc/nope is not writable", "opening its lock file nope.lock failed", "LRBENCH_RESULTS_CSV")),
    FileCase("results_csv=/proc/nope (subprocess)", "lrbench", (*TINY, "results_csv=/proc/nope"), 2,
             ("/proc/nope is not writable",), via="python -m"),
    FileCase("results_csv in a folder that cannot be made", "lrbench", (*TINY, "results_csv=/proc/nope/runs.csv"), 2,
             ("/proc/nope/runs.csv is not writable", "making the folder /proc/nope failed")),
    FileCase("results_csv under a file", "lrbench", (*TINY, "results_csv={tmp}/blocked/runs.csv"), 2,
             ("is not writable", "blocked is a file, not a folder"), {"blocked": "a file"}),
    FileCase("mode=eval with results_csv=/proc/nope", "lrbench", (*EVAL, "results_csv=/proc/nope"), 2,
             ("/proc/nope is not writable",), RUN),
    FileCase("cache folder a file", "lrbench", TINY, 2,
             ("LRBENCH_CACHE_DIR=", "cachefile is a file, not a folder"), {"cachefile": "a file"},
             env={"LRBENCH_CACHE_DIR": "{tmp}/cachefile"}),
    FileCase("cache folder cannot be made", "lrbench", TINY, 2,
             ("LRBENCH_CACHE_DIR=/proc/nope/cache", "making the folder /proc/nope failed"),
             env={"LRBENCH_CACHE_DIR": "/proc/nope/cache"}),
    FileCase("output folder a file", "lrbench", (*TINY, "output_dir={tmp}/blocked"), 2,
             ("output_dir", "blocked"), {"blocked": "a file"}),
    FileCase("mc: output folder a file", "mc", (*MC, *mc_files("items.csv"), "output_dir={tmp}/blocked"), 2,
             ("output_dir=", "blocked (LRBENCH_OUTPUT_DIR)", "is not writable", "blocked is a file, not a folder"),
             {"blocked": "a file", "items.csv": ITEMS_CSV}),
    FileCase("mc: output folder cannot be made", "mc", (*MC, *mc_files("items.csv"), "output_dir=/proc/nope"), 2,
             ("output_dir=/proc/nope", "making the folder /proc/nope failed"), {"items.csv": ITEMS_CSV}),
    # item 12: lrbench-mc's inputs
    FileCase("mc: eval.files missing", "mc", (*MC, *mc_files("items.csv")), 2, ("eval.files: no such file",)),
    FileCase("mc: eval.files missing (subprocess)", "mc", (*MC, *mc_files("items.csv")), 2, ("no such file",),
             via="python -m"),
    FileCase("mc: eval.files a folder", "mc", (*MC, *mc_files("items")), 2,
             ("eval.files:", "items is a folder", "eval.data_dir="), {"items": None}),
    FileCase("mc: eval.files not UTF-8", "mc", (*MC, *mc_files("items.csv")), 2, ("items.csv:4", "not UTF-8"),
             {"items.csv": ITEMS_CSV.encode() + NOT_UTF8}),
    FileCase("mc: a JSON item file not UTF-8", "mc", (*MC, *mc_files("items.json")), 2, ("items.json:1", "not UTF-8"),
             {"items.json": NOT_UTF8}),
    FileCase("mc: a JSON item not an object", "mc", (*MC, *mc_files("items.json")), 2,
             ("items.json item 1", "not an object"), {"items.json": "[1, 2]"}),
    FileCase("mc: eval.files of another type", "mc", (*MC, *mc_files("items.txt")), 2,
             ("items.txt is not one of .csv, .json, .jsonl",), {"items.txt": ITEMS_CSV}),
    FileCase("mc: eval.data_dir with a file not UTF-8", "mc", (*MC, "eval.data_dir={tmp}/bench"), 2,
             ("algebra.csv:2", "not UTF-8"), {"bench/algebra.csv": b"question,A,B,answer\nq,caf\xe9,b,A\n"}),
    FileCase("mc: mapping.json not UTF-8", "mc", (*MC, "eval.data_dir={tmp}/bench"), 2,
             ("mapping.json:1", "not UTF-8"), {"bench/algebra.csv": ITEMS_CSV, "bench/mapping.json": NOT_UTF8}),
    FileCase("mc: mapping.json not a mapping", "mc", (*MC, "eval.data_dir={tmp}/bench"), 2,
             ("mapping.json", "expected {subject: {name, category}}"),
             {"bench/algebra.csv": ITEMS_CSV, "bench/mapping.json": "[1]"}),
    FileCase("mc: a broken chat template", "mc",
             (*MC, *mc_files("items.csv"), "+model.tokenizer.special_tokens={chat_template:'{% if %}'}"), 2,
             ("eval.template=chat", "does not render", "TemplateSyntaxError", "eval.template=plain"),
             {"items.csv": ITEMS_CSV}),
    FileCase("mc: a chat template that raises", "mc",
             (*MC, *mc_files("items.csv"),
              "+model.tokenizer.special_tokens={chat_template:'{{ raise_exception(1) }}'}"),
             2, ("does not render",), {"items.csv": ITEMS_CSV}),
    FileCase("mc: offline without items", "mc", MC, 2,
             ("Dataset 'cais/mmlu' is not in the local Hugging Face cache", "eval.data_dir=")),
    FileCase("mc: eval.adapter a damaged run", "mc", (*MC, "eval.adapter={tmp}/run", *mc_files("items.csv")), 2,
             ("eval.adapter=", "not valid YAML"), {**damaged(config_resolved__yaml=BAD_YAML), "items.csv": ITEMS_CSV}),
    FileCase("mc: eval.adapter a diverged run", "mc", (*MC, "eval.adapter={tmp}/run", *mc_files("items.csv")), 2,
             ("eval.adapter=", "the run diverged"), {**DIVERGED_RUN, "items.csv": ITEMS_CSV}),
    # item 14: a subject that names a path
    FileCase("mc: a subject that climbs out", "mc", (*MC, *mc_files("items.json")), 2,
             ("items.json item 1", "subject '../../evil' is not a subject name", "'..', '/'"), {"items.json": EVIL}),
    FileCase("mc: a subject with a slash", "mc", (*MC, *mc_files("items.jsonl")), 2, ("subject 'a/b'",),
             {"items.jsonl": json.dumps({"question": "q", "A": "a", "B": "b", "answer": "B", "subject": "a/b"})}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_files_is_one_line_naming_it_with_its_exit_status_and_nothing_left(case, tmp_path, monkeypatch,
                                                                                         capsys):
    for name, tool in MORE_TOOLS.items():
        monkeypatch.setitem(TOOLS, name, tool)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
    check(case, tmp_path, monkeypatch, capsys)


def test_every_tool_of_this_file_has_a_subprocess_case_and_every_item_its_cases():
    tools = {c.tool for c in CASES}
    assert tools == {"lrbench", "reproduce", *MORE_TOOLS}
    assert {c.tool for c in CASES if c.via == "python -m"} >= set(MORE_TOOLS) | {"lrbench"}
    assert len(CASES) >= 60


# -- beside the table ---------------------------------------------------------------------------------------------
def test_reproduce_names_the_model_family_as_the_reason_of_the_refusal(tmp_path, capsys):
    (tmp_path / "tables.yaml").write_text(registry({"LoRA": ENCODER_E2E,
                                                    "GPT": {**ENCODER_E2E, "model": "tiny-gpt2"}}))
    (tmp_path / "papers.csv").write_text(PAPERS)
    assert reproduce.main([a.replace("{tmp}", str(tmp_path)) for a in REPRO]) == 1  # one refused, one planned
    out = capsys.readouterr().out
    assert "refused before running (LrbenchError: task e2e needs a decoder (causal LM); model=tiny-roberta" in out


def test_the_lm_eval_task_file_of_a_subject_is_a_slug_in_the_temporary_folder(tmp_path):
    from lowrank_bench.evaluations.multiple_choice import Item, MultipleChoiceEval, checked_subject, slug

    evaluator = MultipleChoiceEval.__new__(MultipleChoiceEval)
    subject = "high school: biology (v2)"
    evaluator.cfg = OmegaConf.create({"name": "mmlu", "max_letters": None, "letter_prefix": "",
                                      "lm_eval": {"prompt": "lrbench", "apply_chat_template": False}})
    evaluator.subjects = {subject: [Item(subject, "q", ("a", "b"), 0, "x")]}
    evaluator.names, evaluator.prompts = {subject: subject}, {subject: ["prompt"]}
    task = evaluator.lm_eval_task(subject, tmp_path)
    (written,) = tmp_path.iterdir()
    assert written.name == "lrbench_mmlu_000_high_school_biology_v2.jsonl"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(written) and task["task"] == written.stem
    assert slug("../../evil") == "evil" and slug("..") == "subject"
    for bad in ("../../evil", "a/b", "a\\b", "..", "x\0y"):
        with pytest.raises(Exception, match="is not a subject name"):
            checked_subject(bad, "here")
    assert checked_subject("Abstract Algebra", "here") == "Abstract Algebra"


def test_the_preflight_leaves_nothing_where_it_tried(tmp_path, monkeypatch):
    from lowrank_bench.results import preflight

    monkeypatch.setenv("LRBENCH_CACHE_DIR", str(tmp_path / "cache" / "deep"))
    preflight(tmp_path / "results" / "deep" / "runs.csv", tmp_path / "outputs" / "runs" / "x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs.csv").write_text("method,model,task,seed\n")
    (tmp_path / "runs.csv.lock").write_text("")
    preflight(tmp_path / "runs.csv", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv", "runs.csv.lock"]  # someone's lock stays


def test_a_row_that_cannot_be_locked_fails_at_once_not_after_300_s(tmp_path):
    import time

    from lowrank_bench.errors import LrbenchError
    from lowrank_bench.results import append_row

    start = time.perf_counter()
    with pytest.raises(LrbenchError, match="results_csv=/proc/nope: cannot open its lock file"):
        append_row(Path("/proc/nope"), {"method": "lora"})
    assert time.perf_counter() - start < 5
