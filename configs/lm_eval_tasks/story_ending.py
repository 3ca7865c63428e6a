"""Items of the story_ending task (story_ending.yaml): deterministic, from the text alone."""
import random
import re

import datasets

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
CHOICES = 4


def items(docs: datasets.Dataset) -> datasets.Dataset:
    paragraphs = [re.split(_SENTENCE_END, line.strip()) for line in docs["text"] if line.strip()]
    usable = [p for p in paragraphs if len(p) >= 3]
    endings = [p[-1] for p in usable]
    rng = random.Random(0)
    rows = {"context": [], "choices": [], "answer": []}
    for i, sentences in enumerate(usable):
        others = rng.sample([e for j, e in enumerate(endings) if j != i and e != endings[i]], CHOICES - 1)
        answer = rng.randrange(CHOICES)
        rows["context"].append(" ".join(sentences[:-1]))
        rows["choices"].append(others[:answer] + [endings[i]] + others[answer:])
        rows["answer"].append(answer)
    return datasets.Dataset.from_dict(rows)
