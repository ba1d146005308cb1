"""ICL prompts for relation tasks: a template per demonstration, zero-shot, k-shot and shuffled-label k-shot.

A prompt's text ends right before the answer, and the spaces the template puts before `{y}` belong to the
answer: `Q: hot\\nA:` + ` cold`. That is how the model would produce the answer's first token, so it is
the token scored (see `answer_token`).
"""

import random
import re
from dataclasses import dataclass
from typing import Callable

from fvpatch.errors import FvpatchError
from fvpatch.tasks import Pair

TEMPLATES = {"qa": "Q: {x}\nA: {y}\n\n", "arrow": "{x} -> {y}, "}
DEFAULT_TEMPLATE = "qa"


@dataclass(frozen=True)
class Template:
    text: str  # with exactly one {x} before exactly one {y}
    name: str

    def __post_init__(self):
        if self.text.count("{x}") != 1 or self.text.count("{y}") != 1 or self.text.index("{x}") > self.text.index("{y}"):
            raise FvpatchError(f"a template needs exactly one {{x}} followed by exactly one {{y}}, got {self.text!r}")
        unknown = sorted(set(re.findall(r"\{(\w*)\}", self.text)) - {"x", "y"})
        if unknown:
            raise FvpatchError(f"template {self.text!r} has placeholders {', '.join('{' + u + '}' for u in unknown)} that nothing fills; use only {{x}} and {{y}}")
        if self.text.index("{x}") + 3 == self.text.index("{y}"):
            raise FvpatchError(f"template {self.text!r} puts nothing between {{x}} and {{y}}; the answer's start would be ambiguous")

    def _parts(self) -> tuple[str, str, str]:
        head, rest = self.text.split("{x}")
        mid, tail = rest.split("{y}")
        return head, mid, tail

    def demo(self, x: str, y: str) -> str:
        head, mid, tail = self._parts()
        return f"{head}{x}{mid}{y}{tail}"

    def query(self, x: str) -> str:
        head, mid, _ = self._parts()
        return f"{head}{x}{mid.rstrip(' ')}"

    def query_affixes(self) -> tuple[str, str]:
        """The text before and after the query in a zero-shot prompt (`Q:` and `\nA:` around `walk`)."""
        head, mid, _ = self._parts()
        return head.rstrip(" "), mid.rstrip(" ")

    def answer(self, y: str) -> str:
        _, mid, _ = self._parts()
        return mid[len(mid.rstrip(" ")) :] + y


def template(name_or_text: str = DEFAULT_TEMPLATE) -> Template:
    """A named template (`qa`, `arrow`) or a user's string with {x} and {y}, e.g. 'In: {x} Out: {y}\\n'."""
    if name_or_text in TEMPLATES:
        return Template(TEMPLATES[name_or_text], name_or_text)
    if "{x}" not in name_or_text:
        raise FvpatchError(f"unknown template {name_or_text!r}: use one of {', '.join(TEMPLATES)} or a string with {{x}} and {{y}}")
    return Template(name_or_text, name_or_text)


@dataclass(frozen=True)
class Prompt:
    text: str  # ends right before the answer
    answer: str  # the continuation to score, with the template's leading spaces
    x: str
    y: str


def build(tpl: Template, demos: list[Pair], x: str, y: str) -> Prompt:
    return Prompt("".join(tpl.demo(dx, dy) for dx, dy in demos) + tpl.query(x), tpl.answer(y), x, y)


def shuffle_labels(demos: list[Pair], rng: random.Random) -> list[Pair]:
    """Each demo gets another demo's output (a random cyclic derangement): the format stays, the mapping is gone."""
    if len(demos) < 2:
        raise FvpatchError("shuffled labels need at least 2 demonstrations; give --k 2 or more")
    order = list(range(len(demos)))
    rng.shuffle(order)
    ys = [demos[order[(i + 1) % len(order)]][1] for i in range(len(order))]
    out = list(demos)
    for i, j in enumerate(order):
        out[j] = (demos[j][0], ys[i])
    return out


def sample_demos(pool: list[Pair], k: int, exclude: str, rng: random.Random) -> list[Pair]:
    candidates = [p for p in pool if p[0] != exclude]
    if len(candidates) < k:
        raise FvpatchError(f"{k}-shot prompts need {k} demonstrations but the pool holds only {len(candidates)} other pairs")
    return rng.sample(candidates, k)


def prompts_for(tpl: Template, queries: list[Pair], pool: list[Pair], k: int, shuffled: bool = False, seed: int = 0,
                shared: bool = False) -> list[Prompt]:
    """One prompt per query: k demos drawn from `pool` (never the query itself), labels deranged if `shuffled`.

    The demos depend only on (seed, query index), so k-shot and shuffled prompts of the same seed share
    their demo inputs and differ only in the labels. With `shared`, they depend on the seed alone: every
    query gets the same demos (unless it is one of them), a prefix that batched evaluation decodes once.
    """
    out = []
    for i, (x, y) in enumerate(queries):
        rng = random.Random(f"{seed}" if shared else f"{seed}:{i}")
        demos = sample_demos(pool, k, x, rng) if k else []
        if shuffled:
            demos = shuffle_labels(demos, rng)
        out.append(build(tpl, demos, x, y))
    return out


def answer_tokens(tokenize: Callable[[str], list[int]], text: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) as the model sees them when prompt and answer are tokenized together."""
    ids = tokenize(text)
    full = tokenize(text + answer)
    if full[: len(ids)] != ids or len(full) == len(ids):
        raise FvpatchError(
            f"the tokenizer merges the end of the prompt {text[-20:]!r} with the answer {answer!r}; "
            "use a template whose query ends at a token boundary (e.g. 'Q: {x}\\nA: {y}\\n\\n')"
        )
    return ids, full[len(ids) :]


def answer_token(tokenize: Callable[[str], list[int]], prompt: Prompt) -> int:
    """The first token of the answer as the model sees it when prompt and answer are tokenized together."""
    return answer_tokens(tokenize, prompt.text, prompt.answer)[1][0]
