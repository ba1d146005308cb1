"""The seed's two transfer experiments, measured instead of shown once.

Both save a tensor at the last token of a source prompt and write it over the last token of a target prompt,
one layer at a time, as the seed does by hand.

- `transfer_sweep`: one source and one target (the seed's `Egypt -> Cairo, ... Estonia ->` into `France ->`),
  with the tokens generated at each layer.
- `prepare_reversal` + `run_layers`: the seed's `1 2 3 to 3 2 1, 5 6 7 to 7 ` into `4 5 6 to 6 `, as a rate
  over generated lists. A target counts only if the unpatched model does not reverse it by itself. The
  vector comes from the seed's prompt itself (fixed) and from a prompt of the seed's shape on other lists
  (matched, one per target).

Greedy generation reproduces a continuation exactly iff, under teacher forcing, each of its tokens is the
argmax given the ones before it. So one packed decode (`Session.sequence_logits`) decides many generations
at once. `verify` replays some of them with `Session.run`: the two differ only at near-ties, which the batch
shape alone can flip (packed, a 4-bit model's logits move by up to about one logit: `Session.sequence_logits`;
on Gemma 3 270M a first token 0.16 logits ahead in `run` tied in the packed decode).
"""

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from fvpatch.errors import FvpatchError
from fvpatch.names import layer_of, layered
from fvpatch.prompts import answer_tokens
from fvpatch.session import Patch, Save, Session
from fvpatch.specs import is_index

DIGITS = tuple("0123456789")
SEED_DEMO, SEED_PARTIAL = tuple("123"), tuple("567")  # the seed's source: "1 2 3 to 3 2 1, 5 6 7 to 7 "


def check_layers(session: Session, tensor: str, layers: list[int]) -> list[str]:
    """The graph tensor names of `tensor` at `layers`, refused before any work if a layer is beyond the model."""
    if layer_of(tensor) is not None:
        raise FvpatchError(f"give the tensor's base name ({tensor.rsplit('-', 1)[0]!r}); the layers are chosen separately")
    if not layers:
        raise FvpatchError("no layers given")
    odd = [L for L in layers if not (is_index(L) and L >= 0)]  # -1 would name `l_out--1`, refused later as a tensor that never fires
    if odd:
        raise FvpatchError(f"layers are whole numbers from 0 to {session.n_layer - 1}, got {odd[0]!r}")
    names = [layered(tensor, L) for L in layers]
    for name in names:
        session.check_tensor_name(name)
    return names


# ---- the transfer sweep ------------------------------------------------------------------------


@dataclass
class Sweep:
    source: str
    target: str
    tensor: str
    unpatched: str  # the target's own continuation
    completions: dict[int, str]  # layer -> continuation with the source's row written over the target's last token


def transfer_sweep(session: Session, source: str, target: str, tensor: str = "l_out", layers: list[int] | None = None, max_tokens: int = 8) -> Sweep:
    """Save `tensor` at every layer at the source's last token (one forward), then generate from the target with
    each layer's row replacing the target's last token."""
    layers = list(range(session.n_layer)) if layers is None else list(layers)
    names = check_layers(session, tensor, layers)
    saved = session.run(source, saves=[Save(n, (-1,)) for n in names]).saved
    unpatched = session.run(target, max_tokens=max_tokens).text
    completions = {L: session.run(target, patches=[Patch(n, saved[n][0])], max_tokens=max_tokens).text for L, n in zip(layers, names)}
    return Sweep(source, target, tensor, unpatched, completions)


# ---- reversal prompts ----------------------------------------------------------------------------


def reversal_query(items: tuple[str, ...]) -> str:
    """`4 5 6 to 6 `: the list, then its reversal started with the last item, as the seed's target ends."""
    return f"{' '.join(items)} to {items[-1]} "


def reversal_answer(items: tuple[str, ...]) -> str:
    """What remains of the reversal after the query: `5 4` for `4 5 6`."""
    return " ".join(reversed(items[:-1]))


def reversal_source(demo: tuple[str, ...], partial: tuple[str, ...]) -> str:
    """The seed's source shape: one full demo, then a second list whose reversal has just begun."""
    return f"{' '.join(demo)} to {' '.join(reversed(demo))}, {reversal_query(partial)}"


def generate_lists(seed: int, lengths: tuple[int, ...], alphabet: tuple[str, ...] = DIGITS) -> Iterator[tuple[str, ...]]:
    """Distinct lists of distinct items in random order, endlessly (the caller stops); the same for the same seed."""
    check_lengths(lengths, alphabet)
    rng = random.Random(f"lists:{seed}")
    seen, possible = set(), sum(_n_lists(len(alphabet), k) for k in set(lengths))
    while len(seen) < possible:
        items = tuple(rng.sample(alphabet, rng.choice(lengths)))
        if items not in seen:
            seen.add(items)
            yield items


