"""Every experiment preset composes, names only options that exist and passes the settings check; the reproduce
registry's tables compose too. Composing only: no model is loaded, nothing trains."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from lowrank_bench.errors import LrbenchError
from lowrank_bench.reproduce import REGISTRY, load_registry, plan, plan_runs
from lowrank_bench.validate import check
from tests.conftest import CONF, compose_cfg

PRESETS = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                 for p in (CONF / "experiment").rglob("*.yaml"))


def groups_overridden(name: str) -> dict[str, str]:
    """The `override /<group>: <option>` entries of a preset's defaults list."""
    text = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    out = {}
    for entry in text.get("defaults", []):
        if isinstance(entry, dict):
            for key, option in entry.items():
                if key.startswith("override /"):
                    out[key.removeprefix("override /")] = option
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_passes_the_settings_check(name):
    cfg = compose_cfg(f"experiment={name}")
    try:
        check(cfg)
    except LrbenchError as err:
        pytest.fail(f"experiment={name}: {err}")
    for group, option in groups_overridden(name).items():
        assert (CONF / group / f"{option}.yaml").is_file(), f"{name}: no lowrank_bench/conf/{group}/{option}.yaml"
        if group in ("method", "model", "task"):  # options named as they are selected (optimizer, eval: not)
            assert cfg[group].name == option, f"{name}: {group} is {cfg[group].name}, the preset says {option}"


