"""Run under `torchrun --nproc_per_node=2` by tests/test_distributed.py: every sharded evaluation path, first as the
ranks share it, then by this process alone (the whole split, every batch here), on the same weights. Each rank
writes `<out>/rank<r>.json`: per path, whether the two results are equal and how many examples the rank took."""
from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from lowrank_bench import assembly, distributed, perplexity
from lowrank_bench.models import load_model, load_tokenizer
from lowrank_bench.tasks import build
from tests.conftest import compose_cfg, model_cfg
from tests.tasks.test_e2e import prepared, tiny
from tests.tasks.test_ner import TRAIN, write_conll
from tests.tasks.test_ner import task_cfg as ner_cfg
from tests.tasks.test_sft import ROWS, sft_task, write_jsonl


def sharded_and_alone(dp: distributed.DataParallel, evaluate) -> dict:
    distributed.take_evaluated()
    shared = evaluate()
    taken = distributed.take_evaluated()
    distributed._current = distributed.SINGLE  # one process: every batch of the split
    try:
        alone = evaluate()
    finally:
        distributed._current = dp
    distributed.take_evaluated()
    print(f"rank {dp.rank}: {shared == alone}, {taken} examples; shared {str(shared)[:120]}", flush=True)
    return {"equal": shared == alone, "taken": taken, "value": repr(alone)[:200]}


def classification():
    s = assembly.prepare(compose_cfg("task=toy/sentiment", "model=tiny-roberta", "task.max_eval_samples=50"))
    task, model = s.curriculum.task, s.model.eval()
    return lambda: task.evaluate(model, "validation", batch_size=8)


def ner(folder: Path):
    task = build(ner_cfg(data_dir=str(write_conll(folder / "conll", valid=TRAIN))))  # several sentences
    tokenizer = load_tokenizer(model_cfg("tiny-roberta"))
    task.prepare(tokenizer, 64)
    torch.manual_seed(0)
    model = load_model(model_cfg("tiny-roberta"), task.head, tokenizer.pad_token_id).eval()
    return lambda: task.predict(model, "validation", 1, "cpu", nullcontext)  # (gold, predicted): order tells


def sft(folder: Path):
    task = sft_task(write_jsonl(folder / "math.jsonl", ROWS), val_fraction=0.5, eval_batch_size=1)
    model_and_tokenizer = tiny("tiny-llama")
    task.prepare(model_and_tokenizer[1], 64)
    return lambda: task.evaluate(model_and_tokenizer[0], "validation")


def e2e(folder: Path):
    task = prepared(folder / "e2e", eval_mrs=3)
    model = tiny("tiny-gpt2")[0]
    prompts = [g["prompt_ids"] for g in task.splits[task.eval_splits[0]]]
    return lambda: task.generate_ids(model, prompts, batch_size=1)


def strided_perplexity():
    model = tiny("tiny-gpt2")[0]
    ids = torch.randint(0, 100, (90,), generator=torch.Generator().manual_seed(0))
    return lambda: perplexity.score(model, ids, "strided", context=16, stride=8)


def main(out: Path) -> None:
    dp = distributed.init("cpu")
    folder = out / f"data{dp.rank}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"classification": classification(), "ner": ner(folder), "sft": sft(folder), "e2e": e2e(folder),
             "perplexity": strided_perplexity()}
    report = {name: sharded_and_alone(dp, evaluate) for name, evaluate in paths.items()}
    (out / f"rank{dp.rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
