"""Analogies A:B::C:D solved with a composite function vector (CFV) built from a bank of relation vectors.

For the source pair A:B every bank vector v_i is scored by s_i = log P(B | `Q: A\\nA:`, v_i at the last
token), B's tokens teacher-forced; all k scores come from one packed llama.cpp decode. The scores become
weights through the map (fvpatch/cfvmap.py), and the CFV, their weighted sum of the bank's vectors, is added at
the last token of `Q: C\\nA:`. A choice of an analogy (fvpatch/analogyfile.py) is scored by the mean per-token
log P(D_j | C_j) under each condition; open analogies are also scored by greedy decoding from C alone.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from fvpatch.analogyfile import Analogy
from fvpatch.bank import Bank
from fvpatch.cfvmap import CFVMap, compose
from fvpatch.errors import FvpatchError
from fvpatch.prompts import answer_tokens, build, template
from fvpatch.session import Patch, Session
from fvpatch.tasks import Pair

QA = template("qa")
CONDITIONS = ("no_vector", "prompt_colon", "prompt_is_to", "best_ffv", "cfv_unlearned", "cfv_learned", "oracle_ffv")
# also on request: k-shot demonstrations of the analogy's relation (evaluate's `demos`), and the learned CFV added
# to the `A is to B as C is to` prompt or to that ICL prompt instead of to a bare `Q: C\nA:`
MORE_CONDITIONS = ("icl", "cfv_learned_is_to", "cfv_learned_icl")


# ---- prompts of each condition -------------------------------------------------------------------


def encode(tokenize: Callable[[str], list[int]], text: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) as the model sees them when both are tokenized together."""
    try:
        return answer_tokens(tokenize, text, answer)
    except ValueError:  # the prompt's end merges with the answer (public data is not ours to template): score it as typed
        return tokenize(text), tokenize(answer, add_bos=False)


def condition_prompt(condition: str, a: str, b: str, c: str, d: str, demos: list[Pair] = ()) -> tuple[str, str]:
    """(prompt text, answer text) of one condition; the vector conditions share the zero-shot prompt."""
    if condition == "prompt_colon":
        return f"{a}:{b}::{c}:", d
    if condition in ("prompt_is_to", "cfv_learned_is_to"):
        return f"{a} is to {b} as {c} is to", f" {d}"
    p = build(QA, list(demos) if condition in ("icl", "cfv_learned_icl") else [], c, d)
    return p.text, p.answer


def bank_scores(session: Session, bank: Bank, pairs: list[Pair], progress: bool = False) -> np.ndarray:
    """s[n, i] = log P(B_n | `Q: A_n\\nA:`, bank vector i added at the last token): (n, k), one packed decode per pair."""
    out = np.empty((len(pairs), len(bank)), np.float64)
    for n, (a, b) in enumerate(tqdm(pairs, desc="bank scores", disable=not progress, leave=False)):
        prompt, answer = encode(session.tokenize, *condition_prompt("no_vector", "", "", a, b))
        items = [(prompt, answer, [Patch(bank.tensor, v, -1, "add")]) for v in bank.vectors]
        out[n] = [lp.sum() for lp in session.answer_logprobs(items)]
    return out


