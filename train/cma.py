"""Function vectors by causal mediation analysis (Todd et al. 2023, "Function Vectors in Large Language Models").

1. Mean output of every attention head at the last token over N clean k-shot prompts.
2. Average indirect effect (AIE) of a head: the gain in probability of the answer's first token when
   that head's mean output replaces its output at the last token of shuffled-label k-shot prompts.
3. The function vector: the top heads' means through their slices of o_proj, summed. It is added to
   the residual stream (block output) at the last token at one layer; the layer and the number of
   heads are chosen together by zero-shot + FV accuracy on the valid split.

Gemma 2/3 put an RMSNorm after attention ("sandwich" norm): what a head adds to the residual is its o_proj
slice divided by the RMS of the whole attention output, times the norm's weight. On Gemma 3 270M that
scales it up ~140x, so the o_proj slice alone is far too small to do anything. The function vector
therefore takes each head's slice through that norm linearized at the clean prompts' mean RMS: the
heads' shares then sum to what the attention block adds to the residual stream. Models without a
post-attention norm (Llama) get the plain o_proj slices.

Only the last token is patched, so the batched head map decodes each corrupted prompt's prefix once
and then runs its last token for every head at once against that cached prefix: one row per head,
two forwards per prompt instead of one forward per head and prompt. `head_effects_unbatched` is the
plain definition, one head per forward, kept to check the batched one (tests, bench/cma_speed.py).
"""

import copy
import json
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from fvpatch.errors import FvpatchError
from fvpatch.evaluate import Predict, build_items, sweep
from fvpatch.prompts import Template, answer_token, prompts_for
from fvpatch.tasks import Task
from fvpatch.vectorfile import VectorFile
from train.evaluate import last_logits, unembed
from train.hooks import decoder_layers, head_to_residual, patch_heads, record_heads
from train.model import LoadedModel

# Numbers of top heads tried when none is given. Measured on Gemma 3 270M (valid split, 6 core tasks):
# the best count ranges from 1 (capitalize, country-capital) to 10 (present-past) and 20 (singular-plural),
# and accuracy is far from monotonic in it, so it is chosen per task with the layer (results/fv/).
HEAD_COUNTS = (1, 2, 3, 5, 10, 20)


@dataclass
class HeadMap:
    aie: torch.Tensor  # (n_layer, n_head): mean gain in P(answer's first token) over the corrupted prompts
    mean_heads: torch.Tensor  # (n_layer, n_head, head_dim): mean head output at the last token of the clean prompts
    attn_rms: torch.Tensor  # (n_layer,): mean RMS of the attention output (after o_proj) at the last token of the clean prompts
    base_prob: float  # mean P(answer's first token) on the corrupted prompts, unpatched

    def top(self, k: int) -> list[tuple[int, int]]:
        order = torch.argsort(self.aie.flatten(), descending=True, stable=True)[:k]
        return [divmod(int(i), self.aie.shape[1]) for i in order]


def cma_prompts(lm: LoadedModel, task: Task, tpl: Template, n: int, k: int, seed: int = 0):
    """N clean k-shot prompts and their shuffled-label twins (same demo inputs), with answer tokens, from the train split."""
    queries = task.train[:n]
    if len(queries) < n:
        raise FvpatchError(f"task {task.name!r} has {len(task.train)} train pairs, fewer than the {n} prompts asked for")
    clean = prompts_for(tpl, queries, task.train, k, seed=seed)
    corrupted = prompts_for(tpl, queries, task.train, k, shuffled=True, seed=seed)
    answers = [answer_token(lm.tokenize, p) for p in clean]
    return [lm.tokenize(p.text) for p in clean], [lm.tokenize(p.text) for p in corrupted], answers


