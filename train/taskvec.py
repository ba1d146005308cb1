"""Task vectors (Hendel et al. 2023, "In-Context Learning Creates Task Vectors").

The residual stream (block output) at layer L at the last token of k demonstrations followed by a
dummy query, averaged over several demo sets, replaces the residual at the last token of a zero-shot
query. L is chosen by a sweep on the valid split.
"""

import json
from dataclasses import replace

import torch
from tqdm import tqdm

from fvpatch.errors import FvpatchError
from fvpatch.evaluate import Predict, build_items, sweep
from fvpatch.prompts import Template, prompts_for
from fvpatch.tasks import Task
from fvpatch.vectorfile import VectorFile
from train.hooks import record_residual
from train.model import LoadedModel


@torch.no_grad()
def task_vectors(lm: LoadedModel, task: Task, tpl: Template, k: int = 10, n_sets: int = 25, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """(n_layer, d): the mean residual at the last token of `n_sets` demos-plus-dummy-query prompts, at every layer."""
    queries = task.train[-n_sets:]  # the dummy queries; their answers are never shown
    if len(queries) < n_sets:
        raise FvpatchError(f"task {task.name!r} has {len(task.train)} train pairs, fewer than the {n_sets} demo sets asked for")
    tokens = [lm.tokenize(p.text) for p in prompts_for(tpl, queries, task.train, k, seed=seed)]
    layers = list(range(lm.n_layer))
    total = torch.zeros(lm.n_layer, lm.n_embd, device=lm.device)
    for i in tqdm(range(0, len(tokens), batch_size), desc="task vectors", leave=False):
        ids, mask, last = lm.batch(tokens[i : i + batch_size])
        with record_residual(lm.model, layers) as res:
            lm.model.model(input_ids=ids, attention_mask=mask)
        rows = torch.arange(len(last), device=lm.device)
        total += torch.stack([res[L][rows, last].float().sum(0) for L in layers])
    return total / len(tokens)


def train_taskvec(lm: LoadedModel, task: Task, tpl: Template, predict: Predict, k: int = 10, n_sets: int = 25,
                  layer: int | None = None, n_valid: int = 50, seed: int = 0) -> tuple[VectorFile, dict[int, float]]:
    """The task vector at `layer` (or the best layer on the valid split) as a vector file, and the sweep."""
    vectors = task_vectors(lm, task, tpl, k, n_sets, seed).cpu().numpy()
    meta = {
        "fvpatch.method": "task-vector (Hendel et al. 2023)",
        "fvpatch.task": task.name,
        "fvpatch.dataset": task.source,
        "fvpatch.template": tpl.text,
        "fvpatch.k": str(k),
        "fvpatch.n_prompts": str(n_sets),
        "fvpatch.seed": str(seed),
        "fvpatch.train_dtype": str(lm.dtype).removeprefix("torch."),
    }
    files = {L: VectorFile(f"l_out-{L}", vectors[L], [-1], lm.fingerprint, mode="replace", meta=meta) for L in range(lm.n_layer)}
    acc: dict[int, float] = {}
    if layer is None:
        items = build_items(lm.tokenize, tpl, task.valid[:n_valid], task.train, k, seed)
        acc = sweep(predict, items, files)
        layer = max(acc, key=lambda L: (acc[L], -L))  # ties go to the earlier layer
        meta["fvpatch.valid_sweep"] = json.dumps({str(L): round(a, 4) for L, a in acc.items()})
    return replace(files[layer]), acc
