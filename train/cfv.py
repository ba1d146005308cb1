"""The PyTorch side of composite function vectors: bank scores in one batched forward, and the fit of the
map that turns them into weights (fvpatch/cfvmap.py; fvpatch/analogy.py applies it in llama.cpp).

Scores: row r of a batch holds the source pair's zero-shot prompt and answer with bank vector r added at
the prompt's last token, so the k scores of a pair are one forward (and many pairs share it).

The map: w = softmax(W (s - mean s) + b), W (k, k), b (k,). It starts at the unlearned map I / T, T being
the temperature of softmax(s / T) that gives the training analogies' answers the highest log-probability,
and Adam fits it on the training analogies with an L2 penalty that pulls it back to that start. Objective
`answer`: the mean per-token log P(D | `Q: C\\nA:`, CFV), through the frozen model; `relation`: the
cross-entropy of the weights against the analogy's relation, from the scores alone. Full batches and no
sampling: the same data and seed give the same map.
"""

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from fvpatch.analogy import QA
from fvpatch.analogyfile import Analogy
from fvpatch.cfvmap import CFVMap
from fvpatch.errors import FvpatchError
from fvpatch.bank import Bank
from fvpatch.tasks import Pair
from train.ffv import answer_nll, encode
from train.model import LoadedModel

OBJECTIVES = ("answer", "relation")
TEMPERATURES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)


@torch.no_grad()
def bank_scores(lm: LoadedModel, bank: Bank, pairs: list[Pair], pairs_per_batch: int = 8, progress: bool = False) -> np.ndarray:
    """s[n, i] = log P(B_n | `Q: A_n\\nA:`, bank vector i at the last token), summed over B's tokens: (n, k)."""
    k = len(bank)
    vectors = torch.from_numpy(bank.vectors).to(lm.device)
    out = []
    for start in tqdm(range(0, len(pairs), pairs_per_batch), desc="bank scores", disable=not progress, leave=False):
        chunk = pairs[start : start + pairs_per_batch]
        ex = encode(lm, QA, [p for p in chunk for _ in range(k)])
        nll = answer_nll(lm, ex, vectors.repeat(len(chunk), 1), bank.layer) * ex.n_answer
        out.append(-nll.view(len(chunk), k).double().cpu().numpy())
    return np.concatenate(out)


def map_logits(weight: torch.Tensor, bias: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The logits of CFVMap.learned in torch, differentiable in weight and bias."""
    return (scores - scores.mean(-1, keepdim=True)) @ weight.T + bias


@dataclass
class FitConfig:
    objective: str = "relation"
    l2: float = 0.01  # times ||W - I/T||^2 + ||b||^2
    lr: float = 0.02
    steps: int = 100
    batch: int = 64  # analogies a step for the answer objective, each forward being through the model
    seed: int = 0


def _answer_logprob(lm: LoadedModel, bank: Bank, ex, weights: torch.Tensor) -> torch.Tensor:
    # the map (k x k, float64) is fit on the CPU whatever the model's device; its weights go where the model is
    cfv = weights.float().to(lm.device) @ torch.from_numpy(bank.vectors).to(lm.device)
    return -answer_nll(lm, ex, cfv, bank.layer)


def _batches(lm: LoadedModel, analogies: list[Analogy], size: int, gen: torch.Generator) -> list[tuple[torch.Tensor, object]]:
    """(rows, encoded `Q: C\\nA:` + D) of fixed minibatches over a seeded shuffle of the analogies."""
    order = torch.randperm(len(analogies), generator=gen)
    return [(rows, encode(lm, QA, [(analogies[i].c, analogies[i].d) for i in rows])) for rows in order.split(size)]


@torch.no_grad()
def choose_temperature(lm: LoadedModel, bank: Bank, scores: np.ndarray, batches, grid=TEMPERATURES) -> tuple[float, dict[float, float]]:
    """The T of the unlearned softmax(s / T) whose CFV gives the training answers the highest mean log P."""
    s = torch.from_numpy(scores)
    n = sum(len(rows) for rows, _ in batches)
    curve = {t: sum(float(_answer_logprob(lm, bank, ex, torch.softmax(s[rows] / t, -1)).sum()) for rows, ex in batches) / n for t in grid}
    return max(curve, key=curve.get), curve


def relation_temperature(bank: Bank, scores: np.ndarray, relations: list[str], grid=TEMPERATURES) -> tuple[float, dict[float, float]]:
    """The T of softmax(s / T) that gives each pair's own relation the highest mean log-weight: from the scores alone."""
    s, own = torch.from_numpy(scores), torch.tensor([bank.names.index(r) for r in relations])
    curve = {t: float(torch.log_softmax(s / t, -1)[torch.arange(len(own)), own].mean()) for t in grid}
    return max(curve, key=curve.get), curve


def fit_map(lm: LoadedModel | None, bank: Bank, analogies: list[Analogy], scores: np.ndarray, cfg: FitConfig, progress: bool = True) -> tuple[CFVMap, dict]:
    """Choose the unlearned temperature, then fit W and b from I / T on the training analogies. Without a model
    (`lm` None: the scores came from llama.cpp) only the relation objective can be fit, and T is chosen on the
    relation's log-weight instead of the answers' log-probability."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if len(analogies) != len(scores):
        raise ValueError(f"{len(analogies)} analogies but {len(scores)} rows of scores")
    if lm is None and cfg.objective != "relation":
        raise ValueError("the answer objective runs the model: pass the loaded model")
    if lm is None:
        temperature, curve = relation_temperature(bank, scores, [x.relation for x in analogies])
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        batches = _batches(lm, analogies, cfg.batch, gen)
        temperature, curve = choose_temperature(lm, bank, scores, batches)
    s = torch.from_numpy(scores)
    k = len(bank)
    w0 = torch.eye(k, dtype=torch.float64) / temperature
    weight, bias = w0.clone().requires_grad_(True), torch.zeros(k, dtype=torch.float64, requires_grad=True)
    if cfg.objective == "relation":
        unknown = {x.relation for x in analogies} - set(bank.names)
        if unknown:
            raise ValueError(f"the relation objective needs analogies of the bank's relations; these are not in the bank: {sorted(unknown)}")
        labels = torch.tensor([bank.names.index(x.relation) for x in analogies])
    opt = torch.optim.Adam([weight, bias], lr=cfg.lr)
    losses = []
    for step in tqdm(range(cfg.steps), desc=f"cfv map ({cfg.objective})", disable=not progress, leave=False):
        logits = map_logits(weight, bias, s)
        if cfg.objective == "answer":
            rows, ex = batches[step % len(batches)]
            loss = -_answer_logprob(lm, bank, ex, torch.softmax(logits[rows], -1)).mean()
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        losses.append(loss.item())
        loss = loss + cfg.l2 * ((weight - w0).pow(2).sum() + bias.pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not (np.isfinite(losses).all() and torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise FvpatchError(f"the map diverged (lr {cfg.lr:g}): its loss or weights are not finite; give a smaller --lr")
    meta = {"fvpatch.cfv.config": json.dumps(asdict(cfg)), "fvpatch.cfv.n_train": str(len(analogies)),
            "fvpatch.cfv.temperature_curve": json.dumps(curve), "fvpatch.cfv.final_loss": f"{losses[-1]:.4f}" if losses else ""}
    cfv_map = CFVMap(weight.detach().numpy(), bias.detach().numpy(), temperature, meta)
    return cfv_map, {"temperature_curve": curve, "loss": losses}
