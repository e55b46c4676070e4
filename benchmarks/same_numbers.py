"""Same numbers before and after a change of the code's shape: record a fixed set of short runs, then compare two
recordings.

    PYTHONPATH=<checkout> python benchmarks/same_numbers.py record DIR
    python benchmarks/same_numbers.py compare DIR_A DIR_B

Every run goes through the command line of the checkout on PYTHONPATH (`python -m lowrank_bench.train`,
`lowrank_bench.mc_eval`, `lowrank_bench.export`), on tiny offline models and the shared data
($LRBENCH_DATA_DIR), at budgets of a few steps: lora, dora and bidora (with retraining) on MRPC; continual/toy
with perplexity; NER on CoNLL-2003; E2E on tiny-gpt2-bpe; SFT with the multiple-choice evaluation before and
after; a run killed after a checkpoint and resumed; `mode=eval` of the lora run; the multiple-choice command on
the SFT run; a peft export of the lora run. `compare` asks for byte-identical metrics.jsonl (the recording's own
folder written as DIR) and equal result rows and summaries, wall time, memory, paths, commit and timestamps
aside; exported files must be byte-identical (the model card's paths and commit aside).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FAST = ["trainer.progress=false", "trainer.eval_batch_size=64", "trainer.device=cpu"]
MRPC = ["model=tiny-roberta", "task=glue/mrpc", "task.max_train_samples=64", "task.max_eval_samples=48",
        "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=16", *FAST]
RUNS: dict[str, list[str]] = {
    "lora_mrpc": ["method=lora", *MRPC],
    "dora_mrpc": ["method=dora", *MRPC],
    "bidora_mrpc": ["method=bidora", *MRPC, "method.retrain.enabled=true", "method.retrain.max_steps=2"],
    "continual_toy": ["method=lora", "model=tiny-gpt2", "task=continual/toy", "trainer.max_steps=3",
                      "task.perplexity.mode=strided", "task.perplexity.corpus={DIR}/fixtures/corpus.txt",
                      "task.perplexity.context=64", *FAST],
    "ner_conll": ["method=lora", "model=tiny-roberta", "task=ner/conll2003", "task.max_train_samples=64",
                  "task.max_eval_samples=32", "trainer.max_steps=2", *FAST],
    "e2e": ["method=lora", "model=tiny-gpt2-bpe", "task=e2e", "task.eval_mrs=2", "task.max_train_samples=16",
            "task.generation.num_beams=2", "task.generation.max_new_tokens=8", "trainer.batch_size=4",
            "trainer.max_steps=3", *FAST],
    "sft_mc": ["method=lora", "model=tiny-llama", "task=sft/math", "task.files=[{DIR}/fixtures/sft.jsonl]",
               "eval=mc/bbh", "eval.data_dir={DIR}/fixtures/bench", "trainer.max_steps=3", "trainer.batch_size=4",
               *FAST],
}
RESUMED = ["method=lora", "model=tiny-roberta", "task=toy/sentiment", "task.max_train_samples=200",
           "task.max_eval_samples=64", "trainer.max_steps=8", "trainer.eval_every=3", "trainer.checkpoint_every=2",
           *FAST]
KILLER = """
import os
from lowrank_bench.trainer import Trainer
original = Trainer.optimizer_step
def optimizer_step(self, optimizer, params):
    if self.optimizer_steps + 1 == 5:
        os.kill(os.getpid(), 9)
    original(self, optimizer, params)
