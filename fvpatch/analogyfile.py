"""Analogy questions A:B::C:D as data: the file layout of the public analogy releases, and near analogies generated
from the relation tasks.

Analogy files are JSONL in the layout of the public analogy question releases (SAT, U2, U4, BATS, Google):
`{"stem": [A, B], "choice": [[C1, D1], [C2, D2], ...], "answer": index}`. Generated analogies keep one C for all
choices (the distractors are other D's), so they can also be answered by free completion.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fvpatch.atomic import write_text
from fvpatch.errors import FvpatchError, NotFound
from fvpatch.tasks import Pair, is_vendored, load_task


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
    """`hot:cold::tall:?` (the trailing `?` optional) -> ("hot", "cold", "tall"). A given D would be ignored, so it
    is refused rather than dropped."""
    halves = text.split("::")
    parts = [s.strip() for half in halves for s in half.split(":")]
    if len(halves) != 2 or halves[0].count(":") != 1 or len(parts) not in (3, 4) or parts[3:] not in ([], ["?"]):
        raise FvpatchError(f"expected an analogy A:B::C:? (or A:B::C) like 'hot:cold::tall:?', got {text!r}")
    a, b, c = parts[:3]
    if not all(w and w != "?" for w in (a, b, c)):
        raise FvpatchError(f"A, B and C of {text!r} must all be given (non-empty, not '?')")
    return a, b, c


def _analogy(row, where: str) -> Analogy:
    stem, choices, answer = (row.get(k) for k in ("stem", "choice", "answer")) if type(row) is dict else (None, None, None)
    pair = lambda v: type(v) is list and len(v) == 2 and all(type(w) is str and w.strip() for w in v)
    relation = row.get("relation", "") if type(row) is dict else None
    # one choice is always "chosen": it would score 100% multiple choice whatever the model does
    if not (pair(stem) and type(choices) is list and len(choices) >= 2 and all(map(pair, choices)) and type(answer) is int
            and 0 <= answer < len(choices) and type(relation) is str):
        raise FvpatchError(f'{where}: expected {{"stem": [A, B], "choice": [[C, D], ...], "answer": index}} (non-empty strings, '
                           f'at least 2 choices, answer an index into the choices, an optional "relation" a string), got {row!r:.120}')
    a, b = stem
    return Analogy(a.strip(), b.strip(), [(c.strip(), d.strip()) for c, d in choices], answer, relation.strip())


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


def own_relations(relations: list[str], trained_on: dict[str, list[Pair]]) -> dict[str, list[Pair]]:
    """The relations of a bank that are a user's own pairs, each with the pairs its vector was trained on (what the
    bank records of it): those not a vendored task, and those named like one whose vector was trained on other pairs
    (a pairs file called `antonym.json`), which would otherwise be drawn from the vendored task's pairs."""
    own = {}
    for r in relations:
        trained = [tuple(p) for p in trained_on.get(r, [])]
        if is_vendored(r):
            task = load_task(r)
            if not trained or set(trained) <= set(task.train + task.valid + task.test):
                continue
        own[r] = trained
    return own


def generate(relations: list[str], split: str, n: int, seed: int = 0, exclude: dict[str, list[Pair]] | None = None,
             own: dict[str, list[Pair]] | None = None) -> list[Analogy]:
    """`n` near analogies (A:B and C:D from one relation), relations taken in turn, from one split of each task.

    split `test` draws from the tasks' test splits, which no bank vector was fit on; `train` draws from the
    train and valid splits minus `exclude` (the pairs each vector was fit on). `own` gives the pairs of relations
    that are no vendored task (`own_relations`), drawn from as they are. The distractors are another D of the same
    relation, C itself (copying), and a D of another relation: 4 choices."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if len(set(relations)) < 2:
        raise FvpatchError(f"analogies need at least 2 relations (a distractor is a D of another relation); got {', '.join(relations) or 'none'}")
    exclude, own = exclude or {}, own or {}
    pools = {}
    for r in relations:
        if r in own:
            pairs = own[r]
        else:
            task = load_task(r)
            used = {tuple(p) for p in exclude.get(r, [])}
            pairs = task.test if split == "test" else [p for p in task.train + task.valid if p not in used]
        pools[r] = [p for p in pairs if p[0] != p[1]]
        if len(pools[r]) < 3:
            raise FvpatchError(f"relation {r!r} has {len(pools[r])} usable {split if r not in own else 'recorded'} pairs; an analogy with distractors needs at least 3")
    rng = random.Random(f"analogies:{split}:{seed}")
    order = list(relations)
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:  # draws that keep failing: pairs that repeat their outputs, never 3 distinct distractors
            raise FvpatchError(f"could not draw {n} analogies with 3 distinct distractors from {', '.join(relations)}: their outputs repeat too much")
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
