"""PEFT tuners as baselines: each one builds from its YAML, starts at the pretrained function, trains only its own
parameters and the head, and merges exactly."""
from __future__ import annotations

import pytest
import torch

from lowrank_bench.methods import build
from tests.conftest import CONF, base_model, batch_for, method_cfg

PEFT_METHODS = sorted(p.stem for p in (CONF / "method" / "peft").glob("*.yaml"))
NOT_IDENTITY = {"fourierft"}  # its spectral coefficients start ~ N(0, 1), as in the FourierFT paper and PEFT


def test_the_required_tuners_are_configured():
    assert {"vera", "adalora", "pissa", "loha", "fourierft", "ia3"} <= set(PEFT_METHODS)


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_identity_trainable_groups_and_merge(name):
    base, tok = base_model("tiny-roberta")
    model, _ = base_model("tiny-roberta")
    method = build(method_cfg(f"peft/{name}"))
    groups = method.apply(model, ["classifier"], {"default": ["query", "value"]})
    wrapped = method.wrap(model)
    batch = batch_for(tok)
    with torch.no_grad():
        gap = (wrapped(**batch).logits - base(**batch).logits).abs().max().item()
    assert gap > 1e-6 if name in NOT_IDENTITY else gap < 1e-5
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g}
    assert groups["adapter"] and all(p.requires_grad for p in groups["head"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in groups["adapter"]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        wrapped.eval()
        before = wrapped(**batch).logits
        assert (before - base(**batch).logits).abs().max() > 1e-6  # the adapter matters
        method.merge(model)
        assert (wrapped(**batch).logits - before).abs().max() < 1e-4
        method.unmerge(model)
        assert (wrapped(**batch).logits - before).abs().max() < 1e-4
