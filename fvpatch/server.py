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
import select
import socket
import time
import traceback
import uuid
from bisect import bisect_left
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from fvpatch.errors import FvpatchError
from fvpatch.openai_api import MAX_BODY, BadRequest, Generated, Request, choice_json, chunk_json, parse_vectors, read_request
from fvpatch.session import Session
from fvpatch.slots import Job, Slots

GET_ROUTES = ("/v1/models", "/tokenizer_info", "/health")
POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


class ClientGone(Exception):
    pass


class Refused(Exception):
    """A request turned away before its body was read: the reply closes the connection, since what follows on
    it would be that body, not the next request."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Generator:
    """Turns checked requests into jobs on the session's slots, and a job's tokens into text under stop strings."""

    def __init__(self, session: Session, model_name: str, parallel: int, vectors: list[dict], vector_dir: Path):
        self.session = session
        self.model_name = model_name
        self.created = int(time.time())
        self.graph = session.graph_tensors()
        parse_vectors(session, vectors, self.graph)  # a bad default vector stops the server before it starts
        self.vectors = vectors
        self.vector_dir = Path(vector_dir).resolve()
        self.parallel = parallel
        self.slots = Slots(session, parallel, self.graph)

    def read(self, body: dict, chat: bool) -> Request:
        return read_request(self.session, body, chat, self.graph, self.vectors, self.vector_dir, self.parallel)

    def submit(self, req: Request) -> list[Job]:
        """One job per choice, all at once, so free slots take them together; each choice draws with its own seed
        (the request's plus the choice's index)."""
        jobs = []
        try:
            for i, tokens in enumerate(req.prompts):
                for j in range(req.n):
                    jobs.append(self.slots.submit(tokens, req.patches, max(req.max_tokens, 1), req.temperature, req.top_p,
                                                  None if req.seed is None else req.seed + i * req.n + j, req.top_logprobs, req.echo))
        except Exception:
            for job in jobs:  # queued before one was refused: nobody would read them, and they would hold slots
                job.cancel()
            raise
        return jobs

    def collect(self, job: Job, req: Request, emit=None, gone=lambda: False) -> Generated:
        """The job's completion, calling emit(text, steps, offsets) as text arrives, with the log-probabilities of
        the tokens that began in it; never a stop string, nor the start of one. Raises ClientGone when gone()."""
        s = self.session
        if req.max_tokens == 0:  # only the echoed prompt's scores: the one token decoded for them is not the client's
            for _ in job:
                pass
            scored = req.top_logprobs is not None
            return Generated("", "length", 0, [] if scored else None, self._prompt_steps(job) if scored else None)
        pieces: list[bytes] = []
        starts: list[int] = []  # where each token's text begins, never decreasing
        steps: list[tuple] = []
        sent, text, stopped, n, eog = 0, "", False, 0, False

        def flush(upto: int, final: bool = False):
            """Send text up to `upto`, with the tokens that began before it (at the end, every token kept: past a stop
            string only those that began before it, since their text is, in part, the client's)."""
            nonlocal sent
            k = len(starts) if final and not stopped else bisect_left(starts, upto)
            new = [(job.generated[i], *job.logprobs[i]) for i in range(len(steps), k)] if req.top_logprobs is not None else []
            if emit is not None and (upto > sent or new):
                emit(text[sent:upto], new, starts[len(steps):len(steps) + len(new)])
            steps.extend(new)
            sent = max(sent, upto)

        try:
            for tok in job:
                n += 1
                if gone():
                    raise ClientGone
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
                    flush(len(text) - held)
                if stopped:
                    break
        finally:
            job.cancel()  # a stop string came, or the client left: free the slot
        flush(len(text), final=True)  # what was held back, now that no stop string came
        return Generated(text, "stop" if stopped or eog else "length", n, steps if req.top_logprobs is not None else None,
                         self._prompt_steps(job) if req.echo and req.top_logprobs is not None else None)

    @staticmethod
    def _prompt_steps(job: Job) -> list[tuple]:
        return [(job.tokens[0], None, None)] + [(t, *lp) for t, lp in zip(job.tokens[1:], job.prompt_logprobs)]


def make_handler(gen: Generator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds a socket may stall: a body that never arrives, a client that never reads its stream

        def log_message(self, fmt, *args):  # one line per request on stderr, as llama-server does
            if not getattr(self.server, "quiet", False):
                super().log_message(fmt, *args)

        def end_headers(self):  # browser chat UIs on other origins may call it, as they may call llama-server
            self.send_header("Access-Control-Allow-Origin", "*")
            super().end_headers()

        def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None):
            data = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, allow: str | None = None):
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._json(status, {"error": {"message": message, "type": kind, "code": status}}, {"Allow": allow} if allow else None)

        def _internal_error(self, e: Exception):
            """A bug: its traceback on stderr, and a JSON 500 rather than a connection dropped without a word."""
            traceback.print_exc()
            self.close_connection = True
            self._error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

        def _route(self) -> str:
            return urlsplit(self.path).path.rstrip("/") or "/"

        def do_GET(self):
            if not self._skip_body():
                return
            route = self._route()
            model = {"id": gen.model_name, "object": "model", "created": gen.created, "owned_by": "fvpatch"}
            if route == "/v1/models":
                self._json(200, {"object": "list", "data": [model]})
            elif route == f"/v1/models/{gen.model_name}":
                self._json(200, model)
            elif route == "/tokenizer_info":
                self._json(200, tokenizer_info(gen.session))
            elif route == "/health":
                self._json(200, {"status": "ok"})
            elif route in POST_ROUTES:
                self._error(405, f"{route} takes POST", allow="POST, OPTIONS")
            else:
                self._error(404, f"no such endpoint: GET {route}")

        do_HEAD = do_GET

        def do_OPTIONS(self):  # a browser's preflight before a cross-origin POST with a JSON body
            if not self._skip_body():
                return
            self.send_response(204)
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", self.headers.get("Access-Control-Request-Headers") or "Content-Type, Authorization")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _not_allowed(self):
            self.close_connection = True  # its body, if any, is unread
            self._error(405, f"{self.command} is not supported; the API takes GET and POST", allow="GET, POST, OPTIONS")

        do_PUT = do_DELETE = do_PATCH = _not_allowed

        def _body(self, required: bool = True) -> bytes:
            """The request's body, read whole, so that what follows on the connection is the next request."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise Refused(411, "send the request body with a Content-Length; chunked bodies are not read")
            if self.headers.get("Content-Length") is None:
                if required:  # the body, if one follows, would be read as the next request
                    raise Refused(411, "a POST needs a Content-Length")
                return b""
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                raise Refused(400, "Content-Length is not a number") from None
            if not 0 <= length <= MAX_BODY:
                raise Refused(413, f"the request body must be at most {MAX_BODY} bytes")
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                raise Refused(408, f"the request body did not arrive within {self.timeout} s") from None
            if len(raw) < length:
                raise Refused(400, f"the request body ended after {len(raw)} of its {length} bytes")
            return raw

        def _skip_body(self) -> bool:
            """Read and drop a body sent where none is used (GET, HEAD, OPTIONS); False once refused."""
            try:
                self._body(required=False)
                return True
            except Refused as e:
                self.close_connection = True
                self._error(e.status, str(e))
                return False

        def _gone(self) -> bool:
            """The client has closed its end: its socket reads as ended (a pipelined request would read as data)."""
            try:
                ready, _, _ = select.select([self.connection], [], [], 0)
                return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def do_POST(self):
            try:
                raw = self._body()
            except Refused as e:
                self.close_connection = True
                return self._error(e.status, str(e))
            route = self._route()
            if route in GET_ROUTES or route == f"/v1/models/{gen.model_name}":
                return self._error(405, f"{route} takes GET", allow="GET, HEAD, OPTIONS")
            if route not in POST_ROUTES:
                return self._error(404, f"no such endpoint: POST {route}")
            chat = route.endswith("chat/completions")
            try:
                try:
                    body = json.loads(raw) if raw else None
                except UnicodeDecodeError:
                    raise BadRequest("the request body is not UTF-8 JSON") from None
                except (ValueError, RecursionError) as e:
                    raise BadRequest(f"the request body is not JSON ({str(e)[:80] if isinstance(e, ValueError) else 'nested too deep'})") from None
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                if route in ("/tokenize", "/detokenize"):
                    return self._json(200, tokenizer_call(gen.session, route, body))
                req = gen.read(body, chat)
            except (FvpatchError, ValueError, IndexError) as e:
                return self._error(400, str(e).splitlines()[0])
            except Exception as e:  # noqa: BLE001
                return self._internal_error(e)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            base = {"id": rid, "created": int(time.time()), "model": gen.model_name}
            try:
                if req.stream:
                    return self._stream(base, req)
                self._complete(base, req)
            except (ClientGone, BrokenPipeError, ConnectionResetError):  # the client left; its slots are freed
                self.close_connection = True
            except Exception as e:  # noqa: BLE001
                self._internal_error(e)

        def _complete(self, base: dict, req: Request):
            try:
                jobs = gen.submit(req)
            except FvpatchError as e:  # read_request checks all that submit does; a refusal here is still the request's
                return self._error(400, str(e).splitlines()[0])
            try:
                got = [gen.collect(job, req, gone=self._gone) for job in jobs]
            except FvpatchError as e:  # found only while decoding
                return self._error(400, str(e).splitlines()[0])
            finally:
                for job in jobs:  # those not collected when an earlier one failed
                    job.cancel()
            n_prompt, n_out = sum(len(t) for t in req.prompts), sum(g.n_tokens for g in got)
            self._json(200, base | {"object": "chat.completion" if req.chat else "text_completion",
                                    "choices": [choice_json(gen.session, req, i, g) for i, g in enumerate(got)],
                                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}})

        def _stream(self, base: dict, req: Request):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            kind = "chat.completion.chunk" if req.chat else "text_completion"
            usage = {"usage": None} if req.include_usage else {}

            def send(payload: dict):
                self.wfile.write(f"data: {json.dumps(base | {'object': kind} | payload, ensure_ascii=False, allow_nan=False)}\n\n".encode())
                self.wfile.flush()

            if req.chat:
                send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]} | usage)
            try:
                (job,) = gen.submit(req)
                got = gen.collect(job, req, lambda text, steps, offsets: send({"choices": [chunk_json(gen.session, req, text, steps, offsets)]} | usage), self._gone)
            except (ClientGone, BrokenPipeError, ConnectionResetError):
                raise
            except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream, as OpenAI's API does
                if not isinstance(e, FvpatchError):
                    traceback.print_exc()
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e).splitlines()[0] if str(e) else type(e).__name__, 'type': 'invalid_request_error' if isinstance(e, FvpatchError) else 'server_error'}})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                return
            send({"choices": [chunk_json(gen.session, req, "", [], [], got.finish)]} | usage)
            if req.include_usage:
                n_prompt = len(req.prompts[0])
                send({"choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": got.n_tokens, "total_tokens": n_prompt + got.n_tokens}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

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
        tokens = session.tokenize(prompt, add_bos=add) if prompt else []
        return {"tokens": tokens, "count": len(tokens), "max_model_len": session.n_ctx}
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(type(t) is int and 0 <= t < session.n_vocab for t in tokens)):
        raise BadRequest(f"/detokenize takes {{\"tokens\": [ids from 0 to {session.n_vocab - 1}]}}")
    return {"prompt": session.detokenize(tokens)}


class VectorServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 resets clients that connect together while the threads are busy

    def server_close(self):
        super().server_close()
        self.generator.slots.close()  # after this the session is free for its owner to close


def make_server(session: Session, host: str = "127.0.0.1", port: int = 8080, model_name: str | None = None,
                quiet: bool = False, parallel: int = 1, vectors: list[dict] = (), vector_dir: str | Path = ".") -> VectorServer:
    """A server bound to host:port (port 0 picks a free one) that decodes up to `parallel` requests together,
    and gives `vectors` (a request's "vectors" field) to every request that names none; a request may name
    shipped vectors and files inside `vector_dir`. Call serve_forever(), then shutdown() and server_close() to stop."""
    gen = Generator(session, model_name or session.path.stem, parallel, list(vectors), vector_dir)
    server = VectorServer((host, port), make_handler(gen))
    server.generator = gen
    server.quiet = quiet
    return server
