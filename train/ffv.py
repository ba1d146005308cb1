"""Fine-tuned function vectors (FFV): one d_model vector learned from ~20 input/output pairs.

The vector is added to the residual stream after block L at the last token of zero-shot prompts
(`Q: x\\nA:`), the token that predicts the answer; with `every_answer_token` also at every answer token
before the last, as the runtime applies it with `--every-token`; with `positions="all"` at every token of
prompt and answer, as llama.cpp applies a control vector (`fvpatch export`). The model stays frozen. The loss is
the mean NLL of all tokens of the answer word (per pair, then over pairs), or with `targets="icl"` the
cross-entropy against what 10-shot ICL predicts at each of them, plus an optional L2 penalty on the vector
or on its distance from the initial vector. Adam with cosine decay, the whole training
set in every step, early stopping on the valid pairs' loss: the vector kept is the best one on valid.

The learning rate is relative: Adam moves each coordinate by about lr per step, so it is multiplied by
the RMS coordinate of the residual stream at layer L (Gemma's grows ~300x from the first block to the
last), which lets one default serve every layer and every model.
"""

import copy
import json
import math
import random
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from fvpatch.errors import FvpatchError, OutOfRange
from fvpatch.prompts import Template, answer_tokens, build, sample_demos
from fvpatch.tasks import Pair, Task
from fvpatch.vectorfile import VectorFile
from train.evaluate import unembed
from train.hooks import patch_residual, record_residual
from train.model import LoadedModel

INITS = ("fv", "taskvec", "random", "zeros")
TARGETS = ("answer", "icl")
ICL_SETS = 5  # demo sets averaged per training pair for `targets="icl"`
POSITIONS = ("last", "all")  # the vector at the last prompt token, or at every token (a control vector)

# The FFV layer chosen on each model's valid pairs (`python -m train.sweep_ffv --model NAME`), by the model's
# name (general.name, the same in every quantization of it): results/ffv/sweep.md for the default model,
# results/qwen2.5-coder-1.5b/ffv_sweep.md (mean valid top-1 of 4, 8, 12, 16 over two tasks) for Qwen.
MEASURED_LAYERS = {"Gemma 3 270m": 4, "Qwen2.5 Coder 1.5B Instruct GGUF": 16}


@dataclass
class Config:
    # measured on valid pairs of the six core tasks (results/ffv/sweep.md): layers 1-4 tie and 6 and later
    # are worse; `taskvec` beats `zeros`, which beats `fv` (too long for Gemma, see README) and `random`
    layer: int = 4
    init: str = "taskvec"
    lr: float = 0.05  # relative: times the residual's RMS coordinate at `layer`
    steps: int = 60
    l2: float = 0.0  # penalty on ||v||^2 / ||residual||^2
    l2_from_init: float = 0.0  # penalty on ||v - v0||^2 / ||residual||^2
    every_answer_token: bool = False
    positions: str = "last"  # or "all": every token, for use as a control vector
    eval_every: int = 5
    patience: int = 4  # evaluations without a better valid loss before stopping
    seed: int = 0
    targets: str = "answer"  # or "icl": match 10-shot ICL's distribution over each answer token (see icl_targets)


# For a vector added at every token, measured on the six core tasks' valid pairs at layer 4 of the default model
# (results/ffv/sweep.md, positions all): zeros beats taskvec (71.1% vs 62.7% mean top-1 at lr 0.02); the task
# vector, a last-token difference, is a poor start for every token.
ALL_TOKENS = Config(init="zeros", lr=0.02, positions="all")


