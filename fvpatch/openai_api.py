"""OpenAI's completions API as `fvpatch serve` reads and writes it: a request body checked into a `Request`
(prompts as tokens, patches, options), and what generation made turned into a choice. Every check happens
here, at the edge: a request that passes cannot fail inside the batch of other requests it joins."""

import json
from dataclasses import dataclass
from pathlib import Path

from fvpatch import vectorfile
from fvpatch.errors import FvpatchError, NotFound
from fvpatch.models import check_fingerprint
from fvpatch.session import Patch, Session, check_fits
from fvpatch.specs import check_overlaps
from fvpatch.shipped import find_vector, vector_path

MAX_BODY = 1 << 20
MAX_TOP = 20  # alternatives per token, as llama-server allows by default
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 64  # prompts times n
MAX_SEED = 2**63 - 1


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
    n: int  # choices per prompt
    max_tokens: int  # 0: none, only the echoed prompt's log-probabilities
    temperature: float
    top_p: float
    seed: int | None  # None: a fresh draw for every request
    stop: list[str]
    top_logprobs: int | None  # None: no log-probabilities
    echo: bool  # the prompt comes back before the completion, with its tokens' log-probabilities
    stream: bool
    include_usage: bool  # a stream ends with a chunk that carries the usage


@dataclass
class Generated:
    text: str
    finish: str  # "stop" or "length"
    n_tokens: int
    steps: list[tuple[int, float, list]] | None  # (token, log-probability, top alternatives) when asked
    prompt_steps: list[tuple[int, float | None, list | None]] | None  # the same for the prompt, with echo


