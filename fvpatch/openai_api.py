"""OpenAI's completions API as `fvpatch serve` reads and writes it: a request body checked into a `Request`
(prompts as tokens, patches, options), and what generation made turned into a choice. Every check happens
here, at the edge: a request that passes cannot fail inside the batch of other requests it joins."""

import json
from dataclasses import dataclass

import numpy as np

from fvpatch import vectorfile
from fvpatch.errors import FvpatchError
from fvpatch.models import check_fingerprint
from fvpatch.session import Patch, Session
from fvpatch.shipped import vector_path

MAX_BODY = 1 << 20
MAX_TOP = 20  # alternatives per token, as llama-server allows by default
MAX_PROMPTS = 64  # prompts in one completions request


class BadRequest(FvpatchError):
    pass


def _field(body: dict, key: str, kind, default, check=lambda v: True, what: str = ""):
    value = body.get(key, default)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not check(value):
        raise BadRequest(f"{key} must be {what or kind.__name__}, got {json.dumps(value)[:60]}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, got {json.dumps(value)[:60]}")
    return bool(value)


@dataclass
class Request:
    chat: bool
    prompts: list[list[int]]  # one choice each, as decoded
    sent_from: list[int]  # where each prompt's tokens as sent begin: 1 where the server put a BOS before them
    patches: list[Patch]
    max_tokens: int
    temperature: float
    seed: int
    stop: list[str]
    top_logprobs: int | None  # None: no log-probabilities
    echo: bool  # the prompt comes back before the completion, with its tokens' log-probabilities
    stream: bool


@dataclass
class Generated:
    text: str
    finish: str  # "stop" or "length"
    n_tokens: int
    steps: list[tuple[int, float, list]] | None  # (token, log-probability, top alternatives) when asked
    prompt_steps: list[tuple[int, float | None, list | None]] | None  # the same for the prompt, with echo


def read_request(session: Session, body: dict, chat: bool, graph: dict[str, int | None], default_vectors: list[dict]) -> Request:
    prompts, sent_from = _prompts(session, body, chat)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    stream = _flag(body, "stream")
    echo = not chat and _flag(body, "echo")
    if stream and (len(prompts) > 1 or echo):
        raise BadRequest("a streamed request takes one prompt and no echo")
    room = session.n_ctx - max(len(p) for p in prompts)
    if room < 1:
        raise BadRequest(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room in the context of {session.n_ctx}; raise --n-ctx")
    req = Request(
        chat, prompts, sent_from, parse_vectors(session, body.get("vectors", default_vectors), graph),
        max_tokens=_field(body, "max_tokens", int, 16, lambda v: 1 <= v <= room, f"an integer from 1 to {room} (what the context leaves after the prompt)"),
        temperature=_field(body, "temperature", (int, float), 0.0, lambda v: np.isfinite(v) and 0 <= v <= 2, "a number from 0 to 2"),
        seed=_field(body, "seed", int, 0, lambda v: v >= 0, "a non-negative integer"),
        stop=stop, top_logprobs=_top_logprobs(body, chat, stream), echo=echo, stream=stream,
    )
    for p in req.patches:
        if not p.all_tokens:
            for tokens in prompts:
                session.resolve_position(p.token, len(tokens))  # a token index outside a prompt is the request's fault
    return req


def _prompts(session: Session, body: dict, chat: bool) -> tuple[list[list[int]], list[int]]:
    """The prompts as tokens, and where each one's tokens as sent begin: chat's messages in the model's template;
    for completions a string, a list of token ids, or a list of up to MAX_PROMPTS of either. A model whose
    tokenizer starts every text with BOS gets one before text, and before ids that lack it (llama-server would
    decode ids as sent; Gemma without BOS answers noise, and lm-evaluation-harness sends its prompts as ids
    without BOS); `"add_bos": false` asks for none, before text or ids."""
    if chat:
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
            raise BadRequest("messages must be a non-empty list of {\"role\": ..., \"content\": \"...\"}")
        return [session.tokenize(session.chat_prompt(messages), special=True)], [0]
    prompt = body.get("prompt")
    ids = lambda x: isinstance(x, list) and all(type(t) is int for t in x)  # noqa: E731
    items = [prompt] if isinstance(prompt, str) or (ids(prompt) and prompt) else prompt
    if not (isinstance(items, list) and 0 < len(items) <= MAX_PROMPTS and all(isinstance(x, str) or ids(x) for x in items)):
        raise BadRequest(f"prompt must be a string, a list of token ids, or a list of 1 to {MAX_PROMPTS} of either")
    add_bos = body.get("add_bos", True)
    if not isinstance(add_bos, bool):
        raise BadRequest(f"add_bos must be true or false, got {json.dumps(add_bos)[:60]}")
    out, sent_from = [], []
    for i, item in enumerate(items):
        tokens = (session.tokenize(item, add_bos=add_bos) if item else []) if isinstance(item, str) else item
        if not tokens:
            raise BadRequest(f"prompt {i} is empty")
        if bad := [t for t in tokens if not 0 <= t < session.n_vocab]:
            raise BadRequest(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0 to {session.n_vocab - 1})")
        bos = add_bos and not isinstance(item, str) and session.adds_bos and tokens[0] != session.bos
        out.append([session.bos] + tokens if bos else tokens)
        sent_from.append(int(bos))
    return out, sent_from


def parse_vectors(session: Session, specs, graph: dict[str, int | None]) -> list[Patch]:
    """The request's `vectors` as patches, each checked against the loaded model and its graph's tensors (name ->
    width): a patch that could fail only inside a decode would fail every request of the batch it joined."""
    if not isinstance(specs, list):
        raise BadRequest("vectors must be a list of {\"vector\": NAME_OR_FILE, \"scale\": 1.0, \"positions\": \"last\"}")
    fp = session.fingerprint()
    patches = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("vector"), str) or set(spec) - {"vector", "scale", "positions"}:
            raise BadRequest(f"vectors[{i}] must be an object with a string \"vector\" and optional \"scale\" and \"positions\"")
        name = spec["vector"]
        vf = vectorfile.load(vector_path(name, fp))
        try:
            check_fingerprint(vf.model, fp)
        except ValueError as e:
            raise BadRequest(f"vectors[{i}] {name}: {e}") from None
        scale = spec.get("scale", vf.scale)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
            raise BadRequest(f"vectors[{i}].scale must be a finite number")
        positions = spec.get("positions", "all" if vf.meta.get("fvpatch.apply_at") == "all" else "last")
        row = vf.row(None)
        if positions == "last":
            patches.append(Patch(vf.tensor, row, -1, vf.mode, float(scale), generated=True))
        elif positions == "all":
            if vf.mode != "add":
                raise BadRequest(f"vectors[{i}] {name} replaces the residual; only an added vector can go at every token")
            patches.append(Patch(vf.tensor, row, -1, vf.mode, float(scale), all_tokens=True))
        elif isinstance(positions, list) and positions and all(type(p) is int for p in positions):
            patches += [Patch(vf.tensor, row, p, vf.mode, float(scale)) for p in positions]
        else:
            raise BadRequest(f"vectors[{i}].positions must be \"last\", \"all\" or a non-empty list of token indices")
        session.check_tensor_name(vf.tensor)
        if vf.tensor not in graph:
            raise BadRequest(f"vectors[{i}] {name}: tensor {vf.tensor!r} never appears in this model's compute graph")
        if graph[vf.tensor] is None:
            raise BadRequest(f"vectors[{i}] {name}: tensor {vf.tensor!r} is not one row per token, or several nodes share its name; fvpatch patches neither")
        if len(row) != graph[vf.tensor]:
            raise BadRequest(f"vectors[{i}] {name}: vector of width {len(row)} does not fit tensor {vf.tensor!r} of width {graph[vf.tensor]}")
    return patches


