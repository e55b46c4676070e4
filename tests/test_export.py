"""lrbench-export: a run exported as a peft adapter loads with `PeftModel.from_pretrained` and gives our logits
(1e-5), also with `dense` among the targets (RoBERTa's head has a `dense` too); exported merged, plain transformers
loads it and gives our logits (1e-4; bf16 weights within 1e-1 of the largest logit), for every method; the task's
class names in id2label; a model card naming a Hub base by its id; an export that does not reproduce the run is one
line and leaves nothing; bad input is one line, exit code 2, and leaves --out as it was."""
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


WITH_DENSE = "method.targets=[query,key,value,dense]"  # `dense` names layers of the encoder and of RoBERTa's head
PEFT = [("tiny-roberta", "lora"), ("tiny-roberta", "lora", "method.rslora=true", "method.alpha=4"),
        ("tiny-roberta", "lora", WITH_DENSE), ("tiny-roberta", "peft/lora", WITH_DENSE),
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
    assert theirs.config.id2label == {0: "negative", 1: "positive"}  # toy/sentiment's classes
    if run_cfg.model.kind == "decoder":  # the conventions of transformers' classifier that equal ours
        assert tokenizer.padding_side == "right" and "token_type_ids" not in tokenizer.model_input_names
        assert theirs.config.pad_token_id == tokenizer.pad_token_id


def test_the_model_card_names_what_was_trained_and_its_metrics(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "dora")
    summary = json.loads((folder / "summary.json").read_text())
    card = (lrexport.export(folder, "peft", tmp_path / "card") / "README.md").read_text()
    for text in ("tiny-roberta", "method: dora, rank 8", "task: toy/sentiment",
                 f"commit of the run: {summary['git_commit']}",
                 f"lrbench version {summary.get('lrbench', lrexport.lrbench_version())}", "PeftModel.from_pretrained",
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

    def half_written(setup, run_cfg, staging, dtype):
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


# -- the head is never adapted ----------------------------------------------------------------------------------
def test_dense_targets_adapt_the_encoder_and_leave_the_head_whole(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "lora", WITH_DENSE)
    setup, _ = lrexport.load_run(folder)
    adapted = set(adapted_layers(setup.model))
    assert {"roberta.encoder.layer.1.attention.output.dense", "roberta.encoder.layer.1.output.dense"} <= adapted
    assert len(adapted) == 2 * 6 and not [n for n in adapted if n.startswith("classifier")]  # q, k, v, 3 dense
    out = lrexport.export(folder, "peft", tmp_path / "peft")
    saved, trained = load_file(str(out / "adapter_model.safetensors")), load_file(str(folder / "adapter.safetensors"))
    assert torch.equal(saved["base_model.model.classifier.dense.weight"], trained["classifier.dense.weight"])
    assert [k for k in saved if "lora" in k and ".classifier." in k] == []


def test_a_peft_run_with_dense_targets_excludes_the_head(runs, tmp_path):
    folder, *_ = runs("tiny-roberta", "peft/lora", WITH_DENSE)
    config = json.loads((lrexport.export(folder, "peft", tmp_path / "peft") / "adapter_config.json").read_text())
    assert config["exclude_modules"] == ["classifier.dense"] and config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == ["dense", "key", "query", "value"]


def test_targets_that_match_only_the_head_are_one_line():
    from lowrank_bench.methods import build
    from tests.conftest import base_model, method_cfg

    model, _ = base_model("tiny-roberta")
    with pytest.raises(LrbenchError, match=r"^targets \['out_proj'\] match only layers of the task head "
                                           r"\(classifier.out_proj\), which trains whole; target layers of the "
                                           "backbone$"):
        build(method_cfg("lora", targets=["out_proj"])).apply(model, ["classifier"], {})


def test_an_adapter_inside_the_head_is_never_written():
    with pytest.raises(LrbenchError, match="adapted 'classifier.dense' inside its task head .* use --format merged"):
        lrexport.check_head_not_adapted(["roberta.encoder.layer.0.output.dense", "classifier.dense"], ["classifier"])


# -- labels, precision, model card -------------------------------------------------------------------------------
CONLL_TRAIN = """EU B-ORG\nrejects O\nGerman B-MISC\ncall O\n\nPeter B-PER\nBlackburn I-PER\n\nin O\nNew B-LOC
York I-LOC\n"""
CONLL_VALID = """Nadim B-PER\nLadki I-PER\nvisited O\nLoughborough B-LOC\n"""


def test_ner_exports_name_their_tags(tmp_path):
    data = tmp_path / "conll"
    data.mkdir()
    (data / "train.txt").write_text(CONLL_TRAIN)
    (data / "valid.txt").write_text(CONLL_VALID)
    folder = tmp_path / "run"
    run(compose_cfg("model=tiny-roberta", "method=lora", "task=ner/conll2003", f"task.data_dir={data}", *FAST), folder)
    out = lrexport.export(folder, "merged", tmp_path / "merged")
    tags = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]  # O, then by type
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): tag for i, tag in enumerate(tags)}
    assert config["label2id"] == {tag: i for i, tag in enumerate(tags)}
    assert "- labels: O, B-LOC, I-LOC, B-MISC" in (out / "README.md").read_text()