Trainer.optimizer_step = optimizer_step
from lowrank_bench.train import main
main()
"""
VOLATILE = re.compile(r"(timestamp|run_dir|wall_time_s|train_time_s|time_per_step_ms|samples_per_s|peak_mem|"
                      r"checkpoint_s|git_commit|trained_commit|model_load_s|load_s|seconds|elapsed|"
                      r"config_hash)")  # (config_hash: of a config that holds the recording's paths)


def fixtures(root: Path) -> None:
    corpus = Path(os.environ["LRBENCH_DATA_DIR"]) / "wikitext-2" / "valid.txt"
    (root / "fixtures").mkdir(parents=True)
    (root / "fixtures" / "corpus.txt").write_text(corpus.read_text()[:6000])  # a few thousand tokens
    sft = root / "fixtures" / "sft.jsonl"
    sft.parent.mkdir(parents=True, exist_ok=True)
    sft.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"{2 * i}"}) + "\n"
                           for i in range(12)))
    bench = root / "fixtures" / "bench" / "algebra.csv"
    bench.parent.mkdir(parents=True, exist_ok=True)
    with open(bench, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("question", "A", "B", "C", "D", "answer"))
        writer.writerows([(f"What is {a} + 1?", "2", "3", "4", "5", "ABCD"[a - 1]) for a in range(1, 5)])


def command(root: Path, name: str, module: str, args: list[str], results: str = "runs.csv",
            code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LRBENCH_RESULTS_CSV": str(root / results), "LRBENCH_OUTPUT_DIR": str(root / "outputs"),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", module, *args]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    print(f"{name:16s} rc={done.returncode} {time.perf_counter() - started:6.1f}s", flush=True)
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
    return done


def train(root: Path, name: str, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    args = [o.replace("{DIR}", str(root)) for o in overrides]
    return command(root, name, "lowrank_bench.train", [*args, f"hydra.run.dir={root / 'runs' / name}"], **kw)


def record(root: Path) -> None:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=False)
    fixtures(root)
    failed = [name for name, overrides in RUNS.items() if train(root, name, overrides).returncode]
    # killed by SIGKILL at optimiser step 5 (after the checkpoint of step 4), then resumed in its own folder
    train(root, "killed", RESUMED, results="killed.csv", code=KILLER)
    if train(root, "resumed", [*RESUMED, "trainer.resume=auto"], results="killed.csv").returncode:
        failed.append("resumed")
    lora = root / "runs" / "lora_mrpc"
    if train(root, "eval_lora", ["mode=eval", f"run_dir={lora}", *FAST], results="eval.csv").returncode:
        failed.append("eval_lora")
    sft = root / "runs" / "sft_mc"
    mc = command(root, "mc_standalone", "lowrank_bench.mc_eval",
                 ["eval=mc/bbh", f"eval.data_dir={root / 'fixtures' / 'bench'}", f"eval.adapter={sft}",
                  "trainer.device=cpu", f"hydra.run.dir={root / 'runs' / 'mc_standalone'}"], results="mc.csv")
    export = command(root, "export_peft", "lowrank_bench.export",
                     [str(lora), "--format", "peft", "--out", str(root / "export")])
    failed += [n for n, done in (("mc_standalone", mc), ("export_peft", export)) if done.returncode]
    if failed:
        sys.exit(f"failed: {failed} (see {root}/logs)")


# -- comparing ---------------------------------------------------------------------------------------------------
def kept(value):
    """`value` without its volatile keys, at any depth."""
    if isinstance(value, dict):
        return {k: kept(v) for k, v in value.items() if not VOLATILE.search(k)}
    return [kept(v) for v in value] if isinstance(value, list) else value


def csv_rows(path: Path, root: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [kept({k: v.replace(str(root), "DIR") for k, v in row.items() if v not in ("", None)})
                for row in csv.DictReader(handle)]


def json_file(path: Path, root: Path):
    """The file's JSON, its recording's folder written as DIR, volatile keys left out; peft's target_modules (a set
    that peft writes in hash order, which differs from process to process) sorted."""
    if not path.is_file():
        return None
    value = kept(json.loads(normalised(path, root)))
    if isinstance(value, dict) and isinstance(value.get("target_modules"), list):
        value["target_modules"] = sorted(value["target_modules"])
    return value


def normalised(path: Path, root: Path) -> bytes:
    return path.read_bytes().replace(str(root).encode(), b"DIR")


def differences(a: Path, b: Path) -> list[str]:
    a, b = a.resolve(), b.resolve()
    out = []
    for folder in sorted(p.name for p in (a / "runs").iterdir()):
        fa, fb = a / "runs" / folder / "metrics.jsonl", b / "runs" / folder / "metrics.jsonl"
        if fa.is_file() != fb.is_file() or (fa.is_file() and normalised(fa, a) != normalised(fb, b)):
            out.append(f"{folder}/metrics.jsonl differs")
        for name in ("summary.json", "mc_bbh.json", "mc_summary.json"):
            ja, jb = json_file(a / "runs" / folder / name, a), json_file(b / "runs" / folder / name, b)
            if ja != jb:
                keys = sorted(k for k in {*(ja or {}), *(jb or {})} if (ja or {}).get(k) != (jb or {}).get(k))
                out.append(f"{folder}/{name} differs in {keys}")
    for table in ("runs.csv", "killed.csv", "eval.csv"):
        ra, rb = csv_rows(a / table, a), csv_rows(b / table, b)
        if len(ra) != len(rb):
            out.append(f"{table}: {len(ra)} rows against {len(rb)}")
        for i, (x, y) in enumerate(zip(ra, rb)):
            keys = sorted(k for k in {*x, *y} if x.get(k) != y.get(k))
            if keys:
                out.append(f"{table} row {i} ({x.get('method')} {x.get('task')}) differs in {keys}")
    for file in sorted(p.relative_to(a / "export") for p in (a / "export").rglob("*") if p.is_file()):
        fa, fb = a / "export" / file, b / "export" / file
        if file.name == "README.md":  # the model card: paths, commit and date
            continue
        same = json_file(fa, a) == json_file(fb, b) if file.suffix == ".json" else (
            fb.is_file() and digest(fa) == digest(fb))
        if not same:
            out.append(f"export/{file} differs")
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> None:
    found = differences(a, b)
    runs = sorted(p.name for p in (a / "runs").iterdir())
    exported = sorted(p.name for p in (a / "export").iterdir())
    print(f"compared {len(runs)} run folders ({', '.join(runs)}), 3 result tables, export ({', '.join(exported)})")
    for line in found:
        print("DIFFERENT:", line)
    if found:
        sys.exit(1)
    print("same numbers: every metrics.jsonl byte-identical, rows, summaries and exported files equal")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