def _top_logprobs(body: dict, chat: bool, stream: bool) -> int | None:
    """How many alternatives each token's log-probability comes with; None: no log-probabilities. Completions ask
    with "logprobs": N, chat with "logprobs": true and "top_logprobs": N, as OpenAI's API does."""
    in_range = lambda v: 0 <= v <= MAX_TOP  # noqa: E731
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise BadRequest(f"logprobs must be true or false, got {json.dumps(want)[:60]}")
        if not want:
            if body.get("top_logprobs") is not None:
                raise BadRequest("top_logprobs needs \"logprobs\": true")
            return None
        top = 0 if body.get("top_logprobs") is None else _field(body, "top_logprobs", int, 0, in_range, f"an integer from 0 to {MAX_TOP}")
    else:
        if body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs is a chat field; completions ask with \"logprobs\": N")
        if body.get("logprobs") is None:
            return None
        top = _field(body, "logprobs", int, 0, in_range, f"an integer from 0 to {MAX_TOP}, or null")
    if stream:
        raise BadRequest("fvpatch serve does not stream log-probabilities; ask for them without \"stream\"")
    return top


def choice_json(session: Session, req: Request, index: int, got: Generated) -> dict:
    """One choice; an echo repeats the prompt as sent, so a BOS the server added is not in it."""
    sent = req.sent_from[index]
    steps = None if got.steps is None else (got.prompt_steps or [])[sent:] + got.steps
    logprobs = None if steps is None else _logprobs_json(session, steps, req.chat)
    if req.chat:
        return {"index": index, "message": {"role": "assistant", "content": got.text}, "logprobs": logprobs, "finish_reason": got.finish}
    text = (session.detokenize(req.prompts[index][sent:]) if req.echo else "") + got.text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": got.finish}


def _logprobs_json(session: Session, steps: list[tuple[int, float | None, list | None]], chat: bool) -> dict:
    """OpenAI's logprobs object: chat's `content` list, or the completions API's parallel lists, whose offsets
    count characters of the choice's text. An echoed prompt's first token has no log-probability (None)."""
    text = session.piece_text
    if chat:
        return {"content": [{"token": text(t), "logprob": lp, "bytes": list(session.piece(t)),
                             "top_logprobs": [{"token": text(a), "logprob": alp, "bytes": list(session.piece(a))} for a, alp in top]}
                            for t, lp, top in steps]}
    pieces = [session.piece(t) for t, _, _ in steps]
    return {"tokens": [text(t) for t, _, _ in steps], "token_logprobs": [lp for _, lp, _ in steps],
            "top_logprobs": [None if top is None else {text(a): alp for a, alp in top} for _, _, top in steps],
            "text_offset": [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))]}