@pytest.mark.parametrize("subset,names", [("sst2", ["negative", "positive"]),
                                          ("wnli", ["not_entailment", "entailment"]),
                                          ("mnli", ["entailment", "neutral", "contradiction"]), ("stsb", None)])
def test_glue_tasks_name_their_classes_as_the_hub_does(subset, names):
    from lowrank_bench.tasks import build

    assert build(compose_cfg(f"task=glue/{subset}", "task.source=hub").task).label_names() == names


def test_a_bf16_merged_export_loads_in_bf16_within_its_tolerance(runs, tmp_path):
    folder, _, batch, ours, _ = runs("tiny-roberta", "lora")
    out = lrexport.export(folder, "merged", tmp_path / "bf16", dtype="bf16")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    theirs = AutoModelForSequenceClassification.from_pretrained(out).eval()  # as the model card says
    assert theirs.dtype == torch.bfloat16 and "- weights in bf16" in (out / "README.md").read_text()
    with torch.no_grad():
        difference = (theirs(**batch).logits.float() - ours).abs().max().item()
    assert 0 < difference <= 1e-1 * max(1.0, ours.abs().max().item())  # rounded (not fp32), within the tolerance
    assert lrexport.TOLERANCE[torch.bfloat16] == 1e-1


def test_peft_exports_take_no_dtype():
    with pytest.raises(LrbenchError, match="^--dtype bf16 applies to --format merged"):
        lrexport.check_format(compose_cfg("method=lora"), "peft", "bf16")


def test_the_model_card_names_a_hub_base_by_its_id(tmp_path):
    run_cfg = compose_cfg("model=roberta-base", f"model.path={tmp_path}", "method=lora")
    card = lrexport.model_card(run_cfg, {}, "peft", Head("sequence_classification", 2), 1, ["neg", "pos"])
    assert "\nbase_model: FacebookAI/roberta-base\n" in card
    assert f"(Hub `FacebookAI/roberta-base`, read by the run from `{tmp_path}`)" in card
    assert ('AutoModelForSequenceClassification.from_pretrained("FacebookAI/roberta-base", '
            "id2label={0: 'neg', 1: 'pos'})") in card
    assert lrexport.base_model_reference(run_cfg.model) == "FacebookAI/roberta-base"  # adapter_config's too


# -- an export that does not reproduce the run ------------------------------------------------------------------
def tampered(writer, change):
    """`writer`, then `change(folder)` on what it wrote."""
    def write(setup, run_cfg, folder, *rest):
        writer(setup, run_cfg, folder, *rest)
        change(folder)
    return write


def scale_tensors(path, pick) -> None:
    saved = load_file(str(path))
    save_file({k: v * 1.5 if pick(k) else v for k, v in saved.items()}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("fmt,writer,file,pick", [
    ("peft", "write_peft", "adapter_model.safetensors", lambda k: "lora_B" in k),
    ("merged", "write_merged", "model.safetensors", lambda k: k.endswith("attention.self.value.weight"))])
def test_an_export_that_differs_from_the_run_is_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys,
                                                                            fmt, writer, file, pick):
    folder, *_ = runs("tiny-roberta", "lora")
    change = tampered(getattr(lrexport, writer), lambda staged: scale_tensors(staged / file, pick))
    monkeypatch.setattr(lrexport, writer, change)
    out = tmp_path / "out"
    capsys.readouterr()  # what training the run printed, if this test trained it
    with pytest.raises(SystemExit) as exit_:
        lrexport.main([str(folder), "--format", fmt, "--out", str(out)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    library = "peft" if fmt == "peft" else "transformers"
    assert error.startswith(f"lrbench error: the {fmt} export, loaded with {library}, gives logits that differ from "
                            "the run's by ") and error.endswith("in float32); nothing was written")
    assert "\n" not in error and not out.exists() and list(tmp_path.iterdir()) == []


def test_an_adapter_that_peft_cannot_load_is_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch):
    folder, *_ = runs("tiny-roberta", "lora")

    def no_such_targets(staged):
        config = json.loads((staged / "adapter_config.json").read_text())
        (staged / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_layer"]}))

    monkeypatch.setattr(lrexport, "write_peft", tampered(lrexport.write_peft, no_such_targets))
    with pytest.raises(LrbenchError, match=r"^the peft export does not load with peft \(\w+Error: No modules were "
                                           r"targeted .*\); nothing was written$"):
        lrexport.export(folder, "peft", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
