"""trainer.load_best_model_at_end: transformers 4.46.1's selection (CoLA's LLaMA-Factory runs), on a tiny run whose
evaluation losses are scripted, and the arithmetic that makes it reload step 100 in CoLA's Law and Medicine runs."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_bench.errors import LrbenchError
from lowrank_bench.stages import stages_for
from lowrank_bench.train import prepare
from lowrank_bench.trainer import LoadBestAtEnd, Trainer
from tests.conftest import compose_cfg


def scripted_run(tmp_path, losses: dict[int, float], total: int, eval_every: int, save_steps: int | None):
    """Train a tiny LoRA `total` steps, evaluating every `eval_every`; each evaluation answers `losses[step]` and
    keeps a copy of the trained weights. Returns (the weights at each evaluation, the final weights, trainer)."""
    option = [f"+trainer.load_best_model_at_end.save_steps={save_steps}"] if save_steps else []
    cfg = compose_cfg("model=tiny-roberta", "method=lora", "trainer.progress=false", f"trainer.max_steps={total}",
                      f"trainer.eval_every={eval_every}", "trainer.batch_size=8", "method.lr=5e-2", *option)
    s = prepare(cfg)
    trainer = Trainer(cfg.trainer, s.model, s.method, tmp_path, cfg.seed)
    stages = stages_for(s.curriculum.task, s.method, s.groups, cfg.method, cfg.optimizer, cfg.trainer.epochs,
                        cfg.trainer.max_steps, cfg.seed)
    seen: dict[int, list[torch.Tensor]] = {}

    def evaluate_all(model, **kwargs):
        step = trainer.history.train_steps
        seen[step] = [p.detach().clone() for p in stages[0].params]
        return {"eval_loss": losses[step], "accuracy": 0.5}

    s.curriculum.task.evaluate_all = evaluate_all
    trainer.run(stages)
    return seen, [p.detach().clone() for p in stages[0].params], trainer


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("total, losses, chosen", [
    # evaluations at 2, 4, 6 and the end (7); saves at 4 and 7; only step 4 is saved *with* metrics: it is reloaded,
    # although steps 2, 6 and 7 evaluated lower
    (7, {2: 0.1, 4: 0.5, 6: 0.2, 7: 0.05}, 4),
    # the last step is an evaluation step too: it competes, and wins when strictly lower
    (8, {2: 0.1, 4: 0.5, 6: 0.2, 8: 0.3}, 8),
    # a tie keeps the first (HF: np.less, strictly)
    (8, {2: 0.1, 4: 0.5, 6: 0.2, 8: 0.5}, 4),
    # a last step that is an evaluation step but no multiple of save_steps competes too
    (6, {2: 0.1, 4: 0.5, 6: 0.4}, 6),
])
def test_the_best_checkpoint_saved_with_an_evaluation_is_put_back_at_the_end(tmp_path, total, losses, chosen):
    seen, final, trainer = scripted_run(tmp_path, losses, total, eval_every=2, save_steps=4)
    assert sorted(seen) == sorted(losses)
    assert same(final, seen[chosen])
    assert not same(seen[chosen], seen[max(seen)]) or chosen == max(seen)  # the weights did move after `chosen`
    assert trainer.extras["loaded_best_step"] == chosen
    assert trainer.extras["loaded_best_eval_loss"] == losses[chosen]


def test_without_the_option_or_without_a_candidate_the_last_weights_stay(tmp_path):
    losses = {2: 0.1, 3: 0.05}
    seen, final, trainer = scripted_run(tmp_path, losses, total=3, eval_every=2, save_steps=4)  # no save at an eval
    assert same(final, seen[3]) and "loaded_best_step" not in trainer.extras
    seen, final, trainer = scripted_run(tmp_path, {2: 0.1, 4: 0.5, 6: 0.2, 7: 0.05}, total=7, eval_every=2,
                                        save_steps=None)
    assert same(final, seen[7]) and "loaded_best_step" not in trainer.extras


@pytest.mark.parametrize("settings, eval_every, message", [
    ({"save_steps": 100}, None, r"save_steps=100 must be a round multiple of trainer.eval_every=None"),
    ({"save_steps": 75}, 50, r"save_steps=75 must be a round multiple of trainer.eval_every=50"),
    ({"save_steps": 0}, 50, r"save_steps=0: an integer > 0"),
    ({"save_steps": 100, "metrc": "eval_loss"}, 50, r"unknown key\(s\) \['metrc'\]"),
])
def test_bad_settings_are_refused_in_one_line(settings, eval_every, message):
    with pytest.raises(LrbenchError, match=message):
        LoadBestAtEnd(settings, eval_every)


def hf_4461_steps(rows: int, val_size: float = 0.1, batch: int = 8, accum: int = 8, epochs: int = 5) -> int:
    """max_steps of transformers 4.46.1 (trainer.py l.2164-2181) after LLaMA-Factory's split (datasets'
    train_test_split holds out ceil(val_size * n)): ceil(epochs * (len(dataloader) // accum))."""
    train = rows - math.ceil(val_size * rows)
    return math.ceil(epochs * max((math.ceil(train / batch)) // accum, 1))


def test_colas_law_and_medicine_runs_reload_step_100_and_the_single_dataset_runs_cannot():
    option = LoadBestAtEnd({"save_steps": 100}, 50)
    law = hf_4461_steps(2 * 1000)  # two datasets of at least 1,000 rows each, max_samples 1,000 per dataset
    single = hf_4461_steps(1000)
    assert (law, single) == (140, 70)
    assert [s for s in range(1, law + 1) if option.candidate(s, law, 50)] == [100]
    assert [s for s in range(1, single + 1) if option.candidate(s, single, 50)] == []
    # this trainer's step count (ceil(n / 64) per epoch) gives 145 and 75: the same candidates
    ours_law, ours_single = 5 * math.ceil(1800 / 64), 5 * math.ceil(900 / 64)
    assert [s for s in range(1, ours_law + 1) if option.candidate(s, ours_law, 50)] == [100]
    assert [s for s in range(1, ours_single + 1) if option.candidate(s, ours_single, 50)] == []
    # the fewest rows for which step 100 is saved before the last step: 1,486 (1,337 training rows, 168 batches, 21
    # steps per epoch, 105 steps): with one dataset at 1,000 rows, the other needs 486
    assert min(n for n in range(1000, 2001) if hf_4461_steps(n) > 100) == 1486
    assert (hf_4461_steps(1485), hf_4461_steps(1486)) == (100, 105)


@pytest.mark.parametrize("domain", ["law", "medicine"])
def test_the_law_and_medicine_presets_select_as_colas_transformers_does(domain):
    for model in ("llama-3.2-3b", "llama-3.1-8b"):
        cfg = compose_cfg(f"experiment=cola/{model}_{domain}")
        assert dict(cfg.trainer.load_best_model_at_end) == {"save_steps": 100, "metric": "eval_loss",
                                                            "greater_is_better": False}
        assert cfg.trainer.eval_every == 50
