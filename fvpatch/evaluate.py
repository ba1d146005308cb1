"""Top-1 accuracy of the answer's first token on a relation task, with and without a vector.

The protocol (which prompts, which conditions, which subsets) is engine-free: it takes a `predict`
function that maps token lists (and an optional vector patched at each prompt's last token) to top-1
token ids. `llamacpp_predictor` is the llama.cpp one; train/evaluate.py has the PyTorch one.

Accuracies are reported on all scored items and on the subset that k-shot ICL solves, the protocol of
Todd et al. (2023), which asks how much of what ICL does the vector recovers.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from fvpatch.errors import FvpatchError
from fvpatch.prompts import Template, answer_token, prompts_for
from fvpatch.session import Patch, Session
from fvpatch.tasks import Pair
from fvpatch.vectorfile import VectorFile

Predict = Callable[[list[list[int]], VectorFile | None], list[int]]
BASE_CONDITIONS = ("zero_shot", "icl", "shuffled")
VECTOR_CONDITIONS = ("zero_shot+vector", "shuffled+vector")


@dataclass
class Items:
    """Token lists and answer tokens for one set of queries in each base condition."""

    tokens: dict[str, list[list[int]]]  # condition -> one token list per query
    answers: list[int]
    queries: list[Pair]


def build_items(tokenize: Callable[[str], list[int]], tpl: Template, queries: list[Pair], pool: list[Pair], k: int = 10, seed: int = 0,
                shared_demos: bool = False) -> Items:
    zero = prompts_for(tpl, queries, pool, 0, seed=seed)
    icl = prompts_for(tpl, queries, pool, k, seed=seed, shared=shared_demos)
    shuffled = prompts_for(tpl, queries, pool, k, shuffled=True, seed=seed, shared=shared_demos)
    answers = [answer_token(tokenize, p) for p in zero]
    for p, a in zip(icl, answers):
        if answer_token(tokenize, p) != a:
            raise FvpatchError(f"the answer {p.answer!r} starts with a different token after demonstrations than zero-shot")
    tokens = {name: [tokenize(p.text) for p in ps] for name, ps in (("zero_shot", zero), ("icl", icl), ("shuffled", shuffled))}
    return Items(tokens, answers, list(queries))


def base_correct(predict: Predict, items: Items) -> dict[str, np.ndarray]:
    return {c: np.array(predict(items.tokens[c], None)) == np.array(items.answers) for c in BASE_CONDITIONS}


def vector_correct(predict: Predict, items: Items, vector: VectorFile, conditions=VECTOR_CONDITIONS) -> dict[str, np.ndarray]:
    """`zero_shot+vector` patches the zero-shot prompts, `shuffled+vector` the shuffled-label ones."""
    return {c: np.array(predict(items.tokens[c.removesuffix("+vector")], vector)) == np.array(items.answers) for c in conditions}


def summarize(correct: dict[str, np.ndarray]) -> dict:
    """Accuracy of each condition on all items and on the items that ICL gets right."""
    solved = correct["icl"]
    out = {"n": int(len(solved)), "n_icl_solved": int(solved.sum()), "all": {}, "icl_solved": {}}
    for name, c in correct.items():
        out["all"][name] = float(c.mean())
        out["icl_solved"][name] = float(c[solved].mean()) if solved.any() else None
    return out


def evaluate(predict: Predict, items: Items, vector: VectorFile | None) -> dict:
    correct = base_correct(predict, items)
    if vector is not None:
        correct |= vector_correct(predict, items, vector)
    return summarize(correct) | {"correct": {k: v.astype(int).tolist() for k, v in correct.items()}}


def sweep(predict: Predict, items: Items, vectors: dict[int, VectorFile], condition: str = "zero_shot+vector") -> dict[int, float]:
    """Accuracy of one vector condition with the vector placed at each layer in turn."""
    return {layer: float(vector_correct(predict, items, vf, (condition,))[condition].mean()) for layer, vf in tqdm(vectors.items(), desc="layer sweep", leave=False)}


def patch_of(vector: VectorFile) -> Patch:
    """The vector at the last prompt token (at every token where the file's fvpatch.apply_at says all), with the
    file's mode and scale."""
    return Patch(vector.tensor, vector.row(None), token=-1, mode=vector.mode, scale=vector.scale, all_tokens=vector.meta.get("fvpatch.apply_at") == "all")


def llamacpp_predictor(session: Session, batched: bool = True) -> Predict:
    """Top-1 after each prompt in llama.cpp: batched (Session.last_logits: the shared prefix decoded once, the
    rests packed), or one prompt per decode as `fvpatch patch` runs it."""

    def predict(token_lists: list[list[int]], vector: VectorFile | None) -> list[int]:
        patches = [patch_of(vector)] if vector is not None else []
        if batched:
            return [int(np.argmax(logits)) for logits in session.last_logits(token_lists, patches)]
        return [int(np.argmax(session.run(t, patches=patches).logits)) for t in tqdm(token_lists, desc="llama.cpp", leave=False)]

    return predict
