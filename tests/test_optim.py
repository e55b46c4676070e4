"""Where AdamW's eps enters (optimizer.eps_on): torch's update, or the old transformers/loralib AdamW the papers ran."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench.errors import LrbenchError
from lowrank_bench.optim import make_optimizer
from tests.conftest import compose_cfg


def optimizer_cfg(**overrides):
    cfg = OmegaConf.load("lowrank_bench/conf/optimizer/adamw.yaml")
    cfg.lr = 1e-2
    cfg.weight_decay = 0.0
    cfg.warmup_ratio = 0.0
    cfg.schedule = "constant"
    return OmegaConf.merge(cfg, overrides)


def transformers_adamw(grads: list[torch.Tensor], start: torch.Tensor, lr, betas, eps) -> torch.Tensor:
    """transformers < 5 AdamW (correct_bias=True, weight_decay 0), written out from its step()."""
    p, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p = p - step_size * m / (v.sqrt() + eps)
    return p


def run(cfg, grads: list[torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    param = torch.nn.Parameter(start.clone())
    optimizer, _ = make_optimizer([param], cfg, total_steps=len(grads))
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    return param.detach()


def small_gradients() -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    # gradients of the size of eps make the placement visible: |g| ~ 1e-6 against eps 1e-6
    return [torch.randn(4, 3, dtype=torch.float64) * 1e-6 for _ in range(5)], torch.randn(4, 3, dtype=torch.float64)


def test_eps_on_v_is_the_old_transformers_adamw_update():
    grads, start = small_gradients()
    cfg = optimizer_cfg(eps=1e-6, eps_on="v")
    expected = transformers_adamw(grads, start, 1e-2, (0.9, 0.999), 1e-6)
    assert torch.allclose(run(cfg, grads, start), expected, rtol=0, atol=1e-12)


def test_eps_on_v_hat_is_torchs_update_and_differs_from_the_old_one():
    grads, start = small_gradients()
    cfg = optimizer_cfg(eps=1e-6, eps_on="v_hat")
    ours = run(cfg, grads, start)
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, eps=1e-6, weight_decay=0.0)
    for g in grads:
        reference.grad = g.clone()
        torch_adamw.step()
    assert torch.equal(ours, reference.detach())
    old = transformers_adamw(grads, start, 1e-2, (0.9, 0.999), 1e-6)
    assert (ours - old).abs().max() > 1e-4  # the placement matters when |g| ~ eps


def test_eps_on_v_resumes_from_its_state_dict():
    grads, start = small_gradients()
    cfg = optimizer_cfg(eps=1e-6, eps_on="v")
    param = torch.nn.Parameter(start.clone())
    optimizer, _ = make_optimizer([param], cfg, total_steps=5)
    for g in grads[:2]:
        param.grad = g.clone()
        optimizer.step()
    resumed = torch.nn.Parameter(param.detach().clone())
    again, _ = make_optimizer([resumed], cfg, total_steps=5)
    again.load_state_dict(optimizer.state_dict())
    for g in grads[2:]:
        resumed.grad = g.clone()
        again.step()
    assert torch.allclose(resumed.detach(), run(cfg, grads, start), rtol=0, atol=0)


def test_an_unknown_eps_on_is_one_clear_error():
    with pytest.raises(LrbenchError, match=r"optimizer.eps_on='raw'; valid: v, v_hat"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], optimizer_cfg(eps_on="raw"), total_steps=1)


@pytest.mark.parametrize("preset", ["curlora/gpt2_large_continual", "curlora/mistral_7b_continual",
                                    "lora/gpt2_medium_e2e", "lora/gpt2_large_e2e", "bilora/gpt2_medium_e2e",
                                    "bidora/gpt2_medium_e2e", "bidora/roberta_base_mrpc"])
def test_presets_of_papers_that_ran_the_old_adamw_put_eps_on_the_raw_v(preset):
    assert compose_cfg(f"experiment={preset}").optimizer.eps_on == "v"


def test_the_default_optimizer_keeps_torchs_update():
    assert compose_cfg().optimizer.eps_on == "v_hat"
