"""An OpenAI-compatible local server whose requests may carry vectors: one loaded model, a vector per request.

POST /v1/completions and /v1/chat/completions take the usual fields (prompt or messages, max_tokens,
temperature, seed, stop, stream, logprobs, echo, and chat's top_logprobs; `fvpatch.openai_api` reads them)
plus `vectors`: a list of {"vector": NAME_OR_FILE, "scale": 1.0, "positions": "last" | "all" | [token
indices]}. "last" adds the vector at the last prompt token and every generated token (as function vectors
are applied: `fvpatch patch --every-token`), "all" at every token (as llama.cpp applies a control vector), a
list at those prompt positions only. The layer and tensor come from the file. GET /v1/models lists the model; /tokenize, /detokenize and /tokenizer_info serve its tokenizer, as
vLLM's do, for clients such as lm-evaluation-harness that tokenize through the server.

Requests run on `parallel` slots (`fvpatch.slots`): with one they take turns, with more those that arrive
together are decoded together, each in its own sequence of the one context. Either way each has only its own
patches, so concurrent requests never see each other's vectors. A bad request gets a 4xx whose error
message is one line; the server keeps serving.
"""

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fvpatch.errors import FvpatchError
from fvpatch.openai_api import MAX_BODY, BadRequest, Generated, Request, choice_json, parse_vectors, read_request
from fvpatch.session import Session
from fvpatch.slots import Job, Slots