@torch.no_grad()
def mean_head_outputs(lm: LoadedModel, token_lists: list[list[int]], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean head outputs (n_layer, n_head, head_dim), mean RMS of the attention output (n_layer,)) at the last token."""
    layers = decoder_layers(lm.model)
    total = torch.zeros(lm.n_layer, lm.n_head, lm.head_dim, device=lm.device)
    rms = torch.zeros(lm.n_layer, device=lm.device)
    for i in tqdm(range(0, len(token_lists), batch_size), desc="mean heads", leave=False):
        ids, mask, last = lm.batch(token_lists[i : i + batch_size])
        with record_heads(lm.model, range(lm.n_layer)) as heads:
            lm.model.model(input_ids=ids, attention_mask=mask)
        rows = torch.arange(len(last), device=lm.device)
        for L, layer in enumerate(layers):
            h = heads[L][rows, last]
            total[L] += h.float().sum(0)
            rms[L] += layer.self_attn.o_proj(h.flatten(-2)).float().pow(2).mean(-1).sqrt().sum()
    return total / len(token_lists), rms / len(token_lists)


def _patched_prob(lm: LoadedModel, run, rows: list[tuple[int, int] | None], mean_heads: torch.Tensor, answer: int, position) -> torch.Tensor:
    """P(answer) for each row of one forward; row r patches head rows[r] = (layer, head) with its mean, or nothing (None)."""
    b = len(rows)
    with ExitStack() as stack:
        for L in sorted({r[0] for r in rows if r is not None}):
            mask = torch.zeros(b, lm.n_head, dtype=torch.bool, device=lm.device)
            for i, r in enumerate(rows):
                if r is not None and r[0] == L:
                    mask[i, r[1]] = True
            stack.enter_context(patch_heads(lm.model, L, position, mean_heads[L].expand(b, -1, -1), mask))
        return torch.softmax(run(b).float(), -1)[:, answer]


@torch.no_grad()
def head_effects(lm: LoadedModel, token_lists: list[list[int]], answers: list[int], mean_heads: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(answer) with each head patched (n_prompt, n_layer, n_head), unpatched P(answer) (n_prompt,)), batched."""
    heads = [(L, h) for L in range(lm.n_layer) for h in range(lm.n_head)]
    rows_all: list[tuple[int, int] | None] = [None, *heads]
    patched = torch.empty(len(token_lists), lm.n_layer, lm.n_head)
    base = torch.empty(len(token_lists))
    for p, (tokens, answer) in enumerate(tqdm(list(zip(token_lists, answers)), desc="head effects", leave=False)):
        prefix = lm.model.model(input_ids=torch.tensor([tokens[:-1]], device=lm.device), use_cache=True).cache
        last = torch.tensor([[tokens[-1]]], device=lm.device)
        probs = []
        for i in range(0, len(rows_all), batch_size):
            rows = rows_all[i : i + batch_size]

            def run(b):
                cache = copy.deepcopy(prefix)  # the forward appends to the cache it is given
                cache.batch_repeat_interleave(b)
                return unembed(lm, lm.model.model(input_ids=last.expand(b, 1), cache=cache, use_cache=True).last_hidden_state[:, -1])

            probs.append(_patched_prob(lm, run, rows, mean_heads, answer, 0))
        probs = torch.cat(probs).cpu()
        base[p] = probs[0]
        patched[p] = probs[1:].view(lm.n_layer, lm.n_head)
    return patched, base


