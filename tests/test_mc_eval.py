"""Multiple-choice evaluation: the letter scorer on a model whose logits are set by hand, its independence from
batching, the readers (CoLA's and MMLU's layouts, JSONL), bad items, the lm-eval backend agreeing with the default
where their prompts coincide, and a run's adapter scored on its own."""
from __future__ import annotations

import csv
import json
import time
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lowrank_bench import mc_eval
from lowrank_bench.errors import LrbenchError
from lowrank_bench.evaluations import multiple_choice
from lowrank_bench.evaluations.multiple_choice import HARNESS_DESCRIPTION, MultipleChoiceEval, letter_scores
from lowrank_bench.methods.base import adapted_layers, save_adapter
from lowrank_bench.models import load_tokenizer
from lowrank_bench.tasks.sft import encode_text
from tests.conftest import compose_cfg, model_cfg

ALGEBRA = [("What is 1 + 1?", "2", "3", "4", "5", "A"), ("What is 2 + 1?", "2", "3", "4", "5", "B"),
           ("What is 2 + 2?", "2", "3", "4", "5", "C"), ("What is 2 + 3?", "2", "3", "4", "5", "D")]
LOGIC = [("True or false: true.", "True", "False", "", "", "A"),
         ("True or false: false.", "True", "False", "", "", "B")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(model_cfg("tiny-llama"))


def write_csv(path, rows, header=("question", "A", "B", "C", "D", "answer")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def bench(tmp_path, *overrides, name="bbh"):
    """An evaluation config over the two hand-made subjects (CoLA's layout: <folder>/test/<subject>.csv)."""
    write_csv(tmp_path / "bench" / "test" / "algebra.csv", ALGEBRA)
    write_csv(tmp_path / "bench" / "test" / "logic.csv", LOGIC)
    return compose_cfg(f"eval=mc/{name}", f"eval.data_dir={tmp_path / 'bench'}", *overrides).eval


class LetterLM(torch.nn.Module):
    """Next-token logits set by hand: `table[prompt ids] = {token id: logit}`, zero for every other token."""

    def __init__(self, vocab_size: int, table: dict):
        super().__init__()
        self.vocab_size, self.table = vocab_size, table
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so that the model has a train/eval mode and a device

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, use_cache=None):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            for token, value in self.table[tuple(i for i, m in zip(ids, mask) if m)].items():
                logits[row, 0, token] = value
        return SimpleNamespace(logits=logits)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config).eval()


# -- the letter scorer -------------------------------------------------------------------------------------------
def test_the_prediction_is_the_highest_letter_logit_among_the_items_own_options(tok, tmp_path):
    evaluator = MultipleChoiceEval(bench(tmp_path), tok)
    a, b, c, d = evaluator.letter_ids
    wanted = {"algebra": [a, b, d, d], "logic": [b, b]}  # 3 of 4 right, then 1 of 2
    table = {}
    for subject, letters in wanted.items():
        for prompt, letter in zip(evaluator.prompts[subject], letters):
            # the chosen letter at 3, a token that is no letter at 20; for the 2-option items C and D (letters,
            # but not options of theirs) at 10 and 9
            logits = {letter: 3.0, 999: 20.0, **({c: 10.0, d: 9.0} if subject == "logic" else {})}
            table[tuple(encode_text(tok, prompt))] = logits
    scores = evaluator.score(LetterLM(len(tok), table))
    assert scores == {"mc_accuracy": 4 / 6, "mc_macro_accuracy": (3 / 4 + 1 / 2) / 2, "mc_items": 6, "mc_subjects": 2}
    subjects = evaluator.details["after"]["subjects"]
    assert subjects["algebra"]["predictions"] == "ABDD" and subjects["logic"]["predictions"] == "BB"
    assert evaluator.score(LetterLM(len(tok), table), when="before")["mc_accuracy_before"] == 4 / 6


def test_the_prompt_is_colas_evaluation_template_under_the_sft_template(tok, tmp_path):
    evaluator = MultipleChoiceEval(bench(tmp_path), tok)
    assert evaluator.template == "plain"  # the tiny Llama's tokenizer has no chat template
    assert evaluator.prompts["logic"][0] == (
        "[CLS]### Instruction:\nThe following are multiple choice questions (with answers) about logic. Please "
        "provide only the correct option (one uppercase letter).\n\nTrue or false: true.\nA. True\nB. False"
        "\nAnswer:\n\n### Response:\n")
    assert evaluator.letter_ids == [encode_text(tok, letter)[-1] for letter in "ABCD"]  # LLaMA-Factory's tokens


def test_letter_scores_do_not_depend_on_padding_or_batching(tok):
    model = tiny_llama(len(tok))
    prompts = [encode_text(tok, text) for text in ("a short one", "a much longer prompt than the others here",
                                                   "middle length prompt", "x")]
    letters = [encode_text(tok, letter)[-1] for letter in "ABCD"]
    alone = letter_scores(model, prompts, letters, tok.pad_token_id, batch_size=1)
    batched = letter_scores(model, prompts, letters, tok.pad_token_id, batch_size=4)
    assert torch.allclose(alone, batched, atol=1e-5)
    full = model(input_ids=torch.tensor([prompts[1]])).logits[0, -1, letters]
    assert torch.allclose(batched[1], full, atol=1e-5)