def check_lengths(lengths: tuple[int, ...], alphabet: tuple[str, ...] = DIGITS):
    if not lengths or min(lengths) < 2 or max(lengths) > len(alphabet):
        raise FvpatchError(f"list lengths must lie in 2..{len(alphabet)} (a reversal needs 2 items, items are distinct), got {list(lengths)}")


def _n_lists(n: int, k: int) -> int:
    out = 1
    for i in range(k):
        out *= n - i
    return out


def check_single_tokens(session: Session, alphabet: tuple[str, ...] = DIGITS):
    """Each item must be one token, so list positions and token positions line up (Qwen and Gemma split digits)."""
    long = [a for a in alphabet if len(session.tokenize(a, add_bos=False)) != 1]
    if long:
        raise FvpatchError(f"items {long} are not single tokens in {session.path.name}; the reversal lists need single-token items")


# ---- greedy continuations from one packed decode ------------------------------------------------


Item = tuple[list[int], list[int], list[Patch]]  # (prompt tokens, answer tokens, patches)


def teacher_forced_argmax(session: Session, items: list[Item], chunk: int = 64) -> list[np.ndarray]:
    """For each item, the argmax token after prompt + answer[:j] for every j. Chunked so that only `chunk`
    items' full-vocabulary logits are held at once."""
    out = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        out += [lg.argmax(axis=1) for lg in session.sequence_logits([(p, a[:-1], ps) for p, a, ps in part])]
    return out


# ---- the reversal experiment ---------------------------------------------------------------------


@dataclass
class Target:
    items: tuple[str, ...]
    prompt: list[int]
    answer: list[int]
    source: str  # this target's own source prompt (the "matched" source)
    source_answer: list[int]


@dataclass
class Reversal:
    tensor: str
    fixed_source: str
    examined: int  # candidate lists looked at, in order, to find the targets
    dropped: list[str]  # candidates the unpatched model already reverses
    targets: list[Target]
    unpatched_first: float  # share of targets whose first answer token the unpatched model gets right
    unpatched_first_each: list[str]  # the unpatched model's first token on each target
    unpatched_copy: dict[str, float]  # source kind -> share of targets whose unpatched first token is that source's next item (chance)
    sources_reverse: dict[str, float]  # share of source prompts the model itself continues with their reversal
    layers: dict[int, dict[str, dict]] = field(default_factory=dict)  # layer -> source kind -> rates and per-target outcome


def find_targets(session: Session, n: int, seed: int, lengths: tuple[int, ...], max_examined: int = 2000) -> tuple[list[Target], list[str], int]:
    """The first `n` generated lists that the unpatched model does not reverse, with those it does and how many
    lists were examined. Lists whose next reversed item equals the seed source's own (`6`) are skipped, as
    are the seed's lists: a right first token can then never be a copy of the source's answer."""
    if n < 1:
        raise FvpatchError(f"the number of target lists must be at least 1, got {n}")
    check_single_tokens(session)
    fixed_next = reversal_answer(SEED_PARTIAL).split()[0]
    kept, dropped, examined = [], [], 0
    lists = (x for x in generate_lists(seed, lengths) if x[-2] != fixed_next and x not in (SEED_DEMO, SEED_PARTIAL))
    while len(kept) < n:
        batch = [x for _, x in zip(range(32), lists)]
        if not batch or examined >= max_examined:
            raise FvpatchError(f"only {len(kept)} of {examined} generated lists are not reversed by the unpatched model; asked for {n}")
        cands = [_target(session, x, seed) for x in batch]
        argmax = teacher_forced_argmax(session, [(t.prompt, t.answer, []) for t in cands])
        for t, am in zip(cands, argmax):
            if len(kept) == n:
                break
            examined += 1
            if list(am) == t.answer:
                dropped.append(" ".join(t.items))
            else:
                kept.append(t)
    return kept, dropped, examined


def _target(session: Session, items: tuple[str, ...], seed: int) -> Target:
    """The target and its matched source: a demo and a partial list of the same length, other than the target,
    whose next reversed item differs from the target's."""
    rng = random.Random(f"source:{seed}:{' '.join(items)}")
    pick = lambda: tuple(rng.sample(DIGITS, len(items)))
    demo = partial = items
    while demo == items:
        demo = pick()
    while partial in (items, demo) or partial[-2] == items[-2]:
        partial = pick()
    prompt, answer = answer_tokens(session.tokenize, reversal_query(items), reversal_answer(items))
    source = reversal_source(demo, partial)
    src_answer = answer_tokens(session.tokenize, source, reversal_answer(partial))[1]
    return Target(items, prompt, answer, source, src_answer)