@dataclass
class Examples:
    """Zero-shot prompts with their answers, split where the vector starts to matter.

    When the vector goes only at the last prompt token, nothing before it depends on the vector, so that
    prefix is run once and kept as a KV cache; each training step runs only the rest (the last prompt token
    and the answer), a few tokens a row instead of the whole prompt. Prefixes are right-padded, so padding
    sits between a row's prefix and its rest, masked out, while position ids keep every token at its
    llama.cpp position. A vector at every token changes the prefix too: then `ids` hold whole prompts.
    """

    ids: torch.Tensor  # (b, s) the prompt's last token (or the whole prompt), then the answer's tokens, right-padded
    mask: torch.Tensor  # (b, p + s) over the cached prefix and `ids`
    position_ids: torch.Tensor  # (b, s)
    n_answer: torch.Tensor  # (b,) tokens in each answer
    cache: object  # the prefixes' KV cache, copied for each forward; None when ids hold whole prompts
    pairs: list[Pair]
    start: torch.Tensor  # (b,) index in ids of each prompt's last token

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, index in ids, token) of every answer token, the index being the one that predicts it."""
        rows = torch.repeat_interleave(torch.arange(len(self.n_answer), device=self.ids.device), self.n_answer)
        pos = self.start[rows] + torch.cat([torch.arange(int(n), device=self.ids.device) for n in self.n_answer])
        return rows, pos, self.ids[rows, pos + 1]

    def forward(self, lm: LoadedModel) -> torch.Tensor:
        """Final hidden states (b, s, d) of `ids` after the cached prefixes."""
        if self.cache is None:
            return lm.model.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).last_hidden_state
        return lm.model.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position_ids,
                              cache=copy.deepcopy(self.cache), use_cache=True).last_hidden_state


@torch.no_grad()
def encode(lm: LoadedModel, tpl: Template, pairs: list[Pair], cache_prefix: bool = True) -> Examples:
    if not pairs:
        raise ValueError("no pairs to encode")
    prefixes, rests = [], []
    for x, y in pairs:
        prompt = build(tpl, [], x, y)
        ids, answer = answer_tokens(lm.tokenize, prompt.text, prompt.answer)  # raises if the prompt's end merges with the answer
        prefixes.append(ids[:-1])
        rests.append(ids[-1:] + answer)
    if not cache_prefix:
        ids, mask, _ = lm.batch([p + r for p, r in zip(prefixes, rests)])
        n_answer = torch.tensor([len(r) - 1 for r in rests], device=lm.device)
        start = torch.tensor([len(p) for p in prefixes], device=lm.device)
        return Examples(ids, mask, torch.arange(ids.shape[1], device=lm.device).expand_as(ids), n_answer, None, list(pairs), start)
    prefix_ids, prefix_mask, _ = lm.batch(prefixes)
    ids, rest_mask, _ = lm.batch(rests)
    cache = lm.model.model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True).cache
    n_prefix = prefix_mask.sum(1, keepdim=True)
    position_ids = n_prefix + torch.arange(ids.shape[1], device=lm.device)
    n_answer = rest_mask.sum(1) - 1
    return Examples(ids, torch.cat([prefix_mask, rest_mask], 1), position_ids, n_answer, cache, list(pairs), torch.zeros_like(n_answer))


def answer_nll(lm: LoadedModel, ex: Examples, vector: torch.Tensor, layer: int, every_answer_token: bool = False, all_tokens: bool = False,
               soft: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NLL of the answers' tokens with `vector` added after block `layer`: (b,), one value per pair.
    With `soft` (one distribution per answer token, in `ex.targets()` order), the cross-entropy against it."""
    rows, pos, tokens = ex.targets()
    with ExitStack() as stack:
        if all_tokens:
            if ex.cache is not None:
                raise ValueError("a vector at every token needs examples encoded with whole prompts (cache_prefix=False)")
            stack.enter_context(patch_residual(lm.model, layer, None, vector))
        n_points = 0 if all_tokens else int(ex.n_answer.max()) if every_answer_token else 1  # answer positions patched one by one
        for j in range(n_points):
            # rows whose answer is shorter than j+1 tokens get a zero vector at their first index
            on = ex.n_answer > j
            stack.enter_context(patch_residual(lm.model, layer, ex.start + j * on, vector * on[:, None].to(vector.dtype)))
        hidden = ex.forward(lm)
    nll = torch.nn.functional.cross_entropy(unembed(lm, hidden[rows, pos]).float(), tokens if soft is None else soft, reduction="none")
    return torch.zeros(len(ex.n_answer), device=nll.device).index_add(0, rows, nll) / ex.n_answer


@torch.no_grad()
def last_residual(lm: LoadedModel, ex: Examples, layer: int) -> torch.Tensor:
    """(b, d): the residual after block `layer` at each prompt's last token, unpatched."""
    with record_residual(lm.model, [layer]) as res:
        ex.forward(lm)
    return res[layer][torch.arange(len(ex.start), device=ex.start.device), ex.start].float()


def residual_rms(lm: LoadedModel, ex: Examples, layer: int) -> float:
    return float(last_residual(lm, ex, layer).pow(2).mean().sqrt())


