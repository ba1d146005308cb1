"""An OpenAI-compatible local server whose requests may carry vectors: one loaded model, a vector per request.

POST /v1/completions and /v1/chat/completions take the usual fields (prompt or messages, max_tokens,
temperature, seed, stop, stream, logprobs, and chat's top_logprobs) plus `vectors`: a list of {"vector": NAME_OR_FILE, "scale": 1.0,
"positions": "last" | "all" | [token indices]}. "last" adds the vector at the last prompt token and every
generated token (as function vectors are applied: `fvpatch patch --every-token`), "all" at every token (as
llama.cpp applies a control vector), a list at those prompt positions only. The layer and tensor come from
the file. GET /v1/models lists the model.

Requests run on `parallel` slots (`fvpatch.slots`): with one they take turns, with more those that arrive
together are decoded together, each in its own sequence of the one context. Either way each has only its own
patches, so concurrent requests never see each other's vectors. A bad request gets a 4xx whose error
message is one line; the server keeps serving.
"""

import json
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from fvpatch import vectorfile
from fvpatch.errors import FvpatchError
from fvpatch.models import check_fingerprint
from fvpatch.session import Patch, Session
from fvpatch.shipped import vector_path
from fvpatch.slots import Slots

MAX_BODY = 1 << 20
MAX_TOP = 20  # alternatives per token, as llama-server allows by default


class BadRequest(FvpatchError):
    pass


def _field(body: dict, key: str, kind, default, check=lambda v: True, what: str = ""):
    value = body.get(key, default)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not check(value):
        raise BadRequest(f"{key} must be {what or kind.__name__}, got {json.dumps(value)[:60]}")
    return value


def parse_vectors(session: Session, specs, graph: dict[str, int]) -> list[Patch]:
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
        if len(row) != graph[vf.tensor]:
            raise BadRequest(f"vectors[{i}] {name}: vector of width {len(row)} does not fit tensor {vf.tensor!r} of width {graph[vf.tensor]}")
    return patches


def top_logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives each generated token's log-probability comes with; None: no log-probabilities.
    Completions ask with "logprobs": N, chat with "logprobs": true and "top_logprobs": N, as OpenAI's API does."""
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
    if body.get("stream"):
        raise BadRequest("fvpatch serve does not stream log-probabilities; ask for them without \"stream\"")
    return top


def logprobs_json(session: Session, steps: list[tuple[int, float, list]], chat: bool) -> dict:
    """OpenAI's logprobs object for (token, log-probability, top alternatives) steps: chat's `content` list, or
    the completions API's parallel lists, whose offsets count characters of the completion's text."""
    text = lambda t: session.piece(t).decode("utf-8", "replace")  # noqa: E731
    if chat:
        return {"content": [{"token": text(t), "logprob": lp, "bytes": list(session.piece(t)),
                             "top_logprobs": [{"token": text(a), "logprob": alp, "bytes": list(session.piece(a))} for a, alp in top]}
                            for t, lp, top in steps]}
    pieces = [session.piece(t) for t, _, _ in steps]
    return {"tokens": [text(t) for t, _, _ in steps], "token_logprobs": [lp for _, lp, _ in steps],
            "top_logprobs": [{text(a): alp for a, alp in top} for _, _, top in steps],
            "text_offset": [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))]}


