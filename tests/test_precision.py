"""The frozen base's precision (models.BasePrecision): model.dtype, model.quantization, model.attn_implementation.

Numbers measured on tiny-roberta (2-core CPU, torch 2.13): after 6 AdamW steps at lr 2e-2 the loss on a fixed batch
of 32 moves by 0.08-0.09 from 0.6941, and the bf16 base's loss stays within 5.3e-4 (LoRA), 5.4e-4 (DoRA) and
7.3e-4 (BiDoRA) of the fp32 base's (8.5e-6 before training): the tolerance is 2e-3, 40 times below the movement.
"""
from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench import methods, models
from lowrank_bench.assembly import prepare
from lowrank_bench.errors import LrbenchError
from lowrank_bench.methods.base import adapted_layers
from lowrank_bench.models import BasePrecision, Head, base_precision, load_model
from lowrank_bench.stages import stages_for
from lowrank_bench.trainer import Trainer
from tests.conftest import CONF, compose_cfg, method_cfg, model_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = BasePrecision("bf16", "none", "sdpa")
FP32 = BasePrecision("fp32", "none", "sdpa")
NF4 = BasePrecision("bf16", "nf4", "sdpa")
LOSS_TOLERANCE = 2e-3
has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0], [101, 2204, 102, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def tiny(base: BasePrecision, name: str = "tiny-roberta", **config):
    """A tiny model with a 2-class head, its base stored as `base` says; `config` overrides its sizes."""
    torch.manual_seed(0)
    cfg = OmegaConf.merge(model_cfg(name), {"config": config})
    return load_model(cfg, Head("sequence_classification", 2), 0, base).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def apply(model, name: str, **options):
    method = methods.build(method_cfg(name, **options))
    return method, method.apply(model, ["classifier", "score"], models.target_sets(model_cfg("tiny-roberta")))


# -- dtype --------------------------------------------------------------------------------------------------------
def loss_after_training(tmp_path: pathlib.Path, method: str, dtype: str) -> tuple[float, float]:
    """(loss before, loss after) six steps of `method` on a fixed training batch, the base stored in `dtype`."""
    cfg = compose_cfg(f"method={method}", "model=tiny-roberta", f"model.dtype={dtype}", "trainer.progress=false",
                      "trainer.max_steps=6", "trainer.batch_size=16", "optimizer.lr=2e-2", "task.max_eval_samples=32")
    s = prepare(cfg)
    task = s.curriculum.task
    batch = next(iter(task.loader("train", 32)))
    with torch.no_grad():
        before = task.loss(s.model.eval(), batch).item()
    (tmp_path / dtype).mkdir()
    trainer = Trainer(cfg.trainer, s.model, s.method, tmp_path / dtype, cfg.seed)
    trainer.run(stages_for(task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                           cfg.trainer.max_steps, cfg.seed))
    with torch.no_grad():
        return before, task.loss(s.model.eval(), batch).item()


@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_a_bf16_base_trains_to_the_loss_of_the_fp32_base(tmp_path, method):
    fp32_before, fp32_after = loss_after_training(tmp_path, method, "fp32")
    bf16_before, bf16_after = loss_after_training(tmp_path, method, "bf16")
    assert abs(fp32_after - fp32_before) > 20 * LOSS_TOLERANCE  # training moved the loss: agreement means something
    assert abs(bf16_before - fp32_before) < 1e-4
    assert abs(bf16_after - fp32_after) < LOSS_TOLERANCE
    assert bf16_after != fp32_after  # the bf16 base really computed in bf16


def test_on_a_bf16_base_adapters_and_head_are_fp32_and_the_backbone_bf16():
    s = prepare(compose_cfg("method=dora", "model=tiny-roberta", "model.dtype=bf16", "trainer.progress=false"))
    backbone = s.model.roberta
    assert backbone.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert backbone.encoder.layer[0].attention.output.LayerNorm.weight.dtype == torch.bfloat16
    for layer in adapted_layers(s.model).values():
        assert layer.base.weight.dtype == torch.bfloat16 and not layer.base.weight.requires_grad
        assert {p.dtype for _, _, p in layer.role_parameters()} == {torch.float32}
    assert {p.dtype for p in s.groups["head"]} == {torch.float32}
    assert {p.dtype for group in s.groups.values() for p in group} == {torch.float32}
    assert s.load_info["model_base_dtype"] == "bf16" and s.load_info["model_attn_implementation"] == "sdpa"


def test_a_bf16_decoder_classifier_reads_its_fp32_head():
    s = prepare(compose_cfg("method=lora", "model=tiny-llama", "model.dtype=bf16", "trainer.progress=false"))
    assert s.model.score.weight.dtype == torch.float32
    assert s.model.lm.model.layers[0].self_attn.q_proj.base.weight.dtype == torch.bfloat16
    out = s.model(input_ids=IDS, attention_mask=MASK).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lora", "dora", "bidora", "bilora", "lotr", "curlora", "cola"])
def test_identity_at_initialisation_holds_on_a_bf16_base(name):
    base = tiny(BF16)
    adapted = copy.deepcopy(base)
    apply(adapted, name)
    gap = (logits(adapted) - logits(base)).abs().max().item()
    # CoLA keeps W - U_r S_r V_r^T as the base weight: rounded to bf16, measured 1.5e-6; every other update is 0
    assert gap <= (1e-4 if name == "cola" else 0.0)


def test_a_bf16_base_merges_and_unmerges_within_its_rounding():
    model = tiny(BF16)
    method, groups = apply(model, "dora")
    with torch.no_grad():
        for p in groups["adapter"]:
            p.add_(torch.randn_like(p) * 0.1)
    before = logits(model)
    method.merge(model)
    merged = logits(model)
    method.unmerge(model)
    assert (merged - before).abs().max() < 5e-3 and (logits(model) - before).abs().max() < 5e-3
    assert (merged - before).abs().max() > 0  # the merged weight is rounded to bf16


def test_auto_is_bf16_on_a_gpu_and_fp32_on_the_cpu_and_for_methods_that_want_an_fp32_base():
    cfg = model_cfg("tiny-roberta")
    assert cfg.dtype == "auto"
    assert base_precision(cfg, "cpu") == FP32
    assert base_precision(cfg, "cuda") == BF16
    for name in ("ft", "bidora", "bilora"):
        method = methods.build(method_cfg(name))
        assert base_precision(cfg, "cuda", method.half_base_on_auto) == FP32, name
    assert methods.build(method_cfg("dora")).half_base_on_auto


def test_a_config_without_the_keys_loads_as_runs_did_before_them():
    assert base_precision(OmegaConf.create({"name": "old", "source": "config"}), "cuda") == BasePrecision()
    assert BasePrecision().dtype == "fp32" and BasePrecision().attn_implementation is None


def test_every_model_yaml_names_dtype_quantization_and_attention():
    for path in sorted((CONF / "model").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert (cfg.dtype, cfg.quantization) == ("auto", "none"), path.stem
        assert cfg.attn_implementation == ("eager" if path.stem.startswith("deberta") else "sdpa"), path.stem
    assert compose_cfg("model=mistral-7b", "model.dtype=bf16").model.dtype == "bf16"


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "bf17", "model.dtype='bf17' is not one of: auto, fp32, bf16, fp16 (did you mean bf16?)"),
    ("quantization", "int4", "model.quantization='int4' is not one of: none, nf4"),
    ("attn_implementation", "flash", "model.attn_implementation='flash' is not one of: sdpa, eager, "
                                     "flash_attention_2"),
])
def test_a_bad_value_is_refused_naming_the_valid_choices(key, value, message):
    cfg = OmegaConf.merge(model_cfg("tiny-roberta"), {key: value})
    with pytest.raises(LrbenchError) as err:
        base_precision(cfg, "cpu")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_full_fine_tuning_refuses_a_half_precision_base(dtype):
    ft = methods.build(method_cfg("ft"))
    with pytest.raises(LrbenchError, match=f"model.dtype={dtype}: method=ft trains every base weight.*model.dtype=fp32"):
        ft.check_base(BasePrecision(dtype))
    ft.check_base(FP32)