@torch.no_grad()
def icl_targets(lm: LoadedModel, tpl: Template, ex: Examples, k: int = 10, n_sets: int = ICL_SETS, seed: int = 0) -> torch.Tensor:
    """(answer tokens, vocab): what k-shot ICL predicts at each answer token of the training pairs, teacher-forced
    on the gold answer and averaged over `n_sets` demo sets drawn from the other training pairs.

    Soft targets carry what the model itself ranks next to the gold answer: a vector fitted to them copies
    ICL's behaviour instead of pushing 20 memorised answers towards probability 1.
    """
    pairs, out = ex.pairs, []
    k = min(k, len(pairs) - 1)
    for i, (x, y) in enumerate(pairs):
        rng = random.Random(f"{seed}:{i}")
        rows = []
        for _ in range(n_sets):
            prompt = build(tpl, sample_demos(pairs, k, x, rng), x, y)
            ids, answer = answer_tokens(lm.tokenize, prompt.text, prompt.answer)
            rows.append(ids + answer[:-1])
        n, start = len(answer), int(ex.start[i])
        if answer != ex.ids[i, start + 1 : start + 1 + n].tolist() or n != int(ex.n_answer[i]):
            raise FvpatchError(f"the answer {y!r} tokenizes differently after demonstrations than zero-shot")
        batch, mask, last = lm.batch(rows)
        hidden = lm.model.model(input_ids=batch, attention_mask=mask).last_hidden_state
        at = last[:, None] - (n - 1) + torch.arange(n, device=lm.device)  # the positions that predict each answer token
        probs = unembed(lm, hidden[torch.arange(len(rows), device=lm.device)[:, None], at]).float().softmax(-1)
        out.append(probs.mean(0))
    return torch.cat(out)


def initial_vector(lm: LoadedModel, task: Task, tpl: Template, cfg: Config, ex: Examples) -> torch.Tensor:
    """The starting point. `fv` and `taskvec` are built from the training pairs alone (10-shot prompts over them)."""
    if cfg.init == "zeros":
        return torch.zeros(lm.n_embd, device=lm.device)
    if cfg.init == "random":
        # a random direction as long as a typical residual at this layer
        g = torch.Generator().manual_seed(cfg.seed)
        return (torch.randn(lm.n_embd, generator=g) * residual_rms(lm, ex, cfg.layer)).to(lm.device)
    if cfg.init == "fv":
        from train.cma import function_vector, head_map, cma_prompts

        k = min(10, len(task.train) - 1)
        clean, corrupted, answers = cma_prompts(lm, task, tpl, len(task.train), k, cfg.seed)
        hm = head_map(lm, clean, corrupted, answers)
        return function_vector(lm, hm, hm.top(10)).float()
    if cfg.init == "taskvec":
        from train.taskvec import task_vectors

        # the task vector replaces the residual; as an addition it is its difference from the zero-shot mean
        k = min(10, len(task.train) - 1)
        icl = task_vectors(lm, task, tpl, k, len(task.train), cfg.seed)[cfg.layer]
        return icl - last_residual(lm, ex, cfg.layer).mean(0)
    raise ValueError(f"init must be one of {', '.join(INITS)}, got {cfg.init!r}")


def default_layer(lm: LoadedModel) -> tuple[int, bool]:
    """(layer, chosen on this model's valid pairs?). A model without a sweep gets the default model's layer at
    the same relative depth, a guess that its own sweep should replace."""
    name = (lm.fingerprint or {}).get("name")
    if name in MEASURED_LAYERS:
        return MEASURED_LAYERS[name], True
    return min(lm.n_layer - 1, round(MEASURED_LAYERS["Gemma 3 270m"] * lm.n_layer / 18)), False  # Gemma 3 270M: 18 layers


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    valid_step: list[int] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    best_step: int = 0


def fit(lm: LoadedModel, train_ex: Examples, valid_ex: Examples, v0: torch.Tensor, cfg: Config, rms: float, progress: bool = True,
        soft: torch.Tensor | None = None) -> tuple[torch.Tensor, History]:
    """Adam with cosine decay from v0, on the gold answers or on `soft` targets; returns the vector with the lowest
    valid loss (gold answers) and the curves."""
    torch.manual_seed(cfg.seed)
    v = v0.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr * rms)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    hist = History()

    def valid_loss() -> float:
        with torch.no_grad():
            return float(answer_nll(lm, valid_ex, v, cfg.layer, cfg.every_answer_token, cfg.positions == "all").mean())

    best, best_v, since = valid_loss(), v.detach().clone(), 0
    hist.valid_step.append(0)
    hist.valid_loss.append(best)
    bar = tqdm(range(1, cfg.steps + 1), desc=f"ffv layer {cfg.layer}", disable=not progress, leave=False)
    for step in bar:
        loss = answer_nll(lm, train_ex, v, cfg.layer, cfg.every_answer_token, cfg.positions == "all", soft).mean()
        hist.step.append(step)
        hist.train_loss.append(loss.item())
        if cfg.l2:
            loss = loss + cfg.l2 * v.pow(2).sum() / (rms**2 * lm.n_embd)
        if cfg.l2_from_init:
            loss = loss + cfg.l2_from_init * (v - v0).pow(2).sum() / (rms**2 * lm.n_embd)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            vl = valid_loss()
            hist.valid_step.append(step)
            hist.valid_loss.append(vl)
            if vl < best:
                best, best_v, since, hist.best_step = vl, v.detach().clone(), 0, step
            else:
                since += 1
            bar.set_postfix(train=f"{hist.train_loss[-1]:.3f}", valid=f"{vl:.3f}", best=f"{best:.3f}")
            if since >= cfg.patience:
                break
        else:
            bar.set_postfix(train=f"{hist.train_loss[-1]:.3f}")
    return best_v, hist