class Generator:
    """Turns requests into jobs on the session's slots; `generate` streams a job's text and applies stop strings."""

    def __init__(self, session: Session, model_name: str, parallel: int, vectors: list[dict]):
        self.session = session
        self.model_name = model_name
        self.graph = session.graph_tensors()
        parse_vectors(session, vectors, self.graph)  # a bad default vector stops the server before it starts
        self.vectors = vectors
        self.slots = Slots(session, parallel)

    def request(self, body: dict, chat: bool) -> tuple[list[int], list[Patch], dict]:
        s = self.session
        if chat:
            messages = body.get("messages")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
                raise BadRequest("messages must be a non-empty list of {\"role\": ..., \"content\": \"...\"}")
            tokens = s.tokenize(s.chat_prompt(messages), special=True)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest("prompt must be a non-empty string")
            tokens = s.tokenize(prompt)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise BadRequest("stop must be a string or a list of non-empty strings")
        opts = {
            "max_tokens": _field(body, "max_tokens", int, 16, lambda v: 1 <= v <= s.n_ctx - len(tokens), f"an integer from 1 to {s.n_ctx - len(tokens)} (what the context leaves after the prompt)"),
            "temperature": _field(body, "temperature", (int, float), 0.0, lambda v: np.isfinite(v) and 0 <= v <= 2, "a number from 0 to 2"),
            "seed": _field(body, "seed", int, 0, lambda v: v >= 0, "a non-negative integer"),
            "stop": stop,
            "top_logprobs": top_logprobs(body, chat),
        }
        patches = parse_vectors(s, body.get("vectors", self.vectors), self.graph)
        for p in patches:
            if not p.all_tokens:
                s.resolve_position(p.token, len(tokens))  # a token index outside this prompt is the request's fault
        return tokens, patches, opts

    def generate(self, tokens: list[int], patches: list[Patch], opts: dict, emit):
        """Run the request, calling emit(piece) as text arrives; returns (finish_reason, completion tokens, and
        when asked, (token, log-probability, top alternatives) for each token whose text the client got)."""
        pieces: list[bytes] = []
        sent, text, stopped, n, eog = 0, "", False, 0, False
        job = self.slots.submit(tokens, patches, opts["max_tokens"], opts["temperature"], opts["seed"], opts["top_logprobs"])
        try:
            for tok in job:
                n += 1
                if self.session.is_eog(tok):
                    eog = True
                    break
                pieces.append(self.session.piece(tok))
                text = b"".join(pieces).decode("utf-8", "ignore")
                cut = min((text.find(x) for x in opts["stop"] if x in text), default=-1)
                if cut >= 0:
                    text, stopped = text[:cut], True
                # hold back an ending that may yet grow into a stop string: it must never reach the client
                held = 0 if stopped else max((k for x in opts["stop"] for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
                if len(text) - held > sent:
                    emit(text[sent : len(text) - held])
                    sent = len(text) - held
                if stopped:
                    break
        finally:
            job.cancel()  # a stop string came, or emit failed because the client left: free the slot
        if len(text) > sent:  # what was held back, now that no stop string came
            emit(text[sent:])
        steps = None
        if opts["top_logprobs"] is not None:
            # past a stop string, only the tokens that began before it: their text is (partly) the client's
            kept = sum(1 for i in range(len(pieces)) if len(b"".join(pieces[:i]).decode("utf-8", "ignore")) < len(text)) if stopped else len(pieces)
            steps = [(job.generated[i], *job.logprobs[i]) for i in range(kept)]
        return ("stop" if stopped or eog else "length"), n, steps


def make_handler(gen: Generator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request on stderr, as llama-server does
            if not getattr(self.server, "quiet", False):
                super().log_message(fmt, *args)

        def _json(self, status: int, payload: dict):
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str):
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": gen.model_name, "object": "model", "owned_by": "fvpatch"}]})
            else:
                self._error(404, f"no such endpoint: GET {self.path}")

        def do_POST(self):
            route = self.path.rstrip("/")
            if route not in ("/v1/completions", "/v1/chat/completions"):
                return self._error(404, f"no such endpoint: POST {self.path}")
            chat = route.endswith("chat/completions")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise BadRequest(f"the request body must be JSON of 1 byte to {MAX_BODY} bytes")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                tokens, patches, opts = gen.request(body, chat)
            except json.JSONDecodeError as e:
                return self._error(400, f"the request body is not JSON ({e})")
            except (FvpatchError, ValueError, IndexError) as e:
                return self._error(400, str(e).splitlines()[0])
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            base = {"id": rid, "created": int(time.time()), "model": gen.model_name}
            if body.get("stream"):
                return self._stream(base, chat, tokens, patches, opts)
            parts: list[str] = []
            try:
                finish, n, steps = gen.generate(tokens, patches, opts, parts.append)
            except FvpatchError as e:  # found only while decoding, e.g. a tensor that never fires
                return self._error(400, str(e).splitlines()[0])
            text = "".join(parts)
            logprobs = None if steps is None else logprobs_json(gen.session, steps, chat)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
            self._json(200, base | {"object": "chat.completion" if chat else "text_completion", "choices": [choice],
                                    "usage": {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}})

        def _stream(self, base, chat, tokens, patches, opts):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            kind = "chat.completion.chunk" if chat else "text_completion"

            def send(choice):
                self.wfile.write(f"data: {json.dumps(base | {'object': kind, 'choices': [choice]}, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()

            if chat:
                send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            piece = (lambda t: {"index": 0, "delta": {"content": t}, "finish_reason": None}) if chat else \
                    (lambda t: {"index": 0, "text": t, "logprobs": None, "finish_reason": None})
            try:
                finish, _, _ = gen.generate(tokens, patches, opts, lambda t: send(piece(t)))
            except FvpatchError as e:  # the status line is sent: the error goes in the stream, as OpenAI's API does
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e).splitlines()[0], 'type': 'invalid_request_error'}})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True
                return
            send({"index": 0, "delta": {}, "finish_reason": finish} if chat else {"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


class VectorServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_close(self):
        super().server_close()
        self.generator.slots.close()  # after this the session is free for its owner to close


def make_server(session: Session, host: str = "127.0.0.1", port: int = 8080, model_name: str | None = None,
                quiet: bool = False, parallel: int = 1, vectors: list[dict] = ()) -> VectorServer:
    """A server bound to host:port (port 0 picks a free one) that decodes up to `parallel` requests together,
    and gives `vectors` (a request's "vectors" field) to every request that names none; call serve_forever(),
    then shutdown() and server_close() to stop."""
    gen = Generator(session, model_name or session.path.stem, parallel, list(vectors))
    server = VectorServer((host, port), make_handler(gen))
    server.generator = gen
    server.quiet = quiet
    return server