@torch.no_grad()
def head_effects_unbatched(lm: LoadedModel, token_lists: list[list[int]], answers: list[int], mean_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one full forward per (prompt, head): what `head_effects` must reproduce."""
    patched = torch.empty(len(token_lists), lm.n_layer, lm.n_head)
    base = torch.empty(len(token_lists))
    for p, (tokens, answer) in enumerate(tqdm(list(zip(token_lists, answers)), desc="head effects (unbatched)", leave=False)):
        ids, mask, last = lm.batch([tokens])
        base[p] = torch.softmax(last_logits(lm, ids, mask, last).float(), -1)[0, answer]
        for L in range(lm.n_layer):
            for h in range(lm.n_head):
                patched[p, L, h] = _patched_prob(lm, lambda b: last_logits(lm, ids, mask, last), [(L, h)], mean_heads, answer, last)[0]
    return patched, base


def head_map(lm: LoadedModel, clean: list[list[int]], corrupted: list[list[int]], answers: list[int], batch_size: int = 128) -> HeadMap:
    mean_heads, attn_rms = mean_head_outputs(lm, clean)
    patched, base = head_effects(lm, corrupted, answers, mean_heads, batch_size)
    return HeadMap((patched - base[:, None, None]).mean(0), mean_heads, attn_rms, float(base.mean()))


def post_attention_norm(lm: LoadedModel, layer: int):
    """The norm applied to the attention output before the residual add (Gemma 2/3), or None (Llama).

    Llama's `post_attention_layernorm` is the norm in front of the MLP; only a block that also has a
    `pre_feedforward_layernorm` uses it on the attention output."""
    block = decoder_layers(lm.model)[layer]
    return block.post_attention_layernorm if hasattr(block, "pre_feedforward_layernorm") else None


@torch.no_grad()
def function_vector(lm: LoadedModel, hm: HeadMap, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Sum of the heads' mean outputs as they reach the residual stream (see the module docstring)."""
    total = torch.zeros(lm.n_embd, device=lm.device)
    for L, h in heads:
        share = head_to_residual(lm.model, L, h, hm.mean_heads[L, h]).float()  # the norm below then runs in float32 too
        norm = post_attention_norm(lm, L)
        if norm is not None:
            # norm(x) * sqrt(mean(x^2) + eps) is x times the norm's weight: the norm with the share's own RMS undone
            share = norm(share) * share.pow(2).mean().add(norm.eps).sqrt() / hm.attn_rms[L]
        total += share
    return total


def fv_file(lm: LoadedModel, vector: torch.Tensor, layer: int, meta: dict[str, str]) -> VectorFile:
    return VectorFile(f"l_out-{layer}", vector.detach().cpu().float().numpy(), [-1], lm.fingerprint, mode="add", meta=meta)


def train_fv(lm: LoadedModel, task: Task, tpl: Template, predict: Predict, k: int = 10, n_prompts: int = 25, n_heads: int | None = None,
             layer: int | None = None, n_valid: int = 50, seed: int = 0) -> tuple[VectorFile, HeadMap, dict[int, dict[int, float]]]:
    """The task's function vector as a vector file, its head map, and the valid-split grid {n_heads: {layer: accuracy}}.

    The number of heads (from HEAD_COUNTS) and the layer that are not given are chosen together by
    zero-shot + FV accuracy on the valid split; ties go to fewer heads, then the earlier layer."""
    clean, corrupted, answers = cma_prompts(lm, task, tpl, n_prompts, k, seed)
    hm = head_map(lm, clean, corrupted, answers)
    counts = [n_heads] if n_heads else HEAD_COUNTS
    layers = [layer] if layer is not None else range(lm.n_layer)
    grid: dict[int, dict[int, float]] = {}
    if len(counts) * len(layers) > 1:
        items = build_items(lm.tokenize, tpl, task.valid[:n_valid], task.train, k, seed)
        for n in counts:
            base = fv_file(lm, function_vector(lm, hm, hm.top(n)), 0, {})
            grid[n] = sweep(predict, items, {L: replace(base, tensor=f"l_out-{L}") for L in layers})
        n_heads, layer = max(((n, L) for n in grid for L in grid[n]), key=lambda nl: (grid[nl[0]][nl[1]], -nl[0], -nl[1]))
    heads = hm.top(n_heads)
    meta = {
        "fvpatch.method": "function-vector (Todd et al. 2023)",
        "fvpatch.task": task.name,
        "fvpatch.dataset": task.source,
        "fvpatch.template": tpl.text,
        "fvpatch.k": str(k),
        "fvpatch.n_prompts": str(n_prompts),
        "fvpatch.heads": json.dumps([[L, h] for L, h in heads]),
        "fvpatch.head_aie": json.dumps([round(float(hm.aie[L, h]), 5) for L, h in heads]),
        "fvpatch.seed": str(seed),
        "fvpatch.train_dtype": str(lm.dtype).removeprefix("torch."),
    }
    if grid:
        meta["fvpatch.valid_sweep"] = json.dumps({str(n): {str(L): round(a, 4) for L, a in acc.items()} for n, acc in grid.items()})
    return fv_file(lm, function_vector(lm, hm, heads), layer, meta), hm, grid