def read_request(session: Session, body: dict, chat: bool, graph: dict[str, int | None], default_vectors: list[dict],
                 folder: Path, parallel: int = 1) -> Request:
    _unsupported(body)
    prompts, sent_from = _prompts(session, body, chat)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    stream = _flag(body, "stream")
    echo = not chat and _flag(body, "echo")
    n = _field(body, "n", int, 1, lambda v: 1 <= v <= MAX_CHOICES // len(prompts), f"an integer from 1 to {MAX_CHOICES // len(prompts)}")
    if stream and (len(prompts) > 1 or n > 1 or echo):
        raise BadRequest("a streamed request takes one prompt, n of 1 and no echo")
    options = body.get("stream_options")
    if options is not None and not (stream and isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise BadRequest("stream_options goes with \"stream\": true and takes {\"include_usage\": true}")
    room = session.n_ctx - max(len(p) for p in prompts)
    if room < 1:
        raise BadRequest(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room in the context of {session.n_ctx}; raise --n-ctx")
    vectors = body.get("vectors")
    req = Request(
        chat, prompts, sent_from, parse_vectors(session, default_vectors, graph) if vectors is None else parse_vectors(session, vectors, graph, folder), n=n,
        max_tokens=_max_tokens(body, chat, echo, room, session.n_ctx // parallel - max(len(p) for p in prompts)),
        temperature=_field(body, "temperature", (int, float), 0.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
        top_p=_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number above 0, at most 1"),
        seed=_field(body, "seed", int, None, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}") if body.get("seed") is not None else None,
        stop=stop, top_logprobs=_top_logprobs(body, chat), echo=echo, stream=stream,
        include_usage=_flag(options or {}, "include_usage"),
    )
    for tokens in prompts:  # what Slots.submit would refuse is the request's fault: a 400 before any job is queued
        placed = [(p, pos) for p in req.patches for pos in session.patch_positions(p, len(tokens), range(len(tokens)))]
        check_overlaps([*placed, *((p, "each generated token") for p in req.patches if p.generated or p.all_tokens)])
    return req


def _unsupported(body: dict):
    """OpenAI fields this server does not implement: refused when they ask for something, never silently ignored."""
    for key, none in (("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", {}), ("suffix", ""), ("best_of", 1),
                      ("tools", []), ("functions", []), ("response_format", {"type": "text"})):
        if body.get(key) not in (None, none):
            raise BadRequest(f"fvpatch serve does not support {key}; leave it out")


def _max_tokens(body: dict, chat: bool, echo: bool, room: int, share: int) -> int:
    """As OpenAI's API: completions default to 16 new tokens, chat to as many as the context leaves (null means
    the default; chat also reads max_completion_tokens). With --parallel P, chat's default is what the prompt
    leaves of a P-th of the context (at least 16), as llama-server gives each slot a P-th: a default of the whole
    context would reserve it all, and the request would run alone. A default never exceeds the room after the
    prompt, and 0 (no new tokens) is for scoring an echoed prompt."""
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is None:
        return min(16 if not chat else max(share, 16), room)
    low = 0 if echo else 1
    return _field(body, key, int, None, lambda v: low <= v <= room, f"an integer from {low} to {room} (what the context leaves after the prompt)")


def _prompts(session: Session, body: dict, chat: bool) -> tuple[list[list[int]], list[int]]:
    """The prompts as tokens, and where each one's tokens as sent begin: chat's messages in the model's template;
    for completions a string, a list of token ids, or a list of up to MAX_PROMPTS of either. A model whose
    tokenizer starts every text with BOS gets one before text, and before ids that lack it (llama-server would
    decode ids as sent; Gemma without BOS answers noise, and lm-evaluation-harness sends its prompts as ids
    without BOS); `"add_bos": false` asks for none, before text or ids."""
    if chat:
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and _text(m.get("content")) is not None for m in messages)):
            raise BadRequest("messages must be a non-empty list of {\"role\": ..., \"content\": \"...\"} (content as text, or a list of text parts)")
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in messages]
        return [session.tokenize(session.chat_prompt(messages))], [0]
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
        if isinstance(item, str):  # the tokenizer's BOS is the server's too: echo leaves it out either way
            out.append(tokens)
            sent_from.append(int(add_bos and session.adds_bos))
            continue
        bos = add_bos and session.adds_bos and tokens[0] != session.bos
        out.append([session.bos] + tokens if bos else tokens)
        sent_from.append(int(bos))
    return out, sent_from


def _text(content) -> str | None:
    """A message's content as text: a string, or OpenAI's list of parts when all are text parts; else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def parse_vectors(session: Session, specs, graph: dict[str, int | None], folder: Path | None = None) -> list[Patch]:
    """The request's `vectors` as patches, each checked against the loaded model and its graph's tensors (name ->
    width): a patch that could fail only inside a decode would fail every request of the batch it joined. With a
    `folder`, files must lie in it (`_request_vector`)."""
    if not isinstance(specs, list):
        raise BadRequest("vectors must be a list of {\"vector\": NAME_OR_FILE, \"scale\": 1.0, \"positions\": \"last\"}")
    fp = session.fingerprint()
    patches = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("vector"), str) or set(spec) - {"vector", "scale", "positions"}:
            raise BadRequest(f"vectors[{i}] must be an object with a string \"vector\" and optional \"scale\" and \"positions\"")
        name = spec["vector"]
        vf = vectorfile.load(vector_path(name, fp) if folder is None else _request_vector(name, fp, folder))
        try:
            check_fingerprint(vf.model, fp)
        except ValueError as e:
            raise BadRequest(f"vectors[{i}] {name}: {e}") from None
        try:
            scale = vectorfile.check_scale(spec.get("scale", vf.scale))
        except FvpatchError:
            raise BadRequest(f"vectors[{i}].scale must be a finite number") from None
        positions = spec.get("positions", "all" if vf.meta.get("fvpatch.apply_at") == "all" else "last")
        row = vf.row(None)
        if positions == "last":
            patches.append(Patch(vf.tensor, row, -1, vf.mode, scale, generated=True))
        elif positions == "all":
            if vf.mode != "add":
                raise BadRequest(f"vectors[{i}] {name} replaces the residual; only an added vector can go at every token")
            patches.append(Patch(vf.tensor, row, -1, vf.mode, scale, all_tokens=True))
        elif isinstance(positions, list) and positions and all(type(p) is int for p in positions):
            patches += [Patch(vf.tensor, row, p, vf.mode, scale) for p in positions]
        else:
            raise BadRequest(f"vectors[{i}].positions must be \"last\", \"all\" or a non-empty list of token indices")
        session.check_tensor_name(vf.tensor)
        try:
            check_fits(vf.tensor, len(row), graph)
        except FvpatchError as e:
            raise BadRequest(f"vectors[{i}] {name}: {e}") from None
    return patches


def _request_vector(name: str, fp: dict, folder: Path) -> Path:
    """A shipped vector, or a file inside the server's vector folder: a client may not read, or learn of, any
    other file on the server's machine (with CORS open, any web page the user visits is such a client)."""
    root = folder.resolve()
    try:
        path = (root / name).resolve()
        if path.is_relative_to(root) and path.is_file():
            return path
    except (OSError, RuntimeError):  # a name too long for the filesystem, a loop of links: no such vector either
        pass
    try:
        return find_vector(name, fp)
    except NotFound:
        raise BadRequest(f"{name!r} is neither a shipped vector nor a file in the server's vector folder (--vector-dir)") from None


def _top_logprobs(body: dict, chat: bool) -> int | None:
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
    return top


def choice_json(session: Session, req: Request, index: int, got: Generated) -> dict:
    """Choice `index` (prompt index // n); an echo repeats the prompt as sent, so a BOS the server added is not in it."""
    prompt = index // req.n
    sent = req.sent_from[prompt]
    steps = None if got.steps is None else (got.prompt_steps or [])[sent:] + got.steps
    logprobs = None if steps is None else _logprobs_json(session, steps, req.chat)
    if req.chat:
        return {"index": index, "message": {"role": "assistant", "content": got.text}, "logprobs": logprobs, "finish_reason": got.finish}
    text = (session.detokenize(req.prompts[prompt][sent:]) if req.echo else "") + got.text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": got.finish}


def _logprobs_json(session: Session, steps: list[tuple[int, float | None, list | None]], chat: bool, offsets: list[int] | None = None) -> dict:
    """OpenAI's logprobs object: chat's `content` list, or the completions API's parallel lists, whose offsets
    count characters of the choice's text (`offsets`, or counted from the first step's). An echoed prompt's first
    token has no log-probability (None)."""
    text = session.piece_text
    if chat:
        return {"content": [{"token": text(t), "logprob": lp, "bytes": list(session.piece(t)),
                             "top_logprobs": [{"token": text(a), "logprob": alp, "bytes": list(session.piece(a))} for a, alp in top]}
                            for t, lp, top in steps]}
    pieces = [session.piece(t) for t, _, _ in steps]
    return {"tokens": [text(t) for t, _, _ in steps], "token_logprobs": [lp for _, lp, _ in steps],
            "top_logprobs": [None if top is None else {text(a): alp for a, alp in top} for _, _, top in steps],
            "text_offset": offsets if offsets is not None else [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))]}


def chunk_json(session: Session, req: Request, text: str, steps: list, offsets: list[int], finish: str | None = None) -> dict:
    """One streamed choice: a piece of text with the log-probabilities of the tokens that began in it."""
    logprobs = _logprobs_json(session, steps, req.chat, offsets) if steps else None
    if req.chat:
        return {"index": 0, "delta": {"content": text} if text or finish is None else {}, "logprobs": logprobs, "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