# -- readers -------------------------------------------------------------------------------------------------------
def test_mmlu_raw_files_a_mapping_and_jsonl_items_are_read(tok, tmp_path):
    folder = tmp_path / "mmlu"
    write_csv(folder / "test" / "anatomy_test.csv", [ALGEBRA[0]], header=None)  # MMLU's data/test: no header
    (folder / "mapping.json").write_text(json.dumps({"anatomy": {"name": "human anatomy", "category": "Medicine"}}))
    evaluator = MultipleChoiceEval(compose_cfg("eval=mc/mmlu", f"eval.data_dir={folder}").eval, tok)
    assert list(evaluator.subjects) == ["anatomy"] and "about human anatomy." in evaluator.prompts["anatomy"][0]
    evaluator.score(tiny_llama(len(tok)))
    assert evaluator.details["after"]["categories"]["Medicine"]["items"] == 1
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "q", "choices": ["x", "y", "z"], "answer": 2, "subject": "s1"},
        {"question": "r", "A": "x", "B": "y", "answer": "b", "subject": "s2"}]))
    evaluator = MultipleChoiceEval(compose_cfg("eval=mc/mmlu", f"eval.files=[{items}]").eval, tok)
    assert [(i.options, i.answer) for s in evaluator.subjects.values() for i in s] == [(("x", "y", "z"), 2),
                                                                                    (("x", "y"), 1)]


def test_max_letters_four_reproduces_colas_a_to_d_and_counts_what_it_cannot_score(tok, tmp_path):
    rows = [("pick", "1", "2", "3", "4", "5", "E"), ("pick", "1", "2", "3", "4", "5", "A")]
    write_csv(tmp_path / "bbh" / "five.csv", rows, header=("question", "A", "B", "C", "D", "E", "answer"))
    cfg = compose_cfg("eval=mc/bbh", f"eval.data_dir={tmp_path / 'bbh'}", "eval.max_letters=4").eval
    evaluator = MultipleChoiceEval(cfg, tok)
    assert "\nD. 4\nAnswer:" in evaluator.prompts["five"][0] and "E. 5" not in evaluator.prompts["five"][0]
    assert len(evaluator.letter_ids) == 4
    scores = evaluator.score(tiny_llama(len(tok)))
    assert scores["mc_unscorable"] == 1 and scores["mc_accuracy"] <= 0.5


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, message", [
    ([("q", "1", "2", "3", "4", "E")], (r"five.csv row 1: answer 'E' is not the letter of one of the item's "
                                       r"options \['A', 'B', 'C', 'D'\]")),
    ([("q", "1", "2", "", "", "C")], r"answer 'C' is not the letter of one of the item's options \['A', 'B'\]"),
    ([("q", "1", "", "3", "4", "A")], "five.csv row 1: option B is empty"),
    ([("q", "1", "", "", "", "A")], "an item needs at least two options, found 1"),
])
def test_a_malformed_item_is_refused_with_its_file_and_row(tok, tmp_path, rows, message):
    write_csv(tmp_path / "bbh" / "five.csv", rows)
    with pytest.raises(LrbenchError, match=message):
        MultipleChoiceEval(compose_cfg("eval=mc/bbh", f"eval.data_dir={tmp_path / 'bbh'}").eval, tok)


@pytest.mark.parametrize("overrides, message", [
    (["eval.subjects=[algebra,geometry]"], r"eval.subjects: \['geometry'\] not in the items; valid: algebra, logic"),
    (["eval.backend=vllm"], "eval.backend='vllm' is not one of: lm_eval, lrbench"),
    (["eval.lm_eval.prompt=mine"], "eval.lm_eval.prompt='mine' is not one of: harness, lrbench"),
    (["eval.max_letters=1"], "eval.max_letters=1: choose 2 <= max_letters <= 26, or null"),
    (["eval.template=chat"], "eval.template=chat but the tokenizer .* has no chat template"),
])
def test_bad_settings_name_the_setting_and_the_choices(tok, tmp_path, overrides, message):
    with pytest.raises(LrbenchError, match=message):
        MultipleChoiceEval(bench(tmp_path, *overrides), tok)


def test_a_benchmark_without_local_items_or_hub_copy_says_where_to_put_them(tok):
    with pytest.raises(LrbenchError, match="eval=gsm8k: no local items and no Hub copy; set eval.data_dir=.* "
                                           r"\(CoLA: LLaMA-Factory/evaluation/gsm8k\)"):
        MultipleChoiceEval(compose_cfg("eval=mc/gsm8k").eval, tok)
    start = time.perf_counter()
    with pytest.raises(LrbenchError, match="'cais/mmlu' is not in the local Hugging Face cache"):
        MultipleChoiceEval(compose_cfg("eval=mc/mmlu_law").eval, tok)
    assert time.perf_counter() - start < 10


