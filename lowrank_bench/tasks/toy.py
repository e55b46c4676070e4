"""An embedded sentiment task, generated deterministically in code, so that the demo and the tests run on a fresh
machine with no data and no network. It is a real learning problem: the label is the polarity of the adjective,
flipped by a negation ("not", "never") in about a third of the sentences, which a bag of words cannot solve.
"""
from __future__ import annotations

import random

from lowrank_bench.tasks.base import ClassificationTask, Example, built_in_data

POSITIVE = ["good", "great", "wonderful", "brilliant", "charming", "delightful", "superb", "moving", "clever",
            "beautiful", "funny", "gripping", "excellent", "fresh", "touching", "smart"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "clumsy", "tedious", "weak", "poor", "silly", "bland",
            "messy", "painful", "lifeless", "forgettable", "annoying"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the ending", "the cast", "the story",
            "the soundtrack", "the director's work", "this sequel", "the dialogue"]
TEMPLATES = ["{s} was {neg}{adj}.", "i thought {s} was {neg}{adj}.", "honestly, {s} is {neg}{adj}.",
             "{s} felt {neg}{adj} to me.", "everyone agreed that {s} was {neg}{adj}."]
NEGATIONS = ["not ", "never ", "hardly "]
SIZES = {"train": 800, "validation": 400}


def generate(split: str, n: int) -> list[Example]:
    rng = random.Random(f"toy-sentiment-{split}")
    examples = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.35
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), neg=rng.choice(NEGATIONS) if negated else "", adj=adj)
        examples.append({"text": text, "text_pair": None, "label": int(positive != negated)})
    return examples


class ToySentiment(ClassificationTask):
    name = "toy/sentiment"

    def __init__(self, cfg):
        super().__init__(cfg)
        built_in_data(cfg, "is generated in code")

    def source_id(self) -> str:
        return "embedded-v1"

    def label_names(self) -> list[str]:
        return ["negative", "positive"]  # label 1: a positive adjective, or a negated negative one

    def raw_split(self, split: str) -> list[Example]:
        return generate(split, SIZES[split])
