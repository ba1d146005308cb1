"""Analogies A:B::C:D solved with a composite function vector (CFV) built from a bank of relation vectors.

For the source pair A:B every bank vector v_i is scored by s_i = log P(B | `Q: A\\nA:`, v_i at the last
token), B's tokens teacher-forced; all k scores come from one packed llama.cpp decode. The scores become
weights w = softmax(W (s - mean s) + b) through a learned affine map (train/cfv.py fits it), or
softmax(s / T) unlearned, and CFV = sum_i w_i v_i is added at the last token of `Q: C\\nA:`.

Analogy files are JSONL in the layout of the public analogy question releases (SAT, U2, U4, BATS, Google):
`{"stem": [A, B], "choice": [[C1, D1], [C2, D2], ...], "answer": index}`. A choice is scored by the mean
per-token log P(D_j | C_j) under each condition. Generated analogies keep one C for all choices (the
distractors are other D's), so they are also scored as open completion: greedy decoding from C alone.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from fvpatch.atomic import write_text
from fvpatch.bank import Bank
from fvpatch.errors import FvpatchError, NotFound
from fvpatch.prompts import answer_tokens, build, template
from fvpatch.session import Patch, Session
from fvpatch.tasks import Pair, load_task

QA = template("qa")
CONDITIONS = ("no_vector", "prompt_colon", "prompt_is_to", "best_ffv", "cfv_unlearned", "cfv_learned", "oracle_ffv")
# also on request: k-shot demonstrations of the analogy's relation (evaluate's `demos`), and the learned CFV added
# to the `A is to B as C is to` prompt or to that ICL prompt instead of to a bare `Q: C\nA:`
MORE_CONDITIONS = ("icl", "cfv_learned_is_to", "cfv_learned_icl")
MAP_KEYS = ("fvpatch.cfv.weight", "fvpatch.cfv.bias", "fvpatch.cfv.temperature")


@dataclass
class Analogy:
    a: str
    b: str
    choices: list[Pair]  # (C_j, D_j); the right one is choices[answer]
    answer: int
    relation: str = ""  # known for generated analogies

    @property
    def c(self) -> str:
        return self.choices[self.answer][0]

    @property
    def d(self) -> str:
        return self.choices[self.answer][1]

    @property
    def open(self) -> bool:
        """One C for every choice: the question is A:B::C:? and can be answered by free completion."""
        return len({c for c, _ in self.choices}) == 1


# ---- reading and writing analogy files ---------------------------------------------------------


def parse_analogy(text: str) -> tuple[str, str, str]:
    """`hot:cold::tall:?` (the trailing `?` optional) -> ("hot", "cold", "tall")."""
    halves = text.split("::")
    if len(halves) != 2 or halves[0].count(":") != 1 or halves[1].count(":") > 1:
        raise FvpatchError(f"expected an analogy like 'hot:cold::tall:?', got {text!r}")
    a, b = (s.strip() for s in halves[0].split(":"))
    c = halves[1].split(":")[0].strip()
    if not (a and b and c):
        raise FvpatchError(f"A, B and C of {text!r} must all be non-empty")
    return a, b, c


def _analogy(row, where: str) -> Analogy:
    stem, choices, answer = (row.get(k) for k in ("stem", "choice", "answer")) if type(row) is dict else (None, None, None)
    pair = lambda v: type(v) is list and len(v) == 2 and all(type(w) is str and w.strip() for w in v)
    if not (pair(stem) and type(choices) is list and choices and all(map(pair, choices)) and type(answer) is int and 0 <= answer < len(choices)):
        raise FvpatchError(f'{where}: expected {{"stem": [A, B], "choice": [[C, D], ...], "answer": index}} (non-empty strings, '
                           f'answer an index into the choices), got {row!r:.120}')
    (a, b), relation = stem, row.get("relation", "")
    return Analogy(a.strip(), b.strip(), [(c.strip(), d.strip()) for c, d in choices], answer, relation if type(relation) is str else "")


def read_analogies(path: str | Path) -> list[Analogy]:
    """Analogies from a JSONL file, one `{"stem", "choice", "answer"}` object a line (SAT/U2/U4/BATS/Google layout)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"analogy file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FvpatchError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FvpatchError(f"{path}:{n}: not valid JSON ({e})") from None
        out.append(_analogy(row, f"{path}:{n}"))
    if not out:
        raise FvpatchError(f"{path}: holds no analogies")
    return out


def write_analogies(analogies: list[Analogy], path: str | Path) -> Path:
    rows = [{"stem": [x.a, x.b], "choice": [list(ch) for ch in x.choices], "answer": x.answer, "relation": x.relation} for x in analogies]
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---- generating analogies from the relation tasks ------------------------------------------------


