"""Small local data for an offline SFT + multiple-choice run (issue 10's acceptance): "which of these is a fruit?"
with four options, one fruit among three other things. The training rows are the evaluation's user message with
the answer letter as the response, so tuning can teach what the 0-shot prompt asks; the evaluation items are other
draws (other combinations and orders of the same words).

    python results/reference/sft_mc_offline/make_data.py /tmp/sft_mc    # writes train.jsonl and mc/fruit.csv
"""
import csv
import json
import random
import sys
from pathlib import Path

SYSTEM = ("The following are multiple choice questions (with answers) about {subject}. Please provide only the "
          "correct option (one uppercase letter).\n\n")  # lowrank_bench/conf/eval/mc/_base.yaml's, CoLA's evaluation prompt
FRUITS = "apple banana cherry grape lemon mango orange peach pear plum kiwi melon lime apricot fig papaya".split()
OTHERS = ("hammer chair river cloud pencil bicycle tiger window candle ladder violin bridge shoe lamp rabbit "
          "mountain bottle carpet engine camera wallet pillow eagle anchor").split()
QUESTION = "Which of these is a fruit?"


def item(rng: random.Random) -> tuple[list[str], str]:
    options = [rng.choice(FRUITS), *rng.sample(OTHERS, 3)]
    rng.shuffle(options)
    return options, "ABCD"[next(i for i, o in enumerate(options) if o in FRUITS)]


def user_message(options: list[str]) -> str:
    return SYSTEM.format(subject="fruit") + QUESTION + "".join(
        f"\n{letter}. {text}" for letter, text in zip("ABCD", options)) + "\nAnswer:"


def main(folder: Path, n_train: int = 400, n_eval: int = 100) -> None:
    rng = random.Random(0)
    (folder / "mc").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as out:
        for _ in range(n_train):
            options, answer = item(rng)
            out.write(json.dumps({"instruction": user_message(options), "input": "", "output": answer}) + "\n")
    with open(folder / "mc" / "fruit.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["question", "A", "B", "C", "D", "answer"])
        for _ in range(n_eval):
            options, answer = item(rng)
            writer.writerow([QUESTION, *options, answer])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
