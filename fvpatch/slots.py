"""Generation requests decoded together: each in its own sequence of one llama.cpp context, each with only its
own patches, so one loaded model serves several clients and several vectors at once.

One worker thread owns the session. Each step decodes, in one batch, the next token of every request that is
generating and as much of the waiting prompts as the batch has room for, every row patched where a one-prompt
`Session.run` would patch it; then each request's next token is sampled from its own logits. A request gets a
sequence (a slot) when one is free and the KV cache has room for its prompt plus `max_tokens`, in order of
arrival. Batched, rows go through llama.cpp's quantized kernels in other groupings than alone, so on a 4-bit
model a logit can move by up to about one (README, "Batched evaluation"): a near-tie can flip a greedy token.
With one slot every request runs alone, exactly as `Session.run` runs it.
"""

import queue
import threading
from collections import deque

import numpy as np

from fvpatch.errors import FvpatchError
from fvpatch.scoring import log_softmax, sample
from fvpatch.session import Patch, Session, check_fits, token_plan
from fvpatch.specs import check_generation, check_overlaps, is_index

_END = object()


class Job:
    """One request. Iterating it yields its generated tokens as they come, and raises what failed its decode.
    With `top_logprobs` set, `logprobs[i]` holds the i-th token's log-probability and the `top_logprobs` most
    likely (token, log-probability) pairs, from the logits before any temperature; it is filled before the
    token is yielded. With `echo` too, `prompt_logprobs[i]` holds the same for prompt token i + 1, filled
    before the first token is yielded."""

    def __init__(self, tokens: list[int], actions: list, every: list[Patch], max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, top_logprobs: int | None, echo: bool):
        self.tokens, self.actions, self.every = tokens, actions, every
        self.max_tokens, self.temperature, self.top_p, self.top_logprobs = max_tokens, temperature, top_p, top_logprobs
        self.echo = echo and top_logprobs is not None
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.rng = np.random.default_rng(seed)  # None: fresh entropy, as a request without a seed expects
        self.seq: int | None = None
        self.fed = 0  # prompt tokens decoded so far
        self.generated: list[int] = []
        self.cancelled = False
        self._out: queue.Queue = queue.Queue()

    def __iter__(self):
        while (item := self._out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self):
        """Generate no more (a stop string came, or the client left); the slot frees at the worker's next step."""
        self.cancelled = True