def generate(relations: list[str], split: str, n: int, seed: int = 0, exclude: dict[str, list[Pair]] | None = None) -> list[Analogy]:
    """`n` near analogies (A:B and C:D from one relation), relations taken in turn, from one split of each task.

    split `test` draws from the tasks' test splits, which no bank vector was fit on; `train` draws from the
    train and valid splits minus `exclude` (the pairs each vector was fit on). The distractors are another
    D of the same relation, C itself (copying), and a D of another relation: 4 choices."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    exclude = exclude or {}
    pools = {}
    for r in relations:
        task = load_task(r)
        used = {tuple(p) for p in exclude.get(r, [])}
        pairs = task.test if split == "test" else [p for p in task.train + task.valid if p not in used]
        pools[r] = [p for p in pairs if p[0] != p[1]]
        if len(pools[r]) < 3:
            raise FvpatchError(f"task {r!r} has {len(pools[r])} usable {split} pairs; an analogy with distractors needs at least 3")
    rng = random.Random(f"analogies:{split}:{seed}")
    order = list(relations)
    out = []
    while len(out) < n:
        if len(out) % len(order) == 0:
            rng.shuffle(order)
        r = order[len(out) % len(order)]
        (a, b), (c, d), (_, other) = rng.sample(pools[r], 3)
        others = [y for q in relations if q != r for _, y in rng.sample(pools[q], 2)]
        wrong = [w for w in dict.fromkeys([other, c, *others]) if w.lower() != d.lower() and w.lower() != b.lower()][:3]
        if a == c or b == d or len(wrong) < 3:
            continue
        choices = [d, *wrong]
        rng.shuffle(choices)
        out.append(Analogy(a, b, [(c, w) for w in choices], choices.index(d), r))
    return out


# ---- the learned map: scores -> weights ----------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _masked_softmax(logits: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    return softmax(logits if keep is None else np.where(keep, logits, -np.inf))


@dataclass
class CFVMap:
    weight: np.ndarray  # (k, k), acting on scores centred over the bank
    bias: np.ndarray  # (k,)
    temperature: float  # of the unlearned softmax(s / T)
    meta: dict[str, str] = field(default_factory=dict)  # how it was fit

    def learned(self, scores: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Weights over the bank; `keep` (bool, like scores) gives the relations left out a weight of 0."""
        s = np.asarray(scores, np.float64)
        return _masked_softmax((s - s.mean(-1, keepdims=True)) @ self.weight.T + self.bias, keep)

    def unlearned(self, scores: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        return _masked_softmax(np.asarray(scores, np.float64) / self.temperature, keep)

    def to_meta(self) -> dict[str, str]:
        return {
            "fvpatch.cfv.weight": json.dumps(np.round(self.weight, 6).tolist()),
            "fvpatch.cfv.bias": json.dumps(np.round(self.bias, 6).tolist()),
            "fvpatch.cfv.temperature": repr(float(self.temperature)),
        } | self.meta

    @classmethod
    def from_bank(cls, bank: Bank) -> "CFVMap":
        """The map a bank file carries: each key a JSON array of finite numbers of the bank's shape (a temperature
        above 0), or one line naming the file and the key."""
        where = bank.source or "the bank"
        if not all(k in bank.meta for k in MAP_KEYS):
            raise FvpatchError(f"{where} carries no learned analogy map; fit one with `fvpatch train cfv`")
        k = len(bank)
        w, b, t = (_numbers(bank.meta[key], shape, f"{where}: {key}") for key, shape in zip(MAP_KEYS, [(k, k), (k,), ()]))
        if not t > 0:
            raise FvpatchError(f"{where}: {MAP_KEYS[2]} must be above 0, got {float(t)}")
        rest = {k: v for k, v in bank.meta.items() if k.startswith("fvpatch.cfv.") and k not in MAP_KEYS}
        return cls(w, b, float(t), rest)


def _numbers(text: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Finite numbers in nested JSON lists of `shape`: no NaN, no strings or booleans taken for numbers."""

    def numeric(v) -> bool:
        return all(map(numeric, v)) if type(v) is list else type(v) in (int, float)

    def no_constant(name):
        raise ValueError(f"{name} is not a number")

    try:
        value = json.loads(text, parse_constant=no_constant)
        arr = np.array(value, np.float64) if numeric(value) else None
    except (ValueError, OverflowError, RecursionError):  # not JSON, NaN/Infinity, ragged lists, an int beyond float
        arr = None
    if arr is None or arr.shape != shape or not np.isfinite(arr).all():
        want = "a finite number" if not shape else f"finite numbers of shape {list(shape)}"
        raise FvpatchError(f"{what} must be {want}, got {text[:60]!r}")
    return arr


def compose(bank: Bank, weights: np.ndarray) -> np.ndarray:
    """The composite vector(s): weights (k,) or (n, k) over the bank's rows."""
    return (np.asarray(weights, np.float64) @ bank.vectors.astype(np.float64)).astype(np.float32)


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
