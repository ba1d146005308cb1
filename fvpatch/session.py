"""A GGUF model loaded in llama.cpp whose decodes can save and patch rows of named graph tensors.

The prompt is decoded in chunks of at most one ubatch, so every callback knows exactly which absolute
token positions its rows hold. Save/patch specs name absolute prompt positions (negative: from the end
of the prompt); patches apply to the prompt pass and, when asked, at every generated token.
"""

import ctypes
import threading
from typing import Callable
from pathlib import Path

import llama_cpp as ll
import numpy as np

from fvpatch import ggml, signals
from fvpatch.errors import FvpatchError, OutOfRange
from fvpatch.exclusive import exclusive
from fvpatch.modelfile import ModelFile
from fvpatch.names import layer_of
from fvpatch.scoring import BatchedScoring, sample
from fvpatch.threads import MAX_THREADS, configured_threads, default_threads
from fvpatch.specs import Patch, Result, Save, check_generation, check_overlaps, is_index  # noqa: F401 - Patch, Save, Result: the API names them `from fvpatch.session`


MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: it refuses a context of more sequences


class Session(BatchedScoring, ModelFile):
    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 2048,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        hooks: bool = True,
        n_seq: int = 32,
        exact: bool = False,
    ):
        """`hooks=False` opens the model without the eval callback: plain generation at full speed, no save/patch.
        `n_seq` bounds how many sequences `answer_logprobs` packs into one decode. `exact=True` keeps K and V
        in f32 and turns flash attention off (which rounds Q to f16): slower, but an f32 model then matches an
        f32 reference to float rounding. `n_threads` defaults to $FVPATCH_THREADS or $OMP_NUM_THREADS when set
        (fvpatch.threads; the setting PyTorch's threads follow too), else half the cores. llama.cpp shrinks its batch
        to a context smaller than `n_ubatch`; prompts are then decoded in chunks of that batch."""
        if not (is_index(n_ubatch) and n_ubatch >= 1 and is_index(n_seq) and n_seq >= 1):
            raise FvpatchError(f"n_ubatch and n_seq must be whole numbers of at least 1, got {n_ubatch!r} and {n_seq!r}")
        super().__init__(path, n_gpu_layers=n_gpu_layers)

        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ubatch
        cparams.n_ubatch = n_ubatch
        # llama.cpp asserts (aborting the process) unless the sequences' outputs fit a batch, which it caps at n_ctx
        cparams.n_seq_max = self.n_seq = max(1, min(n_seq, n_ubatch, n_ctx, MAX_SEQ))
        cparams.kv_unified = True  # sequences share the cache cells, so one sequence can still use all of n_ctx
        if exact:
            cparams.type_k = cparams.type_v = ll.GGML_TYPE_F32
            cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if n_threads is not None and not (is_index(n_threads) and 1 <= n_threads <= MAX_THREADS):
            raise FvpatchError(f"n_threads must be a whole number from 1 to {MAX_THREADS}, got {n_threads!r}")
        self.n_threads = n_threads or configured_threads() or default_threads()
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        self.hooks = hooks
        if hooks:
            self._callback = ll.ggml_backend_sched_eval_callback(self._on_eval)  # kept alive with the session
            cparams.cb_eval = self._callback
            cparams.cb_eval_user_data = None
        with signals.held():  # llama.cpp logs through a Python callback meanwhile
            self._ctx_ptr = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx_ptr:
            raise FvpatchError(f"llama.cpp could not create a context of {n_ctx} tokens for {self.path} (too large for memory?)")
        self.n_ctx = ll.llama_n_ctx(self._ctx)
        # a decode of more tokens than the batch llama.cpp really has (min(n_ctx, n_batch)) aborts the process
        self.n_ubatch = min(ll.llama_n_batch(self._ctx), ll.llama_n_ubatch(self._ctx))
        self._batch = ll.llama_batch_init(self.n_ubatch, 0, 1)

        # state read by the callback during one decode
        self._watch: set[bytes] = set()  # every tensor name a spec of this run mentions
        self._plan: dict[bytes, list] = {}  # tensor name -> actions for the chunk being decoded
        self._seen: set[bytes] = set()
        self._record_all: dict[str, int | None] | None = None  # name -> row width of every node, when graph_tensors asks
        self._record_rows = 0  # the tokens of graph_tensors' decode
        self._error: BaseException | None = None
        self._lock = threading.RLock()  # one decode at a time (fvpatch.exclusive); close takes it before the model's
        self._in_callback = None  # the thread inside run()'s on_token, which may not use the session meanwhile
        self._slots = None  # the fvpatch.slots.Slots serving from this session, whose worker alone then decodes

    # ---- the eval callback --------------------------------------------------------------------

    def _on_eval(self, t, ask, _user):
        # ctypes swallows exceptions raised here and llama.cpp would then return zeros as if all went
        # well, so every error is kept and re-raised by _decode once llama_decode returns.
        try:
            name = ggml.tensor_name(t)
            if ask:
                if self._record_all is not None:
                    ne, key = ggml.TensorHead.from_address(t).ne, name.decode("utf-8", "replace")
                    rows = ne[2] == ne[3] == 1 and ne[1] in (self._record_rows, 1)  # 1: the last block's output row
                    self._record_all[key] = ne[0] if rows and key not in self._record_all else None
                if name in self._watch:
                    if name in self._seen_this_decode:
                        raise FvpatchError(f"tensor {name.decode()!r} appears more than once in the graph; fvpatch cannot tell which one is meant")
                    self._seen_this_decode.add(name)
                    return name in self._plan
                return False
            tensor = ggml.RowTensor(t, name.decode())
            for action, spec, bi, pos in self._plan[name]:
                row = self._row_of(tensor, bi)
                if action == "save":
                    self._saved_rows[(spec.tensor, pos)] = tensor.read(row)
                else:
                    vec = spec.vector * np.float32(spec.scale)
                    tensor.write(row, vec, add=spec.mode == "add")
                self._done += 1
        except BaseException as e:  # noqa: BLE001 - re-raised after the decode
            if self._error is None:
                self._error = e
        return True

    def _row_of(self, tensor: "ggml.RowTensor", bi: int) -> int:
        """The row of batch entry `bi` in a computed tensor."""
        if tensor.n_rows == self._n_entries:
            return bi
        if tensor.n_rows == len(self._outputs) and bi in self._outputs:
            # llama.cpp keeps only the output rows after the last layer's get_rows
            return self._outputs.index(bi)
        raise FvpatchError(f"tensor {tensor.name!r} has {tensor.n_rows} rows in a ubatch of {self._n_entries} tokens; cannot find entry {bi}")

    def _decode(self, entries: list[tuple[int, int, int]], outputs: set[int], plan: dict[bytes, list]):
        """One llama_decode of (token, position, sequence) entries, at most one ubatch, so rows are entries."""
        if len(entries) > self.n_ubatch:  # the batch's C arrays hold n_ubatch entries: more would write past them
            raise FvpatchError(f"a decode takes at most {self.n_ubatch} tokens, got {len(entries)}")
        ctx = self._ctx  # a closed session's batch is freed memory: refuse before writing into it
        b = self._batch
        for i, (tok, pos, seq) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = i in outputs
        b.n_tokens = len(entries)
        self._plan, self._n_entries, self._outputs = plan, len(entries), sorted(outputs)
        self._seen_this_decode = set()
        self._done = 0
        rc = ll.llama_decode(ctx, b)
        self._seen |= self._seen_this_decode
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc})")
        _check_fired(set(plan) - self._seen_this_decode)
        planned = sum(len(v) for v in plan.values())
        if self._done != planned:
            raise RuntimeError(f"only {self._done} of {planned} save/patch actions ran in this decode")

    @exclusive
    def row_logits(self, batch_index: int) -> np.ndarray:
        if not -self.n_ubatch <= batch_index < self.n_ubatch:  # ctypes would wrap a larger one into int32
            raise FvpatchError(f"batch row {batch_index} is outside a batch of {self.n_ubatch}")
        ptr = ll.llama_get_logits_ith(self._ctx, batch_index)
        if not ptr:
            raise FvpatchError(f"batch row {batch_index} has no logits: the last decode did not ask for that row's")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        # a residual blown up by a huge vector comes out as NaN or inf, or (Gemma) as logits all equal, which would be
        # read as token 0 and scores of NaN: garbage that looks like an answer
        lo, hi = logits.min(), logits.max()  # NaN comes out of either; two passes instead of a third for isfinite
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo == hi:
            raise FvpatchError("the model's logits are not finite, or all equal: a patched vector is too large for this model; give a smaller scale")
        return logits

    # ---- public -------------------------------------------------------------------------------

    def check_hooks(self, needs: str):
        """Refuse what `needs` the eval callback ("patches need") on a session opened with hooks=False."""
        if not self.hooks:
            raise FvpatchError(f"this session was opened with hooks=False; {needs} the eval callback")

    def check_tensor_name(self, name: str):
        layer = layer_of(name)
        if layer is not None and layer >= self.n_layer:
            raise OutOfRange(f"layer {layer} in {name!r} is beyond this model's {self.n_layer} layers (0..{self.n_layer - 1})")

    def resolve_position(self, idx: int, n_prompt: int) -> int:
        pos = idx + n_prompt if idx < 0 else idx
        if not 0 <= pos < n_prompt:
            raise OutOfRange(f"token index {idx} is outside the prompt of {n_prompt} tokens (valid: {-n_prompt}..{n_prompt - 1})")
        return pos

    def patch_positions(self, p: Patch, n_prompt: int, outputs) -> list[int]:
        """The prompt positions a patch applies to. At the last block, only the rows of `outputs` (the positions
        whose logits are kept) exist: llama.cpp drops the others before it, and so adds a control vector there only."""
        if not p.all_tokens:
            return [self.resolve_position(p.token, n_prompt)]
        if layer_of(p.tensor) == self.n_layer - 1:
            return [i for i in outputs if i < n_prompt]
        return list(range(n_prompt))

    def prompt_plan(self, actions: list[tuple[str, Save | Patch, int]], start: int, end: int, n_prompt: int, base: int = 0):
        """The callback's plan and the output rows for decoding prompt positions [start, end) into batch rows from
        `base`, for (action, spec, absolute position) actions. Output rows: the prompt's last token, when in the
        chunk, and every row acted on past the last block, where llama.cpp keeps output rows only."""
        plan: dict[bytes, list] = {}
        for action, spec, pos in actions:
            if start <= pos < end:
                plan.setdefault(spec.tensor.encode(), []).append((action, spec, base + pos - start, pos))
        # earlier tensors have every row anyway, and an output row costs a projection onto the whole vocabulary
        outputs = {bi for name, acts in plan.items() if layer_of(name.decode()) in (None, self.n_layer - 1) for _, _, bi, _ in acts}
        if start <= n_prompt - 1 < end:
            outputs.add(base + n_prompt - 1 - start)
        return plan, outputs

    @exclusive
    def decode(self, entries: list[tuple[int, int, int]], outputs: set[int], plan: dict[bytes, list]):
        """One decode of (token, position, sequence) entries, at most one ubatch, on top of what the KV cache
        holds, with the callback's `plan` (`prompt_plan`, `token_plan`); `row_logits` then reads the `outputs`
        rows' logits, until the next decode."""
        self.check_tokens([tok for tok, _, _ in entries], "decode")
        self._watch, self._seen = set(plan), set()
        self._decode(entries, outputs, plan)

    @exclusive
    def forget(self, seq: int | None = None):
        """Drop one sequence from the KV cache (None: all of them)."""
        if seq is not None and not (is_index(seq) and 0 <= seq < self.n_seq):  # llama.cpp asserts, aborting the process
            raise FvpatchError(f"sequence {seq!r} is not one of this session's 0 to {self.n_seq - 1}")
        mem = ll.llama_get_memory(self._ctx)
        if seq is None:
            ll.llama_memory_clear(mem, True)
        else:
            ll.llama_memory_seq_rm(mem, seq, -1, -1)

    @exclusive
    def set_control_vector(self, directions: np.ndarray | None):
        """Load (n_layer - 1, n_embd) directions for blocks 1.. through llama.cpp's own control-vector API,
        which adds them to l_out-N at every token; None removes them."""
        if directions is None:
            rc = ll.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
        else:
            data = np.ascontiguousarray(directions, np.float32)
            if data.shape != (self.n_layer - 1, self.n_embd):
                raise ValueError(f"control-vector directions of shape {data.shape}; this model needs ({self.n_layer - 1}, {self.n_embd})")
            if not np.isfinite(data).all():
                raise FvpatchError("control-vector directions hold NaN or inf")
            ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = ll.llama_set_adapter_cvec(self._ctx, ptr, data.size, self.n_embd, 1, self.n_layer - 1)
        if rc != 0:
            raise RuntimeError(f"llama.cpp refused the control vector (code {rc})")

    @exclusive
    def run(
        self,
        prompt: str | list[int],
        saves: list[Save] = (),
        patches: list[Patch] = (),
        max_tokens: int = 0,
        all_logits: bool = False,
        temperature: float = 0.0,
        seed: int = 0,
        on_token: Callable[[int], bool] | None = None,
    ) -> Result:
        """Decode `prompt` with saves and patches, then generate `max_tokens` tokens (greedy unless temperature > 0).
        A row that is both saved and patched is saved as computed, before the patch writes it (later tensors see the patch).
        `on_token` sees each generated token as it comes (a server streams them) and ends generation by returning True."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else self.check_tokens(prompt)
        n = len(tokens)
        if n == 0:
            raise FvpatchError("the prompt is empty")
        check_generation(max_tokens, temperature)
        if n + max_tokens > self.n_ctx:
            raise FvpatchError(f"prompt ({n} tokens) plus {max_tokens} new tokens exceeds the context of {self.n_ctx}; raise --n-ctx")
        if saves or patches:
            self.check_hooks("save and patch need")
        for spec in (*saves, *patches):
            self.check_tensor_name(spec.tensor)
        # a row asked for twice (one tensor saved for two files, or tokens -1 and n-1) is saved, and returned, once
        save_at = list({(s.tensor, pos): (s, pos) for s in saves for pos in (self.resolve_position(i, n) for i in s.tokens)}.values())
        patch_at = [(p, pos) for p in patches for pos in self.patch_positions(p, n, range(n))]  # run() keeps the logits of every patched row
        every = [p for p in patches if p.generated or p.all_tokens]
        check_overlaps([*patch_at, *((p, "each generated token") for p in every)])
        self._watch = {s.tensor.encode() for s in (*saves, *patches)}
        self._seen = set()
        self._saved_rows = {}
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)

        prompt_logits = np.empty((n, self.n_vocab), np.float32) if all_logits else None
        # saves act first: a row saved where this run also patches it is saved as the model computed it, before the patch
        actions = [("save", s, pos) for s, pos in save_at] + [("patch", p, pos) for p, pos in patch_at]
        for start in range(0, n, self.n_ubatch):
            end = min(start + self.n_ubatch, n)
            plan, outputs = self.prompt_plan(actions, start, end, n)
            self._decode([(tokens[i], i, 0) for i in range(start, end)], set(range(end - start)) if all_logits else outputs, plan)
            if all_logits:
                for i in range(end - start):
                    prompt_logits[start + i] = self.row_logits(i)
        _check_fired(self._watch - self._seen)
        first_logits = prompt_logits[n - 1].copy() if all_logits else self.row_logits(-1)

        generated: list[int] = []
        logits = first_logits
        rng = np.random.default_rng(seed)
        for k in range(max_tokens):
            tok = sample(logits, temperature, rng)
            generated.append(tok)
            stop = self._callback_says(on_token, tok) if on_token else False
            if stop or self.is_eog(tok) or k == max_tokens - 1:
                break
            self._decode([(tok, n + k, 0)], {0}, token_plan(every, n + k, 0))
            logits = self.row_logits(-1)

        saved, saved_positions = {}, {}
        for s, pos in save_at:
            saved_positions.setdefault(s.tensor, []).append(pos)
        for name, positions in saved_positions.items():
            saved[name] = np.stack([self._saved_rows[(name, pos)] for pos in positions])
        return Result(tokens, generated, self.detokenize(generated), first_logits, saved, saved_positions, prompt_logits)

    @exclusive
    def graph_tensors(self, prompt: str = "Hello, world") -> dict[str, int | None]:
        """The nodes of one decode's compute graph, in compute order: name -> row width (a vector's length), or None
        where save and patch refuse the name: a tensor that is not one row per token (per-head views, 3-D and up),
        or a name that several nodes share. The prompt has several tokens (as many as one batch holds), so that a
        per-head view cannot pass for rows as it would in a 1-token decode."""
        self.check_hooks("listing the graph's tensors needs")
        if self.n_ubatch < 2:  # in a 1-token decode a per-head view of one head is one row, and would pass as a tensor to patch
            raise FvpatchError("listing the graph's tensors needs a batch of 2 or more tokens, and this context's holds 1; open it with n_ctx of 2 or more")
        self._record_all = {}
        tokens = self.tokenize(prompt)[: self.n_ubatch]  # one decode: a context under 512 tokens shrinks the batch
        self._record_rows = len(tokens)
        try:
            self.run(tokens)
            return self._record_all
        finally:
            self._record_all = None

    def _callback_says(self, on_token, tok: int) -> bool:
        self._in_callback = threading.current_thread()
        try:
            return on_token(tok)
        finally:
            self._in_callback = None

    @property
    def _ctx(self):
        if not getattr(self, "_ctx_ptr", None):
            raise FvpatchError(f"the session on {self.path.name} is closed")
        return self._ctx_ptr

    def close(self):
        """Free the context and the model; Slots still serving from the session are closed first."""
        if getattr(self, "_slots", None) is not None:
            self._slots.close()
        if getattr(self, "_ctx_ptr", None):
            with self._lock:  # after a decode in progress in another thread
                ll.llama_batch_free(self._batch)
                ll.llama_free(self._ctx_ptr)
                self._ctx_ptr = None
        super().close()


def _check_fired(never: set[bytes]):
    """A spec whose tensor never fires would be a silent no-op, the worst bug this tool can have."""
    if never:
        names = ", ".join(repr(n.decode()) for n in sorted(never))
        raise FvpatchError(
            f"tensor {names} never appeared in this model's compute graph "
            f"(names look like l_out-N, attn_norm-N, kqv_out-N, ffn_out-N; `fvpatch tensors` lists them)"
        )


def check_fits(tensor: str, width: int, graph: dict[str, int | None]):
    """Refuse, before any decode, a patch of `width` on `tensor` that `graph` (`Session.graph_tensors`) says would
    fail inside one: batched with other requests, a failing decode fails them all."""
    if tensor not in graph:
        raise FvpatchError(f"tensor {tensor!r} never appears in this model's compute graph (`fvpatch tensors` lists them)")
    if graph[tensor] is None:
        raise FvpatchError(f"tensor {tensor!r} is not one row per token, or several nodes share its name; fvpatch patches neither")
    if width != graph[tensor]:
        raise FvpatchError(f"vector of width {width} does not fit tensor {tensor!r} of width {graph[tensor]}")


def token_plan(patches: list[Patch], pos: int, row: int) -> dict[bytes, list]:
    """The callback's plan for one token fed after the prompt, at position `pos` in batch row `row`."""
    plan: dict[bytes, list] = {}
    for p in patches:
        plan.setdefault(p.tensor.encode(), []).append(("patch", p, row, pos))
    return plan
