"""Bad input, case by case: every one is refused with one line naming the setting (or file) and what is valid,
within seconds, before the model trains, with no row and no run folder. In process (`run`), so that 40+ cases stay
cheap; tests/test_preflight.py and tests/test_cli.py check the same path through the command line (exit code 2)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from lowrank_bench.errors import LrbenchError
from lowrank_bench.train import run
from tests.conftest import compose_cfg

TINY = ["model=tiny-roberta", "trainer.max_steps=2", "trainer.progress=false"]

CASES = [
    # the trainer
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be an integer > 0"),
    (["trainer.batch_size=8.5"], "trainer.batch_size=8.5: must be an integer"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc': must be an integer"),
    (["trainer.eval_batch_size=-1"], "trainer.eval_batch_size=-1: must be an integer > 0"),
    (["trainer.grad_accum=0"], "trainer.grad_accum=0: must be an integer > 0"),
    (["trainer.eval_every=0"], "trainer.eval_every=0: must be an integer > 0"),
    (["trainer.log_every=-5"], "trainer.log_every=-5: must be an integer > 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be > 0"),
    (["trainer.max_steps=-3"], "trainer.max_steps=-3: must be > 0"),
    (["trainer.max_steps=null", "trainer.epochs=0"], "trainer.epochs=0: must be > 0"),
    (["trainer.max_steps=null", "trainer.epochs=-1"], "trainer.epochs=-1: must be > 0"),
    (["trainer.max_grad_norm=0"], "trainer.max_grad_norm=0: must be > 0, or null"),
    (["trainer.precision=fp8"], "trainer.precision=fp8: must be auto, fp32, bf16 or fp16"),
    (["trainer.device=tpu"], "trainer.device=tpu: must be auto, cpu, cuda, cuda:N or mps"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1: must be an integer >= 0"),
    (["trainer.progress=maybe"], "trainer.progress='maybe': must be true or false"),
    (["seed=-1"], "seed=-1: must be an integer >= 0"),
    (["seed=1.5"], "seed=1.5: must be an integer"),
    # the optimiser
    (["optimizer.lr=0"], "optimizer.lr=0: must be > 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001: must be > 0"),
    (["optimizer.lr=fast"], "optimizer.lr='fast': must be a number"),
    (["optimizer.lr=nan"], "optimizer.lr=nan: must be a number"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be >= 0"),
    (["optimizer.warmup_ratio=1.5"], "optimizer.warmup_ratio=1.5: must be 0 <= warmup_ratio < 1"),
    (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps=-1: must be an integer >= 0"),
    (["optimizer.schedule=exp"], "optimizer.schedule=exp: must be linear, cosine or constant"),
    (["optimizer.eps=0"], "optimizer.eps=0: must be > 0"),
    # the method
    (["method.r=0"], "method.r=0: must be an integer > 0"),
    (["method.r=100"], "rank r=100 is impossible for layer"),
    (["method.r=2.5"], "method.r=2.5: must be an integer"),
    (["method.alpha=0"], "method.alpha=0: must be > 0"),
    (["method.dropout=1.0"], "method.dropout=1.0: must be 0 <= dropout < 1"),
    (["method.dropout=-0.1"], "method.dropout=-0.1: must be 0 <= dropout < 1"),
    (["method=curlora", "method.r=0"], "method.r=0: must be an integer > 0"),
    (["method=dora", "method.r=-4"], "method.r=-4: must be an integer > 0"),
    (["method.targets=[nothing_like_this]"], "nothing_like_this"),
    # the model and the task
    (["model.max_length=0"], "model.max_length=0: must be an integer > 0"),
    (["task.max_length=-1"], "task.max_length=-1: must be an integer > 0"),
    (["task.max_train_samples=0"], "task.max_train_samples=0: must be an integer > 0"),
    (["task.max_eval_samples=-2"], "task.max_eval_samples=-2: must be an integer > 0"),
    (["+model.path=/models/x"], "model.path=/models/x does not apply to model=tiny-roberta"),
    (["task=glue/rte", "task.data_dir=/no/such/glue"], "task.data_dir=/no/such/glue"),
    (["task=ner/conll2003", "task.data_dir=/no/such/conll"], "task.data_dir=/no/such/conll: no such folder"),
    (["trainer.resume=/no/such/run"], "trainer.resume=/no/such/run"),
    # where the data comes from (task.source)
    (["task=glue/rte", "task.source=bogus"], "task.source=bogus: must be auto, local or hub"),
    (["task=glue/rte", "task.source=1"], "task.source=1: must be one of auto, local or hub"),
    (["task=glue/rte", "task.source=hub", "task.data_dir=/data/glue"],
     "task.data_dir=/data/glue is a local folder but task.source=hub reads the Hub only"),
    (["task=sentiment/amazon_books", "task.source=hub"], "task.source=hub: this data has no Hub copy"),
    (["task=continual/toy", "task.every_stage.source=bogus"], "stage 'first' of continual/toy"),
    (["task=continual/toy", "task.every_stage.source=hub"], "task.source=hub does not apply to toy/sentiment"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_refused_in_seconds_with_the_setting_and_nothing_written(tmp_path, overrides, message):
    csv_path = tmp_path / "runs.csv"
    cfg = compose_cfg(*TINY, *overrides, f"results_csv={csv_path}")
    start = time.perf_counter()
    with pytest.raises(LrbenchError) as error:
        run(cfg, tmp_path / "run")
    assert message in str(error.value), str(error.value)
    assert "\n" not in str(error.value).strip()  # one line
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists() and not csv_path.exists()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


# -- data sources and data files ---------------------------------------------------------------------------------
def refused(tmp_path, *overrides: str, model: str = "tiny-roberta") -> str:
    """The in-process refusal of one run: its message, with the same promises as above."""
    csv_path = tmp_path / "runs.csv"
    cfg = compose_cfg(f"model={model}", "trainer.max_steps=2", "trainer.progress=false", *overrides,
                      f"results_csv={csv_path}")
    start = time.perf_counter()
    with pytest.raises(LrbenchError) as error:
        run(cfg, tmp_path / "run")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists() and not csv_path.exists()
    message = str(error.value)
    assert "\n" not in message.strip(), message
    return message


def test_source_local_without_a_local_folder_names_the_folder_and_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    message = refused(tmp_path, "task=glue/rte", "task.source=local")
    assert "task.source=local but there is no local data" in message
    assert "task.data_dir=" in message and "$LRBENCH_DATA_DIR/glue/RTE" in message, message


@pytest.mark.parametrize("source", ["local", "auto"])
def test_a_data_dir_without_the_tasks_folder_is_an_error_never_a_silent_hub(tmp_path, monkeypatch, source):
    (tmp_path / "data" / "glue" / "SST-2").mkdir(parents=True)  # another task's folder only
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "data"))
    message = refused(tmp_path, "task=glue/rte", f"task.source={source}")
    assert f"LRBENCH_DATA_DIR={tmp_path / 'data'} has no folder glue/RTE" in message, message
    assert "task.source=hub to read the Hub" in message


def test_a_sequence_stage_without_its_folder_says_which_stage(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("LRBENCH_DATA_DIR", str(tmp_path / "data"))
    message = refused(tmp_path, "task=continual/offline", "task.sequence=[books]")
    assert "stage 'books' of continual/offline" in message and "has no folder sentiment/amazon-books" in message


NOT_UTF8 = b"\xff\xfe not text"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# (name, files under tmp_path/data: {relative path: content}, overrides, model, the culprit's message)
DATA_CASES = [
    ("glue tsv empty", {"SST-2/train.tsv": b"", "SST-2/dev.tsv": "sentence\tlabel\nok\t1\n"},
     ["task=glue/sst2", "task.data_dir={data}"], "tiny-roberta", "SST-2/train.tsv: the file is empty"),
    ("ner conll empty", {"train.txt": b"", "valid.txt": "EU B-ORG\n"},
     ["task=ner/conll2003", "task.data_dir={data}"], "tiny-roberta", "train.txt: the file is empty"),
    ("ner conll not utf8", {"train.txt": b"EU B-ORG\n\nrejects O\n" + NOT_UTF8, "valid.txt": "EU B-ORG\n"},
     ["task=ner/conll2003", "task.data_dir={data}"], "tiny-roberta", "train.txt:4: not UTF-8 (byte 0xff)"),
    ("e2e csv empty", {"devset.csv": b""},
     ["task=e2e", "task.data_dir={data}"], "tiny-gpt2", "devset.csv: the file is empty"),
    ("e2e csv not utf8", {"devset.csv": b"mr,ref\nname[A],A is good.\n" + NOT_UTF8},
     ["task=e2e", "task.data_dir={data}"], "tiny-gpt2", "devset.csv:3: not UTF-8 (byte 0xff)"),
    ("amazon tsv empty", {"train.tsv": b"", "dev.tsv": "sentence\tlabel\nok\t1\n"},
     ["task=sentiment/amazon_books", "task.data_dir={data}"], "tiny-roberta", "train.tsv: the file is empty"),
    ("amazon tsv not utf8", {"train.tsv": b"sentence\tlabel\ngood\t1\n" + NOT_UTF8 + b"\t0\n",
                             "dev.tsv": "sentence\tlabel\nok\t1\n"},
     ["task=sentiment/amazon_books", "task.data_dir={data}"], "tiny-roberta", "train.tsv:3: not UTF-8 (byte 0xff)"),
    ("sentiment140 csv empty", {"test.csv": b"", "train.csv": "text,sentiment\nok,4\n"},
     ["task=sentiment/sentiment140", "task.data_dir={data}"], "tiny-roberta", "test.csv: the file is empty"),
    ("sentiment140 csv not utf8", {"test.csv": b"text,sentiment\nbad,0\n" + NOT_UTF8 + b",4\n",
                                   "train.csv": "text,sentiment\nok,4\n"},
     ["task=sentiment/sentiment140", "task.data_dir={data}"], "tiny-roberta", "test.csv:3: not UTF-8 (byte 0xff)"),
    ("sft jsonl empty", {"rows.jsonl": b""},
     ["task=sft/math", "task.files=[{data}/rows.jsonl]"], "tiny-gpt2", "rows.jsonl: the file is empty"),
    ("sft json not utf8", {"rows.json": b'[{"instruction": "a",\n "output": "' + NOT_UTF8 + b'"}]'},
     ["task=sft/math", "task.files=[{data}/rows.json]"], "tiny-gpt2", "rows.json:2: not UTF-8 (byte 0xff)"),
    ("sft csv not utf8", {"rows.csv": b"instruction,output\n" + NOT_UTF8 + b",b\n"},
     ["task=sft/math", "task.files=[{data}/rows.csv]"], "tiny-gpt2", "rows.csv:2: not UTF-8 (byte 0xff)"),
    ("sft jsonl malformed line", {"rows.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": \n'},
     ["task=sft/math", "task.files=[{data}/rows.jsonl]"], "tiny-gpt2", "rows.jsonl:2: malformed JSON line"),
    ("continual stage tsv empty", {"train.tsv": b"", "dev.tsv": "sentence\tlabel\nok\t1\n"},
     ["task=continual/offline", "task.sequence=[books]", "+task.stages.books.data_dir={data}"], "tiny-roberta",
     "train.tsv: the file is empty"),
]


@pytest.mark.parametrize("files, overrides, model, message", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_an_empty_or_non_utf8_data_file_is_named_with_its_line(tmp_path, monkeypatch, files, overrides, model,
                                                               message):
    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    data = tmp_path / "data"
    for name, content in files.items():
        write(data / name, content)
    text = refused(tmp_path, *(o.format(data=data) for o in overrides), model=model)
    assert message in text and str(data) in text, text


def test_through_the_command_line_a_bad_source_exits_2_naming_it(tmp_path, monkeypatch):
    from tests.test_preflight import refused as refused_by_cli

    monkeypatch.delenv("LRBENCH_DATA_DIR", raising=False)
    stderr, _ = refused_by_cli(tmp_path / "bogus", "task=glue/rte", "task.source=bogus")
    assert "task.source=bogus: must be auto, local or hub" in stderr
    stderr, _ = refused_by_cli(tmp_path / "local", "task=glue/rte", "task.source=local")
    assert "task.source=local but there is no local data" in " ".join(stderr.split())