def test_presets_cover_the_papers_headline_tables():
    expected = [f"lora/roberta_{size}_{task}" for size in ("base", "large")
                for task in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")]
    expected += [name.replace("lora/", "bilora/") for name in expected]
    expected += [f"bidora/roberta_large_{t}" for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")]
    expected += [f"lotr/roberta_base_{t}" for t in ("cola", "mrpc", "qnli", "rte", "sst2", "stsb", "wnli")]
    expected += ["curlora/mistral_7b_continual", "curlora/gpt2_large_continual", "lora/roberta_base_ft",
                 "lora/roberta_large_ft"]
    assert not [name for name in expected if name not in PRESETS]


def test_curlora_presets_carry_the_papers_settings():
    mistral = compose_cfg("experiment=curlora/mistral_7b_continual")
    assert (mistral.model.name, mistral.task.name, mistral.trainer.batch_size, mistral.model.max_length) == \
        ("mistral-7b", "continual/curlora", 8, 512)
    assert (mistral.optimizer.lr, mistral.optimizer.schedule, mistral.optimizer.warmup_steps) == (2.5e-4, "cosine", 500)
    gpt2 = compose_cfg("experiment=curlora/gpt2_large_continual")
    assert (gpt2.trainer.batch_size, gpt2.model.max_length, gpt2.task.stages.sst2.max_train_samples) == (32, 256, 5000)
    assert (gpt2.task.stages.s140.epochs, gpt2.task.stages.s140.schedule) == (5, "constant")
    lora = compose_cfg("experiment=curlora/mistral_7b_continual", "method=lora", "method.targets=qkv", "method.r=8",
                       "method.alpha=8")
    assert lora.method.alpha / lora.method.r == 1  # the paper's LoRA: alpha x A B, alpha 1, no 1/r


def test_the_lora_glue_recipe_uses_the_effective_batch_of_all_gpus():
    cfg = compose_cfg("experiment=lora/roberta_base_cola")  # 32 per device x 2 GPUs
    assert (cfg.trainer.batch_size, cfg.optimizer.lr, cfg.trainer.epochs, cfg.method.r, cfg.method.alpha) == \
        (64, 4e-4, 80, 8, 16)
    large = compose_cfg("experiment=lora/roberta_large_rte")  # 8 per device x 8 GPUs
    assert (large.trainer.batch_size, large.model.max_length, large.optimizer.warmup_ratio) == (64, 512, 0.06)


def every_table_composes(scale: str) -> None:
    planned = plan_runs(plan(load_registry(REGISTRY), scale), rows=[])
    assert not planned.errors, f"{scale}: " + "; ".join(planned.errors.values())
    assert planned.pending  # something to run


def test_every_registry_table_composes_at_the_smoke_scale():
    every_table_composes("smoke")


@pytest.mark.slow
def test_every_registry_table_composes_at_full_scale():  # ~370 configurations: half a minute on 2 cores
    every_table_composes("full")


def test_registry_names_only_its_own_runs_and_columns():
    registry = load_registry(REGISTRY)
    for name, spec in registry["tables"].items():
        runs, columns = set(spec["runs"]), set(spec["columns"])
        for comparison in spec.get("compare", []):
            assert {label for pair in comparison["pairs"] for label in pair} <= runs, name
            assert set(comparison.get("columns", [])) <= columns, name
        for scale in registry["scales"]:
            subset = spec.get(scale, {})
            assert set(subset.get("runs", [])) <= runs and set(subset.get("columns", [])) <= columns, name
        for variables in spec["columns"].values():
            assert set(variables.get("mean_of", [])) <= columns, name


def test_colas_pissa_baseline_runs_llama_factorys_16_fast_svd_iterations_and_the_default_stays_4():
    from omegaconf import OmegaConf

    from lowrank_bench.methods.peft_baseline import peft_config

    presets = sorted((CONF / "experiment" / "cola").glob("*.yaml"))
    assert len(presets) == 12
    for path in presets:
        cfg = compose_cfg(f"experiment=cola/{path.stem}", "method=peft/pissa", "method.config.lora_alpha=16")
        options = OmegaConf.to_container(cfg.method.config, resolve=True)
        assert options["init_lora_weights"] == "pissa_niter_16", path.stem
        assert peft_config("LORA", options).init_lora_weights == "pissa_niter_16"
        assert compose_cfg(f"experiment=cola/{path.stem}").method.name == "cola"  # the preset's own method
    assert compose_cfg("method=peft/pissa").method.config.init_lora_weights == "pissa_niter_4"


@pytest.mark.parametrize("preset", ["curlora/gpt2_large_continual", "curlora/mistral_7b_continual"])
def test_curlora_presets_use_the_notebooks_adamw_without_clipping(preset):
    """transformers.AdamW(model.parameters(), lr=lr): weight decay 0, eps 1e-6; the loops never clip (issue 23)."""
    import torch

    from lowrank_bench.optim import make_optimizer

    cfg = compose_cfg(f"experiment={preset}")
    assert cfg.trainer.max_grad_norm is None
    matrix, vector = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    optimizer, _ = make_optimizer([matrix, vector], cfg.optimizer, total_steps=10)
    assert [(g["weight_decay"], g["eps"], g["lr"] * 500) for g in optimizer.param_groups] == \
        [(0.0, 1e-6, pytest.approx(2.5e-4))] * 2  # lr seen at warmup step 0: 2.5e-4 / 500
    assert cfg.task.perplexity.corpus == "wikitext-2-raw-v1/test"
    assert cfg.task.perplexity.max_tokens == (256 if "gpt2" in preset else 10000)  # GPT-2: the code's max_len


def test_the_curlora_sequence_reads_the_paper_and_the_notebooks_as_protocols(monkeypatch):
    from lowrank_bench.curriculum import sequence

    def plans(*overrides):
        cfg = compose_cfg("experiment=curlora/mistral_7b_continual", *overrides)
        built = {}

        def build(task_cfg):  # the stage's settings, not its data
            built[task_cfg.name] = task_cfg
            return SimpleNamespace(head=SimpleNamespace(kind="sequence_classification"), cfg=task_cfg,
                                   subsample=lambda examples, split: examples[::-1], train_split="train")
        monkeypatch.setattr(sequence.tasks, "build", build)
        return sequence.Sequence(cfg).plans, built

    paper, cfgs = plans()
    assert [p.pooling for p in paper] == ["last_token"] * 3
    rows = list(range(3000))  # train_rows first: the first 1,000 rows, not the task's own subset (here: reversed)
    assert [p.task.subsample(rows, "train") for p in paper] == [rows[:1000]] * 3
    assert paper[0].task.subsample(rows, "validation") == rows[::-1]  # evaluation rows: the task's own choice
    s140 = cfgs["sentiment/sentiment140"]
    assert (s140.label_map, s140.num_labels, s140.get("head_outputs"), s140.eval_rows) == ("three_way", 3, None,
                                                                                          "seeded")
    notebook, cfgs = plans("task.protocol=notebook")
    assert [p.pooling for p in notebook] == ["last_position"] * 3
    s140 = cfgs["sentiment/sentiment140"]
    assert (s140.label_map, s140.num_labels, s140.head_outputs, s140.eval_rows) == ("div4", 2, 3, "first")
