"""Bad input in `lrbench`'s own overrides (issue 26, items 3, 4, 5 and 11), one row per case, checked by the promise
of tests/test_bad_input_table.py (`check`): one line `lrbench error: ...` naming the value and what is valid, exit
status 2, before any training, nothing left behind (no row, no run or sweep folder).

- typos: a setting that no config has, added with `+` (`+trainer.max_step=2` trained 3 epochs) or set without it,
  names the closest real one; so does a sequence's stage that does not exist, and a stage added but never run;
- Hydra's refusals (an unknown method, model or task, nested ones listed; a key not in the config; `+` on a key
  already set; malformed syntax) are the tool's one line, not Hydra's block and exit 1;
- `key=null` and `~key` on a setting the run needs are refused, naming what is valid (null stays allowed where it
  means something: trainer.max_steps, method.targets, ...);
- in a `-m` sweep a bad value of any swept key refuses the whole sweep before any job runs.

The legitimate uses of the same syntax (`+` where a config leaves a key out) still pass; the documented commands are
tests/test_documented_commands.py's.
"""
from __future__ import annotations


import pytest
from conftest import compose_cfg
from test_bad_input_table import Case, check

from lowrank_bench import configs, validate
from lowrank_bench.train import STAGE_KEYS, command_line

TINY = ("model=tiny-roberta", "task=toy/sentiment", "logger=none")
TOY_SEQUENCE = ("model=tiny-roberta", "task=continual/toy", "logger=none")
METHODS = "valid: bidora, bilora, cola, curlora, dora, ft, lora, lotr, peft/adalora"


def lrbench(*argv: str, words: tuple[str, ...], id: str, via: str = "main") -> Case:
    return Case(id, "lrbench", argv, 2, words, via=via)