@dataclass
class Data:
    task: Task  # holding only the training pairs and the valid pairs used; no test pairs
    train: Examples
    valid: Examples


def prepare(lm: LoadedModel, task: Task, tpl: Template, n_train: int = 20, n_valid: int = 50, positions: str = "last") -> Data:
    """The first `n_train` train pairs and the first `n_valid` valid pairs, encoded for a vector at `positions`
    (last or all); the test pairs are never seen."""
    if len(task.train) < n_train:
        raise FvpatchError(f"task {task.name!r} has {len(task.train)} train pairs, fewer than --n-train {n_train}")
    if not task.valid:
        raise FvpatchError(f"task {task.name!r} has no valid pairs for early stopping; give it more pairs")
    small = Task(task.name, task.train[:n_train], task.valid[:n_valid], [], task.source)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    cache = positions == "last"
    return Data(small, encode(lm, tpl, small.train, cache), encode(lm, tpl, small.valid, cache))


def train_ffv(lm: LoadedModel, data: Data, tpl: Template, cfg: Config, v0: torch.Tensor | None = None, progress: bool = True) -> tuple[VectorFile, History]:
    """Train from `v0` (default: the vector cfg.init makes) and export the vector with the best valid loss."""
    if not 0 <= cfg.layer < lm.n_layer:
        raise OutOfRange(f"layer {cfg.layer} is outside this model's {lm.n_layer} layers (0..{lm.n_layer - 1})")
    if (cfg.positions == "all") != (data.train.cache is None):
        raise ValueError(f"positions {cfg.positions!r} needs data from prepare(..., positions={cfg.positions!r})")
    if cfg.targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {cfg.targets!r}")
    if cfg.targets == "icl" and (cfg.positions != "last" or cfg.every_answer_token):
        raise ValueError("ICL targets are for a vector at the last prompt token only")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rms = residual_rms(lm, data.train, cfg.layer)
    if v0 is None:
        v0 = initial_vector(lm, data.task, tpl, cfg, data.train)
    soft = icl_targets(lm, tpl, data.train, seed=cfg.seed) if cfg.targets == "icl" else None
    v, hist = fit(lm, data.train, data.valid, v0, cfg, rms, progress, soft)
    with torch.no_grad():
        train_loss = float(answer_nll(lm, data.train, v, cfg.layer, cfg.every_answer_token, cfg.positions == "all").mean())
    meta = {
        "fvpatch.method": "fine-tuned function vector",
        "fvpatch.task": data.task.name,
        "fvpatch.template": tpl.text,
        "fvpatch.init": cfg.init,
        "fvpatch.pairs": json.dumps(data.task.train, ensure_ascii=False),
        **({"fvpatch.pairs_source": data.task.source} if data.task.source else {}),
        "fvpatch.n_valid": str(len(data.task.valid)),
        "fvpatch.steps": str(hist.step[-1] if hist.step else 0),
        "fvpatch.best_step": str(hist.best_step),
        "fvpatch.train_loss": f"{train_loss:.4f}",
        "fvpatch.valid_loss": f"{min(hist.valid_loss):.4f}",
        "fvpatch.every_answer_token": str(cfg.every_answer_token).lower(),
        "fvpatch.apply_at": cfg.positions,
        "fvpatch.train_dtype": str(lm.dtype).removeprefix("torch."),
        "fvpatch.config": json.dumps(asdict(cfg)),
    }
    return VectorFile(f"l_out-{cfg.layer}", v.cpu().numpy(), [-1], lm.fingerprint, mode="add", meta=meta), hist
