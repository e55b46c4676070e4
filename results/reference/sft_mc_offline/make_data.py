"""Small local data for an offline SFT + multiple-choice run (issue 10's acceptance): "which number is the
largest?" with four options. The training rows are the evaluation's user message with the answer letter as the
response, so tuning can teach what the 0-shot prompt asks; the evaluation items are other numbers.

    python results/reference/sft_mc_offline/make_data.py /tmp/sft_mc    # writes train.jsonl and mc/arithmetic.csv
"""
import csv
import json
import random
import sys
from pathlib import Path

SYSTEM = ("The following are multiple choice questions (with answers) about {subject}. Please provide only the "
          "correct option (one uppercase letter).\n\n")  # conf/eval/mc/_base.yaml's, CoLA's evaluation prompt


def item(rng: random.Random) -> tuple[str, list[str], str]:
    numbers = rng.sample(range(10, 100), 4)
    return "Which of these numbers is the largest?", [str(n) for n in numbers], "ABCD"[numbers.index(max(numbers))]


def user_message(question: str, options: list[str]) -> str:
    return SYSTEM.format(subject="arithmetic") + question + "".join(
        f"\n{letter}. {text}" for letter, text in zip("ABCD", options)) + "\nAnswer:"


def main(folder: Path, n_train: int = 400, n_eval: int = 100) -> None:
    rng = random.Random(0)
    (folder / "mc").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as out:
        for _ in range(n_train):
            question, options, answer = item(rng)
            out.write(json.dumps({"instruction": user_message(question, options), "input": "", "output": answer}) + "\n")
    with open(folder / "mc" / "arithmetic.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["question", "A", "B", "C", "D", "answer"])
        for _ in range(n_eval):
            question, options, answer = item(rng)
            writer.writerow([question, *options, answer])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