CASES = [
    # 3. typos: a setting no config has is named, with the closest real one
    lrbench(*TINY, "+trainer.max_step=2", id="typo +trainer.max_step",
            words=("unknown setting trainer.max_step", "did you mean trainer.max_steps?")),
    lrbench(*TINY, "+trainer.max_step=2", id="typo +trainer.max_step (subprocess)", via="python -m",
            words=("unknown setting trainer.max_step", "did you mean trainer.max_steps?")),
    lrbench(*TINY, "++trainer.max_step=2", id="typo ++trainer.max_step",
            words=("unknown setting trainer.max_step", "did you mean trainer.max_steps?")),
    lrbench(*TINY, "+method.rr=8", id="typo +method.rr", words=("unknown setting method.rr", "did you mean method.r?")),
    lrbench(*TINY, "+optimiser.lr=1e-3", id="typo +optimiser.lr",
            words=("unknown setting optimiser.lr", "did you mean optimizer.lr?")),
    lrbench(*TINY, "trainer.batchsize=8", id="typo trainer.batchsize",
            words=("unknown setting trainer.batchsize", "did you mean trainer.batch_size?")),
    lrbench(*TINY, "sed=1", id="typo sed", words=("unknown setting sed", "did you mean seed?")),
    lrbench(*TOY_SEQUENCE, "+task.stages.thrid.lr=1e-3", id="typo stage +task.stages.thrid",
            words=("+task.stages.thrid.lr=1e-3", "no stage 'thrid'", "its stages: first, second")),
    lrbench(*TOY_SEQUENCE, "+task.stages.first.lrr=1e-3", id="typo stage setting +task.stages.first.lrr",
            words=("unknown stage setting task.stages.first.lrr", "did you mean lr?", "valid:", "max_steps")),
    lrbench(*TOY_SEQUENCE, "task.every_stage.lrr=1e-3", id="typo task.every_stage.lrr",
            words=("task.every_stage.lrr", "did you mean", "lr")),
    lrbench(*TOY_SEQUENCE, "+task.stages.cola={task:glue/cola}", id="stage added but not in the sequence",
            words=("stage 'cola' is not in task.sequence=[first, second]", "task.sequence=[first, second, cola]")),
    lrbench(*TINY, "+task.stages.first.lr=1e-3", id="stage setting on a single task",
            words=("task=toy/sentiment is not a continual sequence", "task=continual/<name>")),
    lrbench(*TINY, "+eval.max_items=3", id="eval setting without an eval",
            words=("+eval.max_items=3", "no eval is chosen", "eval=<option>")),
    # 4. what Hydra refused with its own block and exit 1
    lrbench(*TINY, "method=nonexistent", id="unknown method", words=("method=nonexistent: no such method", METHODS)),
    lrbench(*TINY, "task=glue/sst", id="unknown task lists the nested ones",
            words=("task=glue/sst: no such task", "did you mean glue/sst2?", "glue/mrpc", "toy/sentiment")),
    lrbench(*TINY, "model=tiny-robert", id="unknown model",
            words=("model=tiny-robert: no such model", "did you mean tiny-roberta?", "valid:")),
    lrbench(*TINY, "optimizer=adam", id="unknown optimizer",
            words=("optimizer=adam: no such optimizer", "adamw")),
    lrbench(*TINY, "method.rr=8", id="key not in the config",
            words=("unknown setting method.rr", "did you mean method.r?")),
    lrbench(*TINY, "~method", id="~ on a group every run needs",
            words=("~method: every run needs a method", METHODS)),
    lrbench(*TINY, "method=null", id="null for a group every run needs",
            words=("method=null: every run needs a method", METHODS)),
    lrbench(*TINY, "eval=null", id="null for an optional group", words=("eval=null", "write ~eval")),
    lrbench(*TINY, "trainer=3", id="a mapping of settings given one value",
            words=("trainer=3: trainer holds settings", "batch_size", "trainer.<setting>=value")),
    lrbench(*TINY, "+trainer.batch_size=8", id="+ on a key already set",
            words=("+trainer.batch_size=8", "already a setting (=32)", "trainer.batch_size=8 without the +")),
    lrbench(*TINY, "model.path=/no/such/folder", id="model.path without + on a config-built model",
            words=("model.path is not set by this run's config", "model=tiny-roberta", "+model.path=/no/such/folder")),
    lrbench(*TINY, "+model.path=/no/such/folder", id="+model.path on a config-built model",
            words=("model.path=/no/such/folder does not apply to model=tiny-roberta", "source hub or path")),
    lrbench("model=roberta-base", "task=toy/sentiment", "logger=none", "model.path={tmp}/no_model",
            id="model.path that does not exist", words=("model.path=", "no_model", "no such folder")),
    lrbench(*TINY, "trainer.max_steps", id="malformed: no =",
            words=("malformed override 'trainer.max_steps'", "no '='", "key=value")),
    lrbench(*TINY, "trainer.batch_size=[1", id="malformed: unclosed list",
            words=("malformed override 'trainer.batch_size=[1'", "key=value")),
    lrbench(*TINY, "trainer.max_steps=2=3", id="malformed: two =",
            words=("malformed override 'trainer.max_steps=2=3'", "key=value")),
    lrbench(*TINY, "=3", id="malformed: no key", words=("malformed override '=3' (no key)", "key=value")),
    lrbench(*TINY, "method=lora,dora", id="sweep without -m",
            words=("method=lora,dora", "-m (--multirun)", "method=[a,b]")),
    lrbench(*TINY, "hydra.job.chdr=true", id="typo in Hydra's own settings",
            words=("unknown setting hydra.job.chdr", "did you mean hydra.job.chdir?")),
    lrbench(*TINY, "~trainer.nothing", id="~ on a key that does not exist",
            words=("unknown setting trainer.nothing", "trainer has:", "batch_size")),
    # 5. null (and ~) where the run needs a value
    lrbench(*TINY, "trainer.batch_size=null", id="trainer.batch_size=null",
            words=("trainer.batch_size=null", "must be an integer > 0")),
    lrbench(*TINY, "optimizer.lr=null", id="optimizer.lr=null", words=("optimizer.lr=null", "must be > 0")),
    lrbench(*TINY, "method.lr=null", id="method.lr=null", words=("method.lr=null", "must be > 0")),
    lrbench(*TINY, "method.r=null", id="method.r=null", words=("method.r=null", "must be an integer > 0")),
    lrbench(*TINY, "seed=null", id="seed=null", words=("seed=null", "must be an integer >= 0")),
    lrbench(*TINY, "trainer.epochs=null", id="trainer.epochs=null without max_steps",
            words=("trainer.epochs=null", "> 0", "null only with trainer.max_steps")),
    lrbench(*TINY, "trainer.precision=null", id="trainer.precision=null",
            words=("trainer.precision=null", "auto, fp32, bf16 or fp16")),
    lrbench(*TINY, "trainer.device=null", id="trainer.device=null",
            words=("trainer.device=null", "auto, cpu, cuda, cuda:N or mps")),
    lrbench(*TINY, "~trainer.batch_size", id="~trainer.batch_size",
            words=("~trainer.batch_size removes a setting the run reads", "trainer.batch_size must be an integer > 0")),
    lrbench(*TINY, "~method.r", id="~method.r", words=("~method.r removes", "method.r must be an integer > 0")),
    # 11. a sweep with a bad value is refused whole, before any job
    lrbench("-m", *TINY, "trainer.max_steps=1", "method=lora,nonexistent,dora", id="sweep with an unknown method",
            words=("method=nonexistent (in the sweep method=lora,nonexistent,dora): no such method", METHODS)),
    lrbench("-m", *TINY, "trainer.max_steps=1", "task=toy/sentiment,glue/sst", id="sweep with an unknown task",
            words=("task=glue/sst (in the sweep task=toy/sentiment,glue/sst)", "did you mean glue/sst2?")),
    lrbench("-m", *TINY, "trainer.max_steps=1", "method=lora,dora", "+method.orientaton=row",
            id="sweep with a typo", words=("unknown setting method.orientaton", "did you mean method.orientation?")),
    lrbench("-m", *TINY, "trainer.max_steps=1", "method.rr=4,8", id="sweep over a key not in the config",
            words=("unknown setting method.rr", "did you mean method.r?")),
    lrbench("-m", *TINY, "trainer.max_steps=1", "method=bidora,dora", "method.orientation=row",
            id="sweep setting only a swept option has, without ++",
            words=("method.orientation is not set by this run's config (method=lora", "++method.orientation=row")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_override_is_one_line_exit_2_and_nothing_left(case, tmp_path, monkeypatch, capsys):
    check(case, tmp_path, monkeypatch, capsys)


def test_every_item_has_its_cases():
    assert len(CASES) >= 25
    assert any(c.via == "python -m" for c in CASES)  # the real exit status, through a subprocess
    assert sum("-m" in c.argv for c in CASES) >= 3


# -- what stays allowed --------------------------------------------------------------------------------------------
def allowed(*overrides: str, multirun: bool = False) -> None:
    configs.check_command_line(list(overrides), multirun, STAGE_KEYS, validate.valid_text)


@pytest.mark.parametrize("overrides", [
    ["+trainer.max_steps=2"],  # a key whose value is null takes + (Hydra's rule)
    ["+model.path=/models/x"],  # a key other models have: the run's own check refuses it (test_bad_input.py)
    ["+trainer.load_best_model_at_end.save_steps=100"],  # a setting only the CoLA presets set
    ["++model.config.hidden_dropout_prob=0.0"],  # a Hugging Face config's field
    ["task=continual/toy", "+task.stages.first.lr=-1"],  # a stage setting (the sequence checks its range)
    ["task=continual/toy", "task.sequence=[first,books]",
     "+task.stages.books={task:sentiment/amazon_books,data_dir:/x,num_labels:3}"],  # a new stage, in the sequence
    ["task=continual/toy", "+task.stages.first.train_rows=first", "+task.stages.second.pooling=last_position"],
    ["task=continual/toy", "++task.standalone_accuracy={first:0.7,second:0.6}"],
    ["task=continual/toy", "task.every_stage.max_train_samples=200"],
    ["task=continual/offline", "task.sequence=[books]", "+task.stages.books.data_dir=/data"],
    ["eval=mc/mmlu", "eval.max_items=2"],
    ["experiment=bidora/roberta_base_mrpc", "trainer.max_steps=10"],
    ["hydra/launcher=slurm", "hydra.launcher.timeout_min=600"],
    ["trainer.max_steps=null", "method.targets=null", "trainer.eval_every=null", "trainer.checkpoint_every=null"],
    ["~eval"],  # a config group's entry, not a setting
], ids=lambda o: " ".join(o))
def test_legitimate_overrides_pass(overrides):
    allowed(*overrides)


@pytest.mark.parametrize("overrides", [
    ["method=lora,bidora", "++method.orientation=row"],  # reproduce.sweep_command's form
    ["method=ft,lora,dora", "seed=0,1", "model=tiny-roberta"],
    ["method.r=4,100,8"],  # a value out of range for one job is that job's failure (tests/test_sweep.py)
    ["experiment=bidora/roberta_base_rte", "seed=0,1,2,3,4"],
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=lora,dora"],
    ["seed=range(0,3)"],
    ["method=glob(peft/*)", "model=tiny-roberta"],
], ids=lambda o: " ".join(o))
def test_legitimate_sweeps_pass(overrides):
    allowed(*overrides, multirun=True)


@pytest.mark.parametrize("overrides", [
    ["trainer.max_steps=null", "trainer.epochs=3"], ["method.targets=null"], ["trainer.eval_every=null"],
    ["trainer.checkpoint_every=null"], ["trainer.max_grad_norm=null"], ["task.max_train_samples=null"],
    ["trainer.epochs=null", "trainer.max_steps=5"], ["optimizer.warmup_ratio=null", "optimizer.warmup_steps=10"],
], ids=lambda o: " ".join(o))
def test_null_stays_allowed_where_it_means_something(overrides):
    validate.check(compose_cfg("model=tiny-roberta", *overrides))


@pytest.mark.parametrize("argv", [["--help"], ["--hydra-help"], ["--info"], ["-sc", "install=bash"],
                                  ["--version"], ["-cn", "other"]])
def test_hydra_own_flags_are_left_to_hydra(argv):
    assert command_line(argv) is None


def test_cfg_job_and_multirun_are_read_like_hydra():
    args = command_line(["--cfg", "job", "method=dora"])
    assert args is not None and args.cfg == "job" and args.overrides == ["method=dora"]
    assert command_line(["-m", "seed=0,1"]).multirun