# -- lm-eval -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_eval_backend_agrees_with_the_default_where_their_prompts_coincide(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval): its backend is untested")
    smol = load_tokenizer(model_cfg("smollm2-135m"))  # a real BPE: " A" and "A" are different tokens
    model = tiny_llama(len(smol), seed=1)
    # lm-eval's own MMLU prompts: no template, its description, " A" continuations
    harness = bench(tmp_path, "eval.template=none", "eval.letter_prefix=' '")
    harness.system = HARNESS_DESCRIPTION
    default = MultipleChoiceEval(harness, smol)
    default.score(model)
    lm_eval = MultipleChoiceEval(OmegaConf.merge(harness, {"backend": "lm_eval"}), smol)
    lm_eval.score(model)
    assert default.prompts["algebra"][0] == lm_eval.lm_eval_docs("algebra")[0][0]["context"]
    for subject in ("algebra", "logic"):
        assert lm_eval.details["after"]["subjects"][subject] == default.details["after"]["subjects"][subject]
    # this module's chat prompts, sent through lm-eval
    chat = bench(tmp_path, "eval.lm_eval.prompt=lrbench")
    default, lm_eval = MultipleChoiceEval(chat, smol), MultipleChoiceEval(OmegaConf.merge(chat, {"backend": "lm_eval"}),
                                                                          smol)
    assert default.template == "chat" and default.prompts["logic"][0].endswith("<|im_start|>assistant\n")
    default.score(model)
    lm_eval.score(model)
    assert lm_eval.details["after"]["mc_accuracy"] == default.details["after"]["mc_accuracy"]
    assert all(lm_eval.details["after"]["subjects"][s]["predictions"] == default.details["after"]["subjects"][s][
        "predictions"] for s in ("algebra", "logic"))


# -- wiring ----------------------------------------------------------------------------------------------------------
def test_a_runs_adapter_scores_alone_as_it_did_in_memory(tmp_path):
    from lowrank_bench.train import prepare

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    write_csv(tmp_path / "bench" / "algebra.csv", ALGEBRA)
    cfg = compose_cfg("model=tiny-llama", "method=lora", "task=sft/math", f"task.files=[{data}]", "eval=mc/bbh",
                      f"eval.data_dir={tmp_path / 'bench'}")
    assert multiple_choice.build(compose_cfg("model=tiny-llama"), None) is None  # no eval group: no evaluator
    setup = prepare(cfg)
    evaluator = multiple_choice.build(cfg, setup.tokenizer)
    with torch.no_grad():
        for layer in adapted_layers(setup.model).values():
            layer.lora_B.normal_()  # a trained-looking adapter
    in_memory = evaluator.score(setup.model)
    run = tmp_path / "run"
    run.mkdir()
    save_adapter(setup.model, run / "adapter.safetensors")
    (run / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    alone = mc_eval.run_standalone(OmegaConf.merge(cfg, {"eval": {"adapter": str(run)}}), tmp_path / "out")
    assert alone["mc_accuracy"] == in_memory["mc_accuracy"] and alone["method"] == "lora"
    assert json.loads((tmp_path / "out" / "mc_bbh.json").read_text())["after"]["subjects"]["algebra"][
        "predictions"] == evaluator.details["after"]["subjects"]["algebra"]["predictions"]
    with pytest.raises(LrbenchError, match="eval.adapter=.*: no config_resolved.yaml there"):
        mc_eval.run_standalone(OmegaConf.merge(cfg, {"eval": {"adapter": str(tmp_path)}}), tmp_path / "out")


# -- CoLA's multitask presets (issue 23 point 7) -------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["cola/llama-3.2-3b_multitask", "cola/llama-3.1-8b_multitask"])
def test_colas_multitask_presets_show_and_score_bbh_letters_a_to_d_only(tok, tmp_path, preset):
    rows = [("pick", "1", "2", "3", "4", "5", "E"), ("pick", "1", "2", "3", "4", "5", "B")]
    write_csv(tmp_path / "bbh" / "five.csv", rows, header=("question", "A", "B", "C", "D", "E", "answer"))
    cfg = compose_cfg(f"experiment={preset}", f"eval.data_dir={tmp_path / 'bbh'}").eval
    assert cfg.name == "bbh"
    evaluator = MultipleChoiceEval(cfg, tok)
    prompt = evaluator.prompts["five"][0]
    assert "\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:" in prompt and "E. 5" not in prompt
    a, b, c, d = evaluator.letter_ids
    e = encode_text(tok, "E")[-1]
    # E has the highest logit of all: never the prediction, as only A-D are scored; B beats the other three
    table = {tuple(encode_text(tok, p)): {e: 30.0, b: 5.0, a: 1.0} for p in evaluator.prompts["five"]}
    scores = evaluator.score(LetterLM(len(tok), table))
    assert evaluator.details["after"]["subjects"]["five"]["predictions"] == "BB"
    assert scores["mc_accuracy"] == 1 / 2 and scores["mc_unscorable"] == 1  # the item answered E cannot be right
