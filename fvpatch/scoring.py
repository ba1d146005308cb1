"""Many prompts scored in few decodes: items packed as separate sequences of one batch, or a shared prefix
decoded once and its KV cache copied to each prompt's sequence.

A mixin of `Session`: it drives the session's own decode (`_decode`), which runs the save/patch callback,
so a packed sequence is patched exactly where a one-prompt `run` would patch it. Also the two functions of logits
that every scorer and sampler shares: `log_softmax` and `sample`.
"""

from __future__ import annotations

import llama_cpp as ll
import numpy as np

from fvpatch.errors import FvpatchError
from fvpatch.exclusive import exclusive
from fvpatch.names import layer_of
from fvpatch.specs import Patch, check_overlaps


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64: a vocabulary of 262k makes float32's sum lose digits."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class BatchedScoring:
    def answer_logprobs(self, items: list[tuple[list[int], list[int], list[Patch]]]) -> list[np.ndarray]:
        """log p(answer[j] | prompt, answer[:j]) for each (prompt tokens, answer tokens, patches) item, packed as
        `sequence_logits` packs them."""
        if any(not answer for _, answer, _ in items):
            raise ValueError("every item needs answer tokens to score")
        items = [(p, self.check_tokens(a, f"answer of item {i}"), ps) for i, (p, a, ps) in enumerate(items)]
        out = []
        for (_, answer, _), logits in zip(items, self.sequence_logits([(p, a[:-1], ps) for p, a, ps in items])):
            out.append(log_softmax(logits)[np.arange(len(logits)), list(answer)])
        return out

    @exclusive
    def sequence_logits(self, items: list[tuple[list[int], list[int], list[Patch]]]) -> list[np.ndarray]:
        """Logits (1 + len(fed), n_vocab) at the last prompt token and at each token fed after it, for each
        (prompt tokens, tokens fed after the prompt, patches) item.

        Items are packed as separate sequences into as few decodes as fit one ubatch, so scoring a whole bank
        of vectors on one prompt, or a whole test set, costs a few forwards. Patch tokens are prompt positions
        (negative: from the end of the prompt); a patch with generated=True also applies at every token fed
        after the prompt, as generation applies it. Packed, a sequence's activations go through llama.cpp's
        quantized matmuls in other batch shapes than in `run`, so on a 4-bit model its logits differ from a
        one-at-a-time run by up to about one logit (measured on Gemma 3 270M and Qwen2.5 1.5B Q4_K_M):
        near-ties can flip.
        """
        items = [(self.check_tokens(p, f"prompt of item {i}"), self.check_tokens(f, f"tokens fed in item {i}"), ps)
                 for i, (p, f, ps) in enumerate(items)]
        packs: list[list[int]] = []
        size = 0
        for i, (prompt, fed, _) in enumerate(items):
            length = len(prompt) + len(fed)
            if not prompt:
                raise FvpatchError(f"item {i}: the prompt has no tokens")
            if length > min(self.n_ubatch, self.n_ctx):
                raise FvpatchError(f"item {i}: {length} tokens do not fit one batch of {min(self.n_ubatch, self.n_ctx)} (n_ubatch, at most n_ctx)")
            if not packs or size + length > self.n_ubatch or len(packs[-1]) == self.n_seq:
                packs.append([])
                size = 0
            packs[-1].append(i)
            size += length
        out: list[np.ndarray] = [None] * len(items)
        for pack in packs:
            entries, plan, rows, acted = [], {}, {}, set()
            for seq, i in enumerate(pack):
                prompt, fed, patches = items[i]
                tokens = list(prompt) + list(fed)
                base = len(entries)
                entries += [(tok, pos, seq) for pos, tok in enumerate(tokens)]
                placed = []
                for p in patches:
                    self.check_tensor_name(p.tensor)
                    at = self.patch_positions(p, len(prompt), range(len(prompt) - 1, len(tokens)))
                    at += list(range(len(prompt), len(tokens))) if p.generated or p.all_tokens else []
                    placed += [(p, pos) for pos in at]
                    for pos in at:
                        plan.setdefault(p.tensor.encode(), []).append(("patch", p, base + pos, pos))
                    if layer_of(p.tensor) in (None, self.n_layer - 1):  # llama.cpp keeps only output rows past the last block
                        acted |= {base + pos for pos in at}
                check_overlaps(placed)  # as run refuses them: the later write would undo the earlier
                rows[i] = range(base + len(prompt) - 1, base + len(tokens))
            if plan:
                self.check_hooks("patches need")
            self._watch, self._seen = set(plan), set()
            ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
            self._decode(entries, {bi for r in rows.values() for bi in r} | acted, plan)
            for i in pack:
                out[i] = np.stack([self.row_logits(bi) for bi in rows[i]])
        return out

    @exclusive
    def last_logits(self, prompts: list[list[int]], patches: list[Patch] = ()) -> list[np.ndarray]:
        """The logits after each prompt, the same patches on each, batched for evaluation.

        The prompts' common prefix (the shared demonstrations of a k-shot set, or just BOS) is decoded once in
        sequence 0, and its KV cache is copied to each prompt's own sequence (`llama_memory_seq_cp`), so only
        the rests are decoded, packed as sequences into as few decodes as fit a batch. The prefix stops before
        any position a patch aims at, so a patch at a prompt's last token still sees that prompt's own pass.
        Batched, the rows go through llama.cpp's quantized kernels in other groupings than one prompt at a time,
        so a logit can differ by up to about one on a 4-bit model (README, "Batched evaluation"); near-ties flip.
        """
        if not prompts or any(not p for p in prompts):
            raise FvpatchError("every prompt needs at least one token")
        prompts = [self.check_tokens(p, f"prompt {i}") for i, p in enumerate(prompts)]
        if (longest := max(map(len, prompts))) > self.n_ctx:
            raise FvpatchError(f"a prompt of {longest} tokens does not fit the context of {self.n_ctx}; raise --n-ctx")
        if patches:
            self.check_hooks("patches need")
        for p in patches:
            self.check_tensor_name(p.tensor)
        for n in {len(q) for q in prompts}:  # the positions patches land on depend on the prompt's length only
            check_overlaps([(p, pos) for p in patches for pos in self.patch_positions(p, n, range(n))])
        shared = min(len(p) for p in prompts) - 1  # every prompt keeps at least its last token to decode
        for p in prompts[1:]:
            shared = next((i for i in range(shared) if p[i] != prompts[0][i]), shared)
        for p in patches:
            if not p.all_tokens:
                shared = min([shared, *(self.resolve_position(p.token, len(q)) for q in prompts)])
        if len(prompts) == 1 or shared < 1 or self.n_seq < 2:  # the prefix needs a sequence of its own
            return [logits[-1] for logits in self.sequence_logits([(p, [], patches) for p in prompts])]
        mem = ll.llama_get_memory(self._ctx)
        ll.llama_memory_clear(mem, True)
        last_block = self.n_layer - 1
        everywhere = [p for p in patches if p.all_tokens and layer_of(p.tensor) != last_block]  # the last block keeps output rows only
        for start in range(0, shared, self.n_ubatch):
            end = min(start + self.n_ubatch, shared)
            plan: dict[bytes, list] = {}
            for p in everywhere:
                plan.setdefault(p.tensor.encode(), []).extend(("patch", p, pos - start, pos) for pos in range(start, end))
            self._watch, self._seen = set(plan), set()
            self._decode([(prompts[0][i], i, 0) for i in range(start, end)], set(), plan)
        out: list[np.ndarray] = [None] * len(prompts)
        room = min(self.n_ubatch, self.n_ctx - shared)  # copies of the prefix share its cells; the rests need their own
        pack: list[int] = []
        size = 0
        for i, prompt in enumerate(prompts):
            rest = len(prompt) - shared
            if rest > room:
                raise FvpatchError(f"prompt {i}: its {rest} tokens after the shared prefix do not fit one batch of {room}; raise --n-ctx")
            if pack and (size + rest > room or len(pack) == self.n_seq - 1):
                self._decode_rests(prompts, pack, shared, patches, out)
                pack, size = [], 0
            pack.append(i)
            size += rest
        self._decode_rests(prompts, pack, shared, patches, out)
        return out

    def _decode_rests(self, prompts: list[list[int]], pack: list[int], shared: int, patches: list[Patch], out: list):
        """One decode of the rests of `pack`'s prompts, each in its own sequence holding a copy of the prefix."""
        mem = ll.llama_get_memory(self._ctx)
        entries, plan, last, acted = [], {}, {}, set()
        for seq, i in enumerate(pack, start=1):
            ll.llama_memory_seq_cp(mem, 0, seq, -1, -1)
            base = len(entries)
            entries += [(prompts[i][pos], pos, seq) for pos in range(shared, len(prompts[i]))]
            last[i] = len(entries) - 1
            for p in patches:
                at = self.patch_positions(p, len(prompts[i]), [len(prompts[i]) - 1])
                plan.setdefault(p.tensor.encode(), []).extend(("patch", p, base + pos - shared, pos) for pos in at if pos >= shared)
                if layer_of(p.tensor) in (None, self.n_layer - 1):  # llama.cpp keeps only output rows past the last block
                    acted |= {base + pos - shared for pos in at if pos >= shared}
        self._watch, self._seen = set(plan), set()
        self._decode(entries, set(last.values()) | acted, plan)
        for i, bi in last.items():
            out[i] = self.row_logits(bi)
        for seq in range(1, len(pack) + 1):
            ll.llama_memory_seq_rm(mem, seq, -1, -1)


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator, top_p: float = 1.0) -> int:
    """Greedy at temperature 0, else a draw from the softmax at that temperature, cut to its `top_p` nucleus:
    the likeliest tokens whose probabilities first reach `top_p` in all."""
    if temperature <= 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore", under="ignore"):  # float64: a tiny temperature must not turn to a float32 zero
        p = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
    p /= p.sum()
    if top_p >= 1:
        return int(rng.choice(len(p), p=p))
    # the nucleus is usually a few tokens: sort a shortlist, longer ones only when it falls short (a flat
    # distribution over 262k tokens took 28 ms a token with the whole vocabulary sorted at once)
    for k in (64, 4096, len(p)):
        best = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
        best = best[np.argsort(-p[best], kind="stable")]
        cum = np.cumsum(p[best])
        if cum[-1] >= top_p or k == len(p):
            keep = best[: int(np.searchsorted(cum, top_p)) + 1]
            return int(keep[rng.choice(len(keep), p=p[keep] / p[keep].sum())])
