"""lrbench-export: a run exported as a peft adapter loads with `PeftModel.from_pretrained` and gives our logits
(1e-5); exported merged, plain transformers loads it and gives our logits (1e-4), for every method; a model card;
bad input is one line, exit code 2, and leaves --out as it was."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lowrank_bench import export as lrexport
from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import Head, load_model
from lowrank_bench.train import run
from tests.conftest import compose_cfg

FAST = ["trainer.max_steps=2", "trainer.progress=false", "task.max_train_samples=64", "task.max_eval_samples=16"]
METHODS = ["lora", "dora", "bidora", "bilora", "lotr", "cola", "curlora", "ft"]


def perturb(adapter_file) -> None:
    """Move every saved float tensor (LoRA's B starts at zero) well away from its initialisation."""
    gen = torch.Generator().manual_seed(0)
    saved = load_file(str(adapter_file))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in saved.items()}, str(adapter_file))


class Runs:
    """Trained (then perturbed) runs, made once per model and method, with our logits on a validation batch."""

    def __init__(self, root):
        self.root, self.made, self.update_effect = root, {}, {}

    def __call__(self, model: str, method: str, *overrides: str):
        key = (model, method, *overrides)
        if key not in self.made:
            folder = self.root / "-".join(key).replace("/", "_")
            run(compose_cfg(f"model={model}", f"method={method}", *overrides, *FAST), folder)
            perturb(folder / "adapter.safetensors")
            setup, run_cfg = lrexport.load_run(folder)
            batch = setup.curriculum.task.collate(setup.curriculum.task.splits["validation"][:8])
            batch.pop("labels")
            setup.model.eval()
            with torch.no_grad():
                logits = setup.model(**batch).logits
                self.update_effect[key] = (logits - without_update(setup, batch)).abs().max().item()
            self.made[key] = folder, run_cfg, batch, logits, setup.tokenizer.pad_token_id
        return self.made[key]


def without_update(setup, batch) -> torch.Tensor:
    """Our logits with every adapted layer's update switched off (the head and base weights as trained)."""
    if isinstance(setup.model, PeftModel):
        with setup.model.disable_adapter():
            return setup.model(**batch).logits
    layers = adapted_layers(setup.model).values()
    for layer in layers:
        layer.merged = True  # an adapted layer that believes itself merged returns its base layer's output
    logits = setup.model(**batch).logits
    for layer in layers:
        layer.merged = False
    return logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("export_runs"))


def without_token_types(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "token_type_ids"}


def base_checkpoint(run_cfg, pad_token_id, folder):
    """The base model as a user has it: the run's seeded weights (these models are built from a config) saved as a
    checkpoint, then loaded as a sequence classifier whose head is fresh."""
    torch.manual_seed(run_cfg.seed)
    head = Head("causal_lm") if run_cfg.model.kind == "decoder" else Head("sequence_classification", 2)
    load_model(run_cfg.model, head, pad_token_id).save_pretrained(folder)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, pad_token_id=pad_token_id).eval()


PEFT = [("tiny-roberta", "lora"), ("tiny-roberta", "lora", "method.rslora=true", "method.alpha=4"),
        ("tiny-roberta", "dora"), ("tiny-roberta", "bidora"),
        ("tiny-roberta", "bidora", "method.init_a=normal", "method.scale=one"),  # the presets' official scale s = 1
        ("tiny-roberta", "peft/lora"), ("tiny-gpt2", "lora"),
        ("tiny-gpt2", "dora"), ("tiny-gpt2", "peft/lora"), ("tiny-llama", "dora")]


@pytest.mark.parametrize("case", PEFT, ids="-".join)
def test_peft_export_gives_our_logits(runs, tmp_path, case):
    folder, run_cfg, batch, ours, pad = runs(*case)
    method = case[1]
    out = lrexport.export(folder, "peft", tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] == run_cfg.method.get("rslora", False)  # scaling alpha / sqrt(r) rather than / r
    if run_cfg.method.get("scale") == "one":
        assert config["lora_alpha"] == config["r"]
    head = "score" if run_cfg.model.kind == "decoder" else "classifier"
    assert config["peft_type"] == "LORA" and head in config["modules_to_save"]
    assert config["use_dora"] == (method in ("dora", "bidora"))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 1e-2

    theirs = PeftModel.from_pretrained(base_checkpoint(run_cfg, pad, tmp_path / "base"), out).eval()
    loaded = get_peft_model_state_dict(theirs)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)  # every key placed
    inputs = without_token_types(batch) if run_cfg.model.kind == "decoder" else batch
    with torch.no_grad():
        assert (theirs(**inputs).logits - ours).abs().max().item() < 1e-5
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.zero_()
        assert (theirs(**inputs).logits - ours).abs().max().item() > 1e-3  # the factors made the difference


MERGED = [("tiny-roberta", m) for m in METHODS] + [("tiny-roberta", "peft/lora"), ("tiny-gpt2", "lora"),
                                                    ("tiny-llama", "bidora")]


