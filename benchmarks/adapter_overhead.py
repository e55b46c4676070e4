"""Our LoRA and DoRA against peft's on the same model: time per training step (forward + backward + AdamW) and
peak memory. Prints a table; no assertion. Models are built from a config (random weights), so no download.

    python benchmarks/adapter_overhead.py                         # CPU default: RoBERTa-base sizes, batch 8 x 128
    python benchmarks/adapter_overhead.py --size large --batch 32 # on a GPU: RoBERTa-large sizes, bf16 autocast
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from lowrank_bench.methods import build

CONF = Path(__file__).resolve().parents[1] / "lowrank_bench" / "conf"
SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def ours(model, name, r):
    method = build(OmegaConf.merge(OmegaConf.load(CONF / "method" / f"{name}.yaml"), {"r": r, "alpha": 2 * r}))
    method.apply(model, ["classifier"], {"default": ["query", "value"]})
    return model


def theirs(model, name, r):
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["query", "value"],
                        use_dora=name == "dora", modules_to_save=["classifier"])
    return get_peft_model(model, config)


def time_steps(model, batch, device, steps, warmup, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times) * 1000, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    torch.manual_seed(0)
    config = AutoConfig.for_model("roberta", vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                  num_labels=2, **SIZES[args.size])
    base = AutoModelForSequenceClassification.from_config(config)
    batch = {"input_ids": torch.randint(3, 50000, (args.batch, args.seq), device=device),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (args.batch,), device=device)}
    print(f"device={device} roberta-{args.size} batch={args.batch}x{args.seq} r={args.r} "
          f"threads={torch.get_num_threads()} median of {args.steps} steps")
    print(f"{'method':8} {'impl':6} {'ms/step':>9} {'peak MiB':>9} {'ours/peft':>9}")
    for name in ("lora", "dora"):
        results = {}
        for impl, make in (("peft", theirs), ("ours", ours)):
            model = make(copy.deepcopy(base), name, args.r).to(device)
            results[impl] = time_steps(model, batch, device, args.steps, args.warmup, autocast)
            del model
        for impl in ("peft", "ours"):
            ms, peak = results[impl]
            ratio = f"{results['ours'][0] / results['peft'][0]:.3f}" if impl == "ours" else ""
            peak_text = f"{peak:9.1f}" if peak == peak else f"{'-':>9}"  # CUDA only
            print(f"{name:8} {impl:6} {ms:9.1f} {peak_text} {ratio:>9}")


if __name__ == "__main__":
    main()