class Slots:
    def __init__(self, session: Session, n_slots: int = 4, graph: dict[str, int | None] | None = None):
        """`graph`: the session's `graph_tensors()`, which submit checks patches against; computed (one short decode)
        when not given."""
        if not 1 <= n_slots <= session.n_seq:
            raise FvpatchError(f"parallel slots must be 1 to {session.n_seq} (the sequences this context holds), got {n_slots}")
        if session._slots is not None:
            raise FvpatchError("this session already serves Slots; close them first")
        if graph is None:
            graph = session.graph_tensors() if session.hooks else {}
        self.session, self.graph = session, graph
        self._free = list(range(n_slots))
        self._active: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._reserved = 0  # KV cells promised to the active jobs
        self._wake = threading.Condition()
        self._closed = False
        session.forget()
        self.worker = threading.Thread(target=self._work, name="fvpatch-slots", daemon=True)
        session._slots = self  # from now on only the worker decodes (fvpatch.exclusive)
        self.worker.start()

    def submit(self, tokens: list[int], patches: list[Patch], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = 0, top_logprobs: int | None = None, echo: bool = False) -> Job:
        """Queue a request whose tokens and patches are checked here (`Session.check_tensor_name`, `check_fits`,
        `resolve_position`): one bad request must not fail the batch it would join. Iterate the job for its tokens."""
        s = self.session
        tokens = s.check_tokens(tokens)
        n = len(tokens)
        # everything a decode or a sample could fail on, checked here: a failure inside a step fails the whole batch
        check_generation(max_tokens, temperature, top_p, least=1)
        if top_logprobs is not None and not (is_index(top_logprobs) and 0 <= top_logprobs <= s.n_vocab):
            raise FvpatchError(f"top_logprobs must be a whole number from 0 to {s.n_vocab}, got {top_logprobs!r}")
        if patches:
            s.check_hooks("patches need")
        for p in patches:
            s.check_tensor_name(p.tensor)
            check_fits(p.tensor, p.vector.size, self.graph)
        if not n or max_tokens < 1 or n + max_tokens > s.n_ctx:
            raise FvpatchError(f"a request needs a prompt and 1 to {s.n_ctx - n} new tokens (context {s.n_ctx}); got {n} and {max_tokens}")
        placed = [(p, pos) for p in patches for pos in s.patch_positions(p, n, range(n))]
        every = [p for p in patches if p.generated or p.all_tokens]
        check_overlaps([*placed, *((p, "each generated token") for p in every)])
        job = Job(list(tokens), [("patch", p, pos) for p, pos in placed], every, max_tokens, temperature, top_p, seed, top_logprobs, echo)
        with self._wake:
            if self._closed:
                raise FvpatchError("the slots are closed")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def close(self):
        """Fail what is queued or running, and stop the worker: the session is free again when this returns."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self.worker.is_alive():
            self.worker.join()
        if self.session._slots is self:
            self.session._slots = None

    def _work(self):
        while True:
            with self._wake:
                while not (self._closed or self._waiting or self._active):
                    self._wake.wait()
                if self._closed:
                    for job in [*self._active, *self._waiting]:
                        self._finish(job, FvpatchError("the slots were closed before this request finished"))
                    return
                self._admit()
            for job in [j for j in self._active if j.cancelled]:
                self._finish(job)
            if not self._active:
                continue
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the decode's jobs hear of it; the server goes on
                for job in list(self._active):
                    self._finish(job, e)

    def _admit(self):
        while self._waiting and self._free:
            job = self._waiting[0]
            need = len(job.tokens) + job.max_tokens
            if self._reserved + need > self.session.n_ctx:
                break  # in order of arrival: it waits for cells to free up, and those behind it wait too
            self._waiting.popleft()
            job.seq = self._free.pop(0)
            self._reserved += need
            self._active.append(job)

    def _step(self):
        s = self.session
        entries, outputs, plan, sample_at, scored = [], set(), {}, {}, {}

        def add(part: dict):
            for name, acts in part.items():
                plan.setdefault(name, []).extend(acts)

        for job in self._active:
            if job.fed == len(job.tokens):  # generating: feed back its last token
                row, pos = len(entries), len(job.tokens) + len(job.generated) - 1
                entries.append((job.generated[-1], pos, job.seq))
                add(token_plan(job.every, pos, row))
                outputs.add(row)
                sample_at[job] = row
        for job in self._active:
            room = s.n_ubatch - len(entries)
            if job.fed < len(job.tokens) and room > 0:
                n, start, base = len(job.tokens), job.fed, len(entries)
                end = min(n, start + room)
                entries += [(job.tokens[i], i, job.seq) for i in range(start, end)]
                part, rows = s.prompt_plan(job.actions, start, end, n, base)
                add(part)
                outputs |= rows
                if job.echo:  # every prompt row's logits, to score the token after it
                    outputs |= set(range(base, base + end - start))
                    scored[job] = (base, start, end)
                if end == n:
                    sample_at[job] = base + n - 1 - start
                job.fed = end
        s.decode(entries, outputs, plan)
        for job, (base, start, end) in scored.items():  # row by row: a batch of rows over a large vocabulary is GBs
            try:
                for pos in range(start, min(end, len(job.tokens) - 1)):
                    job.prompt_logprobs.append(scores(s.row_logits(base + pos - start), job.tokens[pos + 1], job.top_logprobs))
            except FvpatchError as e:  # this job's vector broke its logits; the others in the batch go on
                sample_at.pop(job, None)
                self._finish(job, e)
        for job, row in sample_at.items():
            try:
                logits = s.row_logits(row)
            except FvpatchError as e:
                self._finish(job, e)
                continue
            tok = sample(logits, job.temperature, job.rng, job.top_p)
            if job.top_logprobs is not None:  # a few ms over a large vocabulary: only when asked
                job.logprobs.append(scores(logits, tok, job.top_logprobs))
            job.generated.append(tok)
            job._out.put(tok)
            if s.is_eog(tok) or len(job.generated) == job.max_tokens:
                self._finish(job)

    def _finish(self, job: Job, error: BaseException | None = None):
        if job.seq is not None:
            self._active.remove(job)
            self.session.forget(job.seq)
            self._free.append(job.seq)
            self._reserved -= len(job.tokens) + job.max_tokens
            job.seq = None
        job._out.put(error if error is not None else _END)


def scores(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under `logits`, and the `k` likeliest tokens' (token, log-probability), best first."""
    lp = log_softmax(logits)
    top = np.argpartition(-lp, k)[:k]
    return float(lp[token]), [(int(t), float(lp[t])) for t in top[np.argsort(-lp[top])]]