def test_whole_model_perturbation_refuses_a_half_precision_base():
    bidora = methods.build(method_cfg("bidora", bilevel={"perturb": "whole_model"}))
    with pytest.raises(LrbenchError, match="model.dtype=bf16: method=bidora perturbs every base weight"):
        bidora.check_base(BF16)
    methods.build(method_cfg("bidora")).check_base(BF16)


# -- nf4 ----------------------------------------------------------------------------------------------------------
NF4_SUPPORT = {  # method (and options) -> whether it trains on a 4-bit base
    ("lora", ()): True, ("dora", ()): True, ("bidora", ()): True, ("bilora", ()): True, ("curlora", ()): True,
    ("lotr", ()): True, ("peft/lora", ()): True, ("peft/adalora", ()): True, ("peft/ia3", ()): True,
    ("ft", ()): False, ("cola", ()): False, ("lotr", (("init", "svd"),)): False,
    ("bidora", (("orientation", "official"),)): False, ("peft/vera", ()): False, ("peft/loha", ()): False,
    ("peft/fourierft", ()): False,
}


@pytest.mark.parametrize("name,options", list(NF4_SUPPORT), ids=lambda v: str(v) if v else "")
def test_methods_that_cannot_train_on_a_4bit_base_are_refused_in_one_line(name, options):
    method = methods.build(method_cfg(name, **dict(options)))
    if NF4_SUPPORT[(name, options)]:
        method.check_base(NF4)
        return
    with pytest.raises(LrbenchError) as err:
        method.check_base(NF4)
    text = str(err.value)
    assert text.startswith(f"model.quantization=nf4: method={name} ") and "\n" not in text
    assert "use model.quantization=none" in text


