"""Does the E2E task's generation path cost anything? Tokens per second of batched beam search through the task
(`E2ETask.generate_ids`: left padding, batching, the cut at EOS) against `model.generate` called directly on the
same model with the same padded batches and settings, measured side by side, alternating A/B so that a busy machine
slows both alike. Both must produce the same tokens (checked).

    python benchmarks/generation_speed.py [--model tiny-gpt2-bpe] [--mrs 16] [--beams 4] [--max-new-tokens 32]
                                          [--batch-size 8] [--repeats 3] [--threads N] [--stop-at-eos]

Reads the E2E dev set (LRBENCH_DATA_DIR/e2e/devset.csv) for real MRs; the model's weights need not be trained.
Tokens per second counts what the decoding loop produced (sequences x new positions, the same for both paths since
their outputs are equal); prints each run's and the ratio of the medians (task / direct).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from lowrank_bench.models import Head, load_model, load_tokenizer
from lowrank_bench.tasks.base import data_dir
from lowrank_bench.tasks.e2e import E2ETask
from lowrank_bench.train import CONF_DIR


def setup(args):
    model_cfg = OmegaConf.load(f"{CONF_DIR}/model/{args.model}.yaml")
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = load_model(model_cfg, Head("causal_lm"), tokenizer.pad_token_id).eval()
    task_cfg = OmegaConf.merge(OmegaConf.load(f"{CONF_DIR}/task/e2e.yaml"), {
        "data_dir": str(data_dir() / "e2e"), "split": "dev_by_mr", "eval_mrs": args.mrs,
        "generation": {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens}})
    task = E2ETask(task_cfg)
    task.prepare(tokenizer, model_cfg.max_length)
    return model, task, [g["prompt_ids"] for g in task.splits["validation"]]


def through_task(model, task, prompts, batch_size) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = task.generate_ids(model, prompts, batch_size)
    return time.perf_counter() - start, out


def direct(model, task, prompts, batch_size) -> tuple[float, list[list[int]], int]:
    """`model.generate` on the same left-padded batches (built before the clock starts); also the number of tokens
    the decoding loop produced (rows x new positions: beam search goes on after an EOS while better hypotheses may
    come, so this, not the length of the kept outputs, is the work done)."""
    batches = [task.left_padded(prompts[i:i + batch_size], "cpu") for i in range(0, len(prompts), batch_size)]
    kwargs = task.decoding.generate_kwargs(task.end_id, task.pad_id)
    start = time.perf_counter()
    with torch.no_grad():
        generated = [model.generate(**batch, **kwargs) for batch in batches]
    seconds = time.perf_counter() - start
    out = [ids for batch, g in zip(batches, generated) for ids in task.continuations(g, batch["input_ids"].shape[1])]
    decoded = sum(g.shape[0] * (g.shape[1] - batch["input_ids"].shape[1]) for batch, g in zip(batches, generated))
    return seconds, out, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2-bpe")
    parser.add_argument("--mrs", type=int, default=16)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="end hypotheses at EOS as an evaluation does; by default the end token is replaced by "
                             "the vocabulary's last id (other than EOS and padding), which a model hardly generates, "
                             "so that every hypothesis runs to --max-new-tokens (an untrained model may end them all "
                             "after a token or two)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, task, prompts = setup(args)
    if not args.stop_at_eos:
        vocabulary = model.get_output_embeddings().weight.shape[0]
        task.end_id = next(i for i in range(vocabulary - 1, 0, -1) if i not in (task.end_id, task.pad_id))
    rates: dict[str, list[float]] = {"task": [], "direct": []}
    through_task(model, task, prompts[:args.batch_size], args.batch_size)  # warm-up
    for repeat in range(args.repeats):
        if repeat % 2:  # alternate which path goes first
            direct_seconds, direct_out, decoded = direct(model, task, prompts, args.batch_size)
            task_seconds, task_out = through_task(model, task, prompts, args.batch_size)
        else:
            task_seconds, task_out = through_task(model, task, prompts, args.batch_size)
            direct_seconds, direct_out, decoded = direct(model, task, prompts, args.batch_size)
        assert task_out == direct_out, "the two paths generated different tokens"  # so they decoded alike
        kept = sum(len(ids) for ids in task_out)
        for name, seconds in (("task", task_seconds), ("direct", direct_seconds)):
            rates[name].append(decoded / seconds)
            print(f"{name:6} run {repeat + 1}: {decoded} tokens decoded ({kept} kept up to EOS) in {seconds:6.2f} s "
                  f"= {rates[name][-1]:8.1f} tokens/s", flush=True)
    task_rate, direct_rate = statistics.median(rates["task"]), statistics.median(rates["direct"])
    print(f"{args.model}, {len(prompts)} MRs, beam {args.beams}, {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, {torch.get_num_threads()} thread(s): task {task_rate:.1f} tokens/s, direct "
          f"{direct_rate:.1f} tokens/s, ratio {task_rate / direct_rate:.3f}")


if __name__ == "__main__":
    main()