def prepare_reversal(session: Session, n: int = 40, seed: int = 0, lengths: tuple[int, ...] = (3, 4, 5), tensor: str = "l_out") -> Reversal:
    """The targets and the baselines, before any layer: what the unpatched model does on each target, and
    whether the model itself reverses on the source prompts the vectors come from."""
    targets, dropped, examined = find_targets(session, n, seed, lengths)
    fixed = reversal_source(SEED_DEMO, SEED_PARTIAL)
    unpatched = teacher_forced_argmax(session, [(t.prompt, t.answer, []) for t in targets])
    own = teacher_forced_argmax(session, [(session.tokenize(t.source), t.source_answer, []) for t in targets])
    fixed_tokens, fixed_answer = answer_tokens(session.tokenize, fixed, reversal_answer(SEED_PARTIAL))
    (fixed_own,) = teacher_forced_argmax(session, [(fixed_tokens, fixed_answer, [])])
    copy = lambda source_next: float(np.mean([am[0] == nxt for am, nxt in zip(unpatched, source_next)]))
    return Reversal(
        tensor, fixed, examined, dropped, targets,
        unpatched_first=float(np.mean([am[0] == t.answer[0] for t, am in zip(targets, unpatched)])),
        unpatched_first_each=[session.piece_text(am[0]) for am in unpatched],
        unpatched_copy={"fixed": copy([fixed_answer[0]] * len(targets)), "matched": copy([t.source_answer[0] for t in targets])},
        sources_reverse={"fixed": float(list(fixed_own) == fixed_answer),
                         "matched": float(np.mean([list(am) == t.source_answer for t, am in zip(targets, own)]))},
    )


def run_layers(session: Session, result: Reversal, layers: list[int], on_layer: Callable[[Reversal], None] | None = None):
    """Fill `result.layers` for each of `layers` not there yet (a resumed run keeps the rest): the rates at
    which writing the source's row over the target's last token makes greedy decoding produce the whole
    reversed remainder (`full`), its first item (`first`), or the source's own next item (`copy`), with the
    seed's fixed source and with each target's matched source. `on_layer` is called after each layer."""
    names = dict(zip(layers, check_layers(session, result.tensor, layers)))
    todo = [L for L in layers if L not in result.layers]
    if not todo:
        return
    saves = [Save(names[L], (-1,)) for L in todo]
    fixed_answer = answer_tokens(session.tokenize, result.fixed_source, reversal_answer(SEED_PARTIAL))[1]
    fixed_rows = session.run(result.fixed_source, saves=saves).saved
    matched_rows = [session.run(t.source, saves=saves).saved for t in result.targets]
    targets = result.targets
    for L in todo:
        name = names[L]
        kinds = {"fixed": [(fixed_rows[name][0], fixed_answer[0])] * len(targets),
                 "matched": [(rows[name][0], t.source_answer[0]) for rows, t in zip(matched_rows, targets)]}
        items = [(t.prompt, t.answer, [Patch(name, vec)]) for kind in kinds.values() for t, (vec, _) in zip(targets, kind)]
        argmax = teacher_forced_argmax(session, items)
        result.layers[L] = {
            kind: _rates(session, targets, argmax[k * len(targets) : (k + 1) * len(targets)], [nxt for _, nxt in pairs])
            for k, (kind, pairs) in enumerate(kinds.items())
        }
        if on_layer:
            on_layer(result)


def _rates(session: Session, targets: list[Target], argmax: list[np.ndarray], source_next: list[int]) -> dict:
    full = [int(list(am) == t.answer) for t, am in zip(targets, argmax)]
    first = [int(am[0] == t.answer[0]) for t, am in zip(targets, argmax)]
    copy = [int(am[0] == s) for am, s in zip(argmax, source_next)]
    return {"full": float(np.mean(full)), "first": float(np.mean(first)), "copy": float(np.mean(copy)),
            "full_each": full, "first_token_each": [session.piece_text(am[0]) for am in argmax]}


def verify(session: Session, result: Reversal, k: int, seed: int = 0) -> dict:
    """Replay `k` random (layer, source kind, target) cases, and `k` unpatched targets, with `Session.run`'s
    one-sequence greedy generation, and count those whose reported outcome (whole reversal or not, first
    token) the generation reproduces."""
    rng = random.Random(f"verify:{seed}")
    cases = [(L, kind, i) for L in sorted(result.layers) for kind in ("fixed", "matched") for i in range(len(result.targets))]
    cases = rng.sample(cases, min(k, len(cases))) + [(None, None, i) for i in rng.sample(range(len(result.targets)), min(k, len(result.targets)))]
    disagree = []
    for L, kind, i in cases:
        t = result.targets[i]
        if L is None:
            patches, full, first = [], 0, result.unpatched_first_each[i]
        else:
            name = layered(result.tensor, L)
            source = result.fixed_source if kind == "fixed" else t.source
            patches = [Patch(name, session.run(source, saves=[Save(name, (-1,))]).saved[name][0])]
            full, first = result.layers[L][kind]["full_each"][i], result.layers[L][kind]["first_token_each"][i]
        generated = session.run(t.prompt, patches=patches, max_tokens=len(t.answer)).generated
        if (generated == t.answer) != bool(full) or session.piece_text(generated[0]) != first:
            disagree.append({"layer": L, "source": kind, "list": " ".join(t.items), "generated": session.detokenize(generated),
                             "reported": {"full": full, "first": first}})
    return {"cases": len(cases), "agree": len(cases) - len(disagree), "disagree": disagree}