@pytest.mark.skipif(has_bitsandbytes, reason="bitsandbytes is installed: its absence cannot be refused here")
def test_nf4_without_bitsandbytes_is_one_line_and_exit_2_before_anything_loads(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lowrank_bench.train", "model=tiny-roberta",
                           "model.quantization=nf4", f"output_dir={tmp_path}", "trainer.progress=false"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.quantization=nf4 needs bitsandbytes, which is not installed" in lines[0]
    assert "pip install 'lowrank_bench[qlora]'" in lines[0] and "step" not in done.stdout


def test_nf4_on_the_cpu_is_refused_in_one_line(monkeypatch):
    find_spec = importlib.util.find_spec  # bitsandbytes as if installed: the refusal that follows is the device's
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes"
                        else find_spec(name, *a))
    cfg = OmegaConf.merge(model_cfg("tiny-roberta"), {"quantization": "nf4"})
    with pytest.raises(LrbenchError, match=r"^model.quantization=nf4 trains on a CUDA GPU only .*trainer.device=cuda"):
        base_precision(cfg, "cpu")
    assert base_precision(cfg, "cuda") == NF4  # auto: computed in bf16
    with pytest.raises(LrbenchError, match="model.quantization=nf4 computes its 4-bit layers in bf16 or fp16"):
        base_precision(OmegaConf.merge(cfg, {"dtype": "fp32"}), "cuda")


def train_mode_logits(model) -> torch.Tensor:
    """Logits in training mode, as a graph: bitsandbytes' CPU kernels repack a 4-bit layer for inference at its
    first eval-mode forward, after which gradients stop there (why nf4 trains on a GPU only). No dropout here."""
    return model.train()(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.skipif(not has_bitsandbytes, reason="bitsandbytes not installed (optional: pip install 'lowrank_bench[qlora]')")
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_nf4_base_holds_4bit_layers_that_lora_and_dora_train_on(name):
    """Built here on the CPU (load_model, not a run: a run refuses nf4 off a GPU) in training mode throughout."""
    import bitsandbytes as bnb

    # bitsandbytes' CPU kernels need layers at least one quantisation block (64) wide: hidden size 64
    model = tiny(NF4, "tiny-llama", hidden_size=64, intermediate_size=128)
    linear = model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.dtype == torch.uint8
    assert model.score.weight.dtype == torch.float32  # the head is never quantised
    assert model.lrbench_load_info["base_dtype"] == "nf4"
    reference = train_mode_logits(model).detach()
    method, groups = apply(model, name, targets=["q_proj", "v_proj"])
    loss = train_mode_logits(model).square().mean()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.dtype == torch.float32 for group in groups.values() for p in group)
    with torch.no_grad():
        assert (train_mode_logits(model) - reference).abs().max() == 0  # identity at initialisation on 4 bits too
        layer = adapted_layers(model)["model.layers.0.self_attn.q_proj"]
        dense = layer.dense_weight()
        assert dense.shape == (64, 64) and dense.dtype == torch.float32
        torch.manual_seed(1)
        for p in groups["adapter"]:
            p.add_(torch.randn_like(p) * 0.05)
        adapted = train_mode_logits(model)
        method.merge(model)  # dequantise, add, quantise again: within the 4-bit error of the merged weight
        merged = train_mode_logits(model)
        method.unmerge(model)
        assert 0 < (merged - adapted).abs().max() < 0.05
        assert (train_mode_logits(model) - adapted).abs().max() < 0.05


# -- attention ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attn_implementation_reaches_the_model_config(attention):
    model = tiny(BasePrecision("fp32", "none", attention))
    assert model.config._attn_implementation == attention
    assert model.lrbench_load_info["attn_implementation"] == attention


def test_flash_attention_without_its_package_or_a_gpu_is_refused_in_one_line():
    cfg = OmegaConf.merge(model_cfg("tiny-llama"), {"attn_implementation": "flash_attention_2", "dtype": "bf16"})
    with pytest.raises(LrbenchError) as err:
        base_precision(cfg, "cpu")
    assert str(err.value).startswith("model.attn_implementation=flash_attention_2 ")
    assert "model.attn_implementation=sdpa" in str(err.value) and "\n" not in str(err.value)
