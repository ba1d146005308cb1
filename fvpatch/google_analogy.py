"""The Google analogy test set (Mikolov et al. 2013): 19,544 A:B::C:D questions in 14 categories.

Each category is one relation over a set of word pairs (Athens:Greece, Baghdad:Iraq, ...); every question pairs
two of them. `split` keeps a category's first pairs (in a seeded order) for training, say 20 for an FFV or
10-shot demonstrations, the next few for early stopping, and keeps as test questions only those that use none
of their words, so no test question's words were ever trained or stopped on. `choices` makes a question multiple choice: its D and other D's of the
same category as distractors.
"""

import random
from dataclasses import dataclass
from pathlib import Path

from fvpatch.errors import FvpatchError

PATH = Path(__file__).resolve().parent / "datasets" / "google_analogy" / "questions-words.txt"


@dataclass(frozen=True)
class Question:
    category: str
    a: str
    b: str
    c: str
    d: str


def load(path: str | Path = PATH) -> dict[str, list[Question]]:
    """Category -> its questions, in file order."""
    out: dict[str, list[Question]] = {}
    category = None
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith(":"):
            category = line[1:].strip()
            out[category] = []
        elif line.strip():
            words = line.split()
            if category is None or len(words) != 4:
                raise FvpatchError(f"{path}:{n}: expected `: category` or four words `A B C D`, got {line!r}")
            out[category].append(Question(category, *words))
    return out


Pair = tuple[str, str]


def pairs(questions: list[Question]) -> list[Pair]:
    """The category's distinct word pairs, in order of first use."""
    return list(dict.fromkeys(p for q in questions for p in ((q.a, q.b), (q.c, q.d))))


def split(questions: list[Question], n_train: int = 20, n_valid: int = 5, seed: int = 0) -> tuple[list[Pair], list[Pair], list[Question]]:
    """(training pairs, valid pairs, test questions that use none of their words)."""
    ps = pairs(questions)
    random.Random(f"google-analogy:{seed}").shuffle(ps)
    if len(ps) < n_train + n_valid + 2:
        raise FvpatchError(f"{questions[0].category} has {len(ps)} word pairs: too few for {n_train} to train on, {n_valid} to stop on and a test")
    train, valid = ps[:n_train], ps[n_train : n_train + n_valid]
    seen = {w for p in train + valid for w in p}
    return train, valid, [q for q in questions if not {q.a, q.b, q.c, q.d} & seen]


def choices(q: Question, questions: list[Question], k: int = 4, seed: int = 0) -> list[str]:
    """q.d and k - 1 other D's of the category (never A, B or C), shuffled by a seed and the question."""
    others = sorted({p[1] for p in pairs(questions)} - {q.a, q.b, q.c, q.d})
    rng = random.Random(f"{seed}:{q.a}:{q.b}:{q.c}:{q.d}")
    options = rng.sample(others, k - 1) + [q.d]
    rng.shuffle(options)
    return options