def leave_own_out(bank: Bank, scores: np.ndarray, relations: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and a keep-mask as if each analogy's own relation were missing from the bank: its score becomes the
    mean of the others (so, centred, it moves no other weight through the learned map) and its weight is 0."""
    if "" in relations:
        raise FvpatchError(f"leaving the own relation out needs each analogy's relation; analogy {relations.index('') + 1} names none (give it \"relation\")")
    unknown = sorted(set(relations) - set(bank.names))
    if unknown:
        raise FvpatchError(f"leaving the own relation out needs analogies of the bank's relations; not in the bank: {unknown}")
    rows, own = np.arange(len(scores)), np.array([bank.names.index(r) for r in relations])
    keep = np.ones(scores.shape, bool)
    keep[rows, own] = False
    s = scores.copy()
    s[rows, own] = np.where(keep, scores, 0).sum(-1) / keep.sum(-1)
    return s, keep


def condition_weights(bank: Bank, cfv_map: CFVMap, scores: np.ndarray, relations: list[str], leave_out: bool = False) -> dict[str, np.ndarray]:
    """The bank weights of each patched condition for source pairs with these scores: condition -> (n, k).
    `oracle_ffv`, the analogy's own relation, exists when every relation is in the bank and none is left out."""
    keep = None
    if leave_out:
        scores, keep = leave_own_out(bank, scores, relations)
    one_hot = lambda idx: np.eye(len(bank))[idx]
    best = scores if keep is None else np.where(keep, scores, -np.inf)
    out = {
        "best_ffv": one_hot(best.argmax(-1)),
        "cfv_unlearned": cfv_map.unlearned(scores, keep),
        "cfv_learned": cfv_map.learned(scores, keep),
    }
    if not leave_out and all(r in bank.names for r in relations):
        out["oracle_ffv"] = one_hot([bank.names.index(r) for r in relations])
    return out


# ---- evaluation ----------------------------------------------------------------------------------


def _word_match(text: str, d: str) -> bool:
    """The completion's first line starts with D at a word boundary (`short::`, ` short\\n` count; `shorter` does not)."""
    t = text.split("\n")[0].strip()
    return t.startswith(d) and (len(t) == len(d) or not t[len(d)].isalnum())


def evaluate(session: Session, bank: Bank, cfv_map: CFVMap, analogies: list[Analogy], conditions=CONDITIONS, progress: bool = True,
             leave_out: bool = False, demos: dict[str, list[Pair]] | None = None) -> dict:
    """Multiple-choice accuracy of every condition, and open-completion accuracy (first token, exact word) on open analogies.
    `leave_out` solves each analogy without its own relation's vector: can the others compose it? `demos` gives
    each relation's demonstrations for the `icl` condition."""
    unknown = set(conditions) - set(CONDITIONS) - set(MORE_CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; choose from {', '.join(CONDITIONS + MORE_CONDITIONS)}")
    if {"icl", "cfv_learned_icl"} & set(conditions) and not all(x.relation in (demos or {}) for x in analogies):
        raise ValueError("the icl condition needs demonstrations for every analogy's relation")
    scores = bank_scores(session, bank, [(x.a, x.b) for x in analogies], progress)
    weights = condition_weights(bank, cfv_map, scores, [x.relation for x in analogies], leave_out)
    vectors = {cond: compose(bank, w) for cond, w in weights.items()}
    vectors["cfv_learned_is_to"] = vectors["cfv_learned_icl"] = vectors["cfv_learned"]
    conditions = [c for c in conditions if c != "oracle_ffv" or c in vectors]  # no oracle without known relations
    records = []
    for n, x in enumerate(tqdm(analogies, desc="analogies", disable=not progress, leave=False)):
        rec = {"stem": [x.a, x.b], "choice": [list(ch) for ch in x.choices], "answer": x.answer, "relation": x.relation,
               "best_relation": bank.names[int(weights["best_ffv"][n].argmax())], "top_learned": bank.names[int(weights["cfv_learned"][n].argmax())],
               "mc": {}, "first_token": {}, "exact": {}, "completion": {}}
        patches = {cond: [Patch(bank.tensor, vectors[cond][n], -1, "add")] if cond in vectors else [] for cond in conditions}
        items, owner = [], []
        for cond in conditions:
            for c, d in x.choices:
                items.append((*encode(session.tokenize, *condition_prompt(cond, x.a, x.b, c, d, (demos or {}).get(x.relation, ()))), patches[cond]))
                owner.append(cond)
        logps = session.answer_logprobs(items)
        for cond in conditions:
            means = [float(lp.mean()) for lp, o in zip(logps, owner) if o == cond]
            rec["mc"][cond] = int(int(np.argmax(means)) == x.answer)
            if x.open:
                prompt, answer = encode(session.tokenize, *condition_prompt(cond, x.a, x.b, x.c, x.d, (demos or {}).get(x.relation, ())))
                r = session.run(prompt, patches=patches[cond], max_tokens=len(answer) + 1)
                rec["first_token"][cond] = int(r.generated[0] == answer[0])
                rec["exact"][cond] = int(_word_match(r.text, x.d))
                rec["completion"][cond] = r.text
        records.append(rec)
    return {"n": len(analogies), "n_open": sum(x.open for x in analogies), "accuracy": summarize(records, conditions), "items": records}


def summarize(records: list[dict], conditions) -> dict[str, dict[str, float | None]]:
    out = {}
    for cond in conditions:
        out[cond] = {}
        for metric in ("mc", "first_token", "exact"):
            vals = [r[metric][cond] for r in records if cond in r[metric]]
            out[cond][metric] = float(np.mean(vals)) if vals else None
    return out


def relation_accuracy(records: list[dict]) -> dict[str, float | None]:
    """How often the highest score (best FFV) and the largest learned weight name the analogy's own relation."""
    known = [r for r in records if r["relation"]]
    if not known:
        return {"best_ffv": None, "cfv_learned": None}
    return {"best_ffv": float(np.mean([r["best_relation"] == r["relation"] for r in known])),
            "cfv_learned": float(np.mean([r["top_learned"] == r["relation"] for r in known]))}


# ---- one analogy, for the command line -----------------------------------------------------------


@dataclass
class Solution:
    answer: str
    completion: str
    weights: list[tuple[str, float]]  # relations by learned weight, largest first
    scores: dict[str, float]


def solve(session: Session, bank: Bank, cfv_map: CFVMap, a: str, b: str, c: str, max_tokens: int = 8) -> Solution:
    scores = bank_scores(session, bank, [(a, b)])[0]
    w = cfv_map.learned(scores)
    r = session.run(QA.query(c), patches=[Patch(bank.tensor, compose(bank, w), -1, "add")], max_tokens=max_tokens)
    order = np.argsort(-w)
    # a base model runs on after the answer (`dogs, cats and`): the answer is the first line up to a comma
    answer = r.text.split("\n")[0].split(",")[0].split(";")[0].strip()
    return Solution(answer, r.text, [(bank.names[i], float(w[i])) for i in order],
                    {name: float(s) for name, s in zip(bank.names, scores)})


# ---- reporting -----------------------------------------------------------------------------------

LABELS = {
    "no_vector": "no vector (`Q: C\\nA:`)",
    "prompt_colon": "prompt `A:B::C:`",
    "prompt_is_to": "prompt `A is to B as C is to`",
    "best_ffv": "single best FFV (highest s_i)",
    "cfv_unlearned": "CFV, unlearned softmax(s/T)",
    "cfv_learned": "CFV, learned map",
    "oracle_ffv": "oracle: FFV of the true relation",
    "icl": "10-shot ICL of the relation (`Q: x\\nA: y` demos, then `Q: C\\nA:`)",
    "cfv_learned_is_to": "CFV (learned) + prompt `A is to B as C is to`",
    "cfv_learned_icl": "CFV (learned) + 10-shot ICL prompt",
}


def table(result: dict) -> str:
    """The accuracies of an `evaluate` result as a markdown table."""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"
    lines = ["| condition | multiple choice | open: first token | open: exact word |", "|---|---:|---:|---:|"]
    for cond, acc in result["accuracy"].items():
        lines.append(f"| {LABELS[cond]} | {pct(acc['mc'])} | {pct(acc['first_token'])} | {pct(acc['exact'])} |")
    return "\n".join(lines)