class Generator:
    """Turns checked requests into jobs on the session's slots, and a job's tokens into text under stop strings."""

    def __init__(self, session: Session, model_name: str, parallel: int, vectors: list[dict]):
        self.session = session
        self.model_name = model_name
        self.graph = session.graph_tensors()
        parse_vectors(session, vectors, self.graph)  # a bad default vector stops the server before it starts
        self.vectors = vectors
        self.slots = Slots(session, parallel)

    def read(self, body: dict, chat: bool) -> Request:
        return read_request(self.session, body, chat, self.graph, self.vectors)

    def submit(self, req: Request, tokens: list[int]) -> Job:
        return self.slots.submit(tokens, req.patches, req.max_tokens, req.temperature, req.seed, req.top_logprobs, req.echo)

    def collect(self, job: Job, req: Request, emit=lambda text: None) -> Generated:
        """The job's completion, calling emit(text) as text arrives; never a stop string, nor the start of one."""
        s = self.session
        pieces: list[bytes] = []
        starts: list[int] = []  # where each token's text begins
        sent, text, stopped, n, eog = 0, "", False, 0, False
        try:
            for tok in job:
                n += 1
                if s.is_eog(tok):
                    eog = True
                    break
                starts.append(len(text))
                pieces.append(s.piece(tok))
                text = b"".join(pieces).decode("utf-8", "ignore")
                cut = min((text.find(x) for x in req.stop if x in text), default=-1)
                if cut >= 0:
                    text, stopped = text[:cut], True
                # hold back an ending that may yet grow into a stop string: it must never reach the client
                held = 0 if stopped else max((k for x in req.stop for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
                if len(text) - held > sent:
                    emit(text[sent : len(text) - held])
                    sent = len(text) - held
                if stopped:
                    break
        finally:
            job.cancel()  # a stop string came, or emit failed because the client left: free the slot
        if len(text) > sent:  # what was held back, now that no stop string came
            emit(text[sent:])
        steps = prompt_steps = None
        if req.top_logprobs is not None:
            # past a stop string, only the tokens that began before it: their text is (partly) the client's
            kept = sum(1 for at in starts if at < len(text)) if stopped else len(pieces)
            steps = [(job.generated[i], *job.logprobs[i]) for i in range(kept)]
            if req.echo:
                prompt_steps = [(job.tokens[0], None, None)] + [(t, *lp) for t, lp in zip(job.tokens[1:], job.prompt_logprobs)]
        return Generated(text, "stop" if stopped or eog else "length", n, steps, prompt_steps)


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
            route = self.path.rstrip("/")
            if route == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": gen.model_name, "object": "model", "owned_by": "fvpatch"}]})
            elif route == "/tokenizer_info":
                self._json(200, tokenizer_info(gen.session))
            else:
                self._error(404, f"no such endpoint: GET {self.path}")

        def do_POST(self):
            route = self.path.rstrip("/")
            if route not in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
                return self._error(404, f"no such endpoint: POST {self.path}")
            chat = route.endswith("chat/completions")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise BadRequest(f"the request body must be JSON of 1 byte to {MAX_BODY} bytes")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                if route in ("/tokenize", "/detokenize"):
                    return self._json(200, tokenizer_call(gen.session, route, body))
                req = gen.read(body, chat)
            except json.JSONDecodeError as e:
                return self._error(400, f"the request body is not JSON ({e})")
            except (FvpatchError, ValueError, IndexError) as e:
                return self._error(400, str(e).splitlines()[0])
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            base = {"id": rid, "created": int(time.time()), "model": gen.model_name}
            if req.stream:
                return self._stream(base, req)
            jobs = [gen.submit(req, tokens) for tokens in req.prompts]  # all at once, so free slots take them together
            try:
                got = [gen.collect(job, req) for job in jobs]
            except FvpatchError as e:  # found only while decoding
                return self._error(400, str(e).splitlines()[0])
            finally:
                for job in jobs:  # those not collected when an earlier one failed
                    job.cancel()
            n_prompt, n_out = sum(len(t) for t in req.prompts), sum(g.n_tokens for g in got)
            self._json(200, base | {"object": "chat.completion" if chat else "text_completion",
                                    "choices": [choice_json(gen.session, req, i, g) for i, g in enumerate(got)],
                                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}})

        def _stream(self, base: dict, req: Request):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            kind = "chat.completion.chunk" if req.chat else "text_completion"

            def send(choice):
                self.wfile.write(f"data: {json.dumps(base | {'object': kind, 'choices': [choice]}, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()

            if req.chat:
                send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            piece = (lambda t: {"index": 0, "delta": {"content": t}, "finish_reason": None}) if req.chat else \
                    (lambda t: {"index": 0, "text": t, "logprobs": None, "finish_reason": None})
            try:
                got = gen.collect(gen.submit(req, req.prompts[0]), req, lambda t: send(piece(t)))
            except (BrokenPipeError, ConnectionResetError):  # the client left; collect has freed its slot
                self.close_connection = True
                return
            except FvpatchError as e:  # the status line is sent: the error goes in the stream, as OpenAI's API does
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e).splitlines()[0], 'type': 'invalid_request_error'}})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True
                return
            send({"index": 0, "delta": {}, "finish_reason": got.finish} if req.chat else {"index": 0, "text": "", "logprobs": None, "finish_reason": got.finish})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def tokenizer_info(session: Session) -> dict:
    """vLLM's /tokenizer_info: what lm-evaluation-harness reads to tokenize through the server."""
    special = lambda t: None if t is None else session.piece(t, special=True).decode("utf-8", "replace")  # noqa: E731
    return {"eos_token": special(session.eos), "bos_token": special(session.bos), "pad_token": None,
            "chat_template": session.chat_template(), "model_max_length": session.n_ctx}


def tokenizer_call(session: Session, route: str, body: dict) -> dict:
    """vLLM's /tokenize ({"prompt", "add_special_tokens"} -> {"tokens"}) and /detokenize ({"tokens"} -> {"prompt"}).
    Control tokens written as text (<eos>) read as themselves, as lm-evaluation-harness expects of them."""
    if route == "/tokenize":
        prompt, add = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str) or not isinstance(add, bool):
            raise BadRequest("/tokenize takes {\"prompt\": \"...\", \"add_special_tokens\": true}")
        tokens = session.tokenize(prompt, add_bos=add, special=True) if prompt else []
        return {"tokens": tokens, "count": len(tokens), "max_model_len": session.n_ctx}
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(type(t) is int and 0 <= t < session.n_vocab for t in tokens)):
        raise BadRequest(f"/detokenize takes {{\"tokens\": [ids from 0 to {session.n_vocab - 1}]}}")
    return {"prompt": session.detokenize(tokens)}


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