@pytest.mark.parametrize("model,method", MERGED)
def test_merged_export_gives_our_logits_with_plain_transformers(runs, tmp_path, model, method):
    folder, run_cfg, batch, ours, _ = runs(model, method)
    out = lrexport.export(folder, "merged", tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"][0].endswith("ForSequenceClassification")
    theirs, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # exactly the weights of the class
    tokenizer = AutoTokenizer.from_pretrained(out)
    theirs.eval()
    with torch.no_grad():
        logits = theirs(**{k: v for k, v in batch.items() if k in tokenizer.model_input_names}).logits
    assert (logits - ours).abs().max().item() < 1e-4
    if run_cfg.model.kind == "decoder":  # the conventions of transformers' classifier that equal ours
        assert tokenizer.padding_side == "right" and "token_type_ids" not in tokenizer.model_input_names
        assert theirs.config.pad_token_id == tokenizer.pad_token_id


def test_the_model_card_names_what_was_trained_and_its_metrics(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "dora")
    summary = json.loads((folder / "summary.json").read_text())
    card = (lrexport.export(folder, "peft", tmp_path / "card") / "README.md").read_text()
    for text in ("tiny-roberta", "method: dora, rank 8", "task: toy/sentiment",
                 f"commit of the run: {summary['git_commit']}", "lrbench version 0.1.0", "PeftModel.from_pretrained",
                 f"| best_accuracy | {summary['best_accuracy']:.4f} |", f"| last_step | {summary['last_step']} |"):
        assert text in card, text


@pytest.mark.parametrize("method", ["cola", "ft"])
def test_a_format_the_method_cannot_take_is_refused(runs, tmp_path, method):
    folder, *_ = runs("tiny-roberta", method)
    with pytest.raises(LrbenchError, match=f"^method={method} cannot be expressed as a peft adapter; "
                                           "use --format merged$"):
        lrexport.export(folder, "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_inexpressible_variants_are_refused_from_the_config():
    official = compose_cfg("method=bidora", "method.orientation=official")
    with pytest.raises(LrbenchError, match="orientation=official .* cannot be expressed as a peft adapter"):
        lrexport.check_format(official, "peft")
    with pytest.raises(LrbenchError, match="method=peft/pissa .* residual .* use --format merged"):
        lrexport.check_format(compose_cfg("method=peft/pissa"), "peft")
    lrexport.check_format(official, "merged")


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_a_run_folder_without_its_files_is_one_clear_line(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "lora")
    broken = copy_of(folder, tmp_path)
    (broken / "adapter.safetensors").unlink()
    with pytest.raises(LrbenchError, match="no adapter.safetensors"):
        lrexport.export(broken, "merged", tmp_path / "out")
    (broken / "config_resolved.yaml").unlink()
    with pytest.raises(LrbenchError, match="no config_resolved.yaml"):
        lrexport.export(broken, "merged", tmp_path / "out")
    with pytest.raises(LrbenchError, match="no such run folder"):
        lrexport.export(tmp_path / "nowhere", "merged", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_does_not_fit_leaves_out_untouched(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "lora")
    changed = copy_of(folder, tmp_path)
    resolved = changed / "config_resolved.yaml"
    resolved.write_text(resolved.read_text().replace("  r: 8\n", "  r: 4\n"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LrbenchError, match="adapter .* does not fit the model of tiny-roberta with method=lora"):
        lrexport.export(changed, "peft", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out"]  # no staging folder left behind


def test_a_failure_while_writing_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    folder, *_ = runs("tiny-roberta", "lora")

    def half_written(setup, run_cfg, staging):
        (staging / "config.json").write_text("{}")
        raise LrbenchError("disk full")

    monkeypatch.setattr(lrexport, "write_merged", half_written)
    with pytest.raises(LrbenchError, match="disk full"):
        lrexport.export(folder, "merged", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_out_is_refused_unless_overwritten(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LrbenchError, match="exists and is not empty; remove it or pass --overwrite"):
        lrexport.export(folder, "peft", out)
    lrexport.export(folder, "peft", out, overwrite=True)
    assert (out / "adapter_config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_cli_prints_one_line_and_exits_2(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "cola")
    command = [sys.executable, "-m", "lowrank_bench.export", str(folder), "--format", "peft", "--out",
               str(tmp_path / "out")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr.strip() == ("lrbench error: method=cola cannot be expressed as a peft adapter; "
                                     "use --format merged")
    assert not (tmp_path / "out").exists()


def test_the_compared_updates_change_the_logits(runs):
    """The equalities above are not trivial: every compared update moves our logits by far more than 1e-4."""
    for case in PEFT + MERGED:
        runs(*case)
    effects = {key: effect for key, effect in runs.update_effect.items() if key[1] != "ft"}  # ft: no update apart
    assert effects and all(effect > 1e-3 for effect in effects.values()), effects
