"""A GGUF file loaded in llama.cpp: its facts (architecture, shape, quantization, vocabulary fingerprint)
and its tokenizer. Session builds on it to decode with save/patch callbacks."""

import ctypes
import hashlib
import os
import threading
from pathlib import Path

import llama_cpp as ll

from fvpatch import signals
from fvpatch.atomic import input_file
from fvpatch.errors import FvpatchError
from fvpatch.exclusive import locked
from fvpatch.specs import is_index

_log_sink = ll.llama_log_callback(lambda level, text, user: None)
_backend_ready = False


def _quiet_backend():
    """llama.cpp logs every tensor it loads; fvpatch reports its own errors instead."""
    global _backend_ready
    if not _backend_ready:
        ll.llama_backend_init()
        if not os.environ.get("FVPATCH_VERBOSE"):
            ll.llama_log_set(_log_sink, ctypes.c_void_p())
        _backend_ready = True


class ModelFile:
    """A GGUF loaded in llama.cpp: its facts and its tokenizer. With vocab_only the weights are not read,
    so the training side tokenizes exactly as the runtime does, in a fraction of a second."""

    def __init__(self, path: str | Path, vocab_only: bool = False, n_gpu_layers: int = 0):
        _quiet_backend()
        self._model_lock = threading.RLock()
        if not isinstance(path, (str, os.PathLike)):
            raise FvpatchError(f"a model is the path of a GGUF file, got {type(path).__name__}")
        self.path = input_file(path, "model file")
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.vocab_only = vocab_only
        with signals.held() as noted:
            keep_going = ll.llama_progress_callback(lambda progress, user: not noted)  # False: llama.cpp stops loading
            mparams.progress_callback = keep_going
            self._model_ptr = ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model_ptr and noted:  # a handler that did not raise: the load stopped, the file is not at fault
            raise FvpatchError(f"loading {self.path} was interrupted")
        if not self._model_ptr:
            raise FvpatchError(f"llama.cpp could not load {self.path} as a GGUF model")
        self._vocab_ptr = ll.llama_model_get_vocab(self._model_ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self.arch = self._meta("general.architecture")
        if vocab_only:  # llama.cpp reports 0 layers for a vocab-only load; the metadata states the shape
            self.n_layer = int(self._meta(f"{self.arch}.block_count"))
            self.n_embd = int(self._meta(f"{self.arch}.embedding_length"))
        else:
            self.n_layer = ll.llama_model_n_layer(self._model)
            self.n_embd = ll.llama_model_n_embd(self._model)

    # ---- model facts -------------------------------------------------------------------------

    @locked
    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def fingerprint(self) -> dict[str, str]:
        """What a vector made on this model must match (see fvpatch.models.check_fingerprint), plus what it was made on."""
        return {
            "arch": self.arch,
            "name": self._meta("general.name"),
            "n_layer": str(self.n_layer),
            "n_embd": str(self.n_embd),
            "vocab": self.vocab_hash(),
            "quant": self.quant(),
            "file": self.path.name,
        }

    @locked
    def vocab_hash(self) -> str:
        """sha256 (16 hex digits) of the token list: two files with the same hash tokenize alike."""
        if not hasattr(self, "_vocab_hash"):
            h = hashlib.sha256()
            for t in range(self.n_vocab):
                h.update(ll.llama_vocab_get_text(self._vocab, t) or b"")
                h.update(b"\0")
            self._vocab_hash = h.hexdigest()[:16]
        return self._vocab_hash

    @locked
    def quant(self) -> str:
        """The file's quantization as gguf names it (Q4_K_M, Q8_0, F32, ...), from general.file_type."""
        import gguf

        ftype = self._meta("general.file_type")
        try:
            return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return ftype or "unknown"

    @locked
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Control tokens written in the text (<|im_start|>, <start_of_turn>) are read as themselves, as llama.cpp's
        programs read a prompt (llama-completion, llama-server); `special=False` reads them as plain characters."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        arr = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, raw, len(raw), arr, cap, add_bos, special)
        if n < 0:
            cap = -n
            arr = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, raw, len(raw), arr, cap, add_bos, special)
        return list(arr[:n])

    @locked
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja), if its GGUF carries one."""
        template = ll.llama_model_chat_template(self._model, None)
        return template.decode("utf-8", "replace") if template else None

    @locked
    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Messages ({"role", "content"}) in the model's chat template, ready for the assistant's turn: llama.cpp
        recognises the template's family and writes its turns, without running its Jinja (so a default system
        message that the template would add is not)."""
        template = ll.llama_model_chat_template(self._model, None)
        if not template:
            raise ValueError(f"{self.path.name} has no chat template; send a plain prompt to /v1/completions instead")
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # the structs point into these bytes
        chat = (ll.llama_chat_message * len(keep))(*(ll.llama_chat_message(role=r, content=c) for r, c in keep))
        size = 4 * sum(len(r) + len(c) for r, c in keep) + 1024
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_chat_apply_template(template, chat, len(keep), True, buf, size)
            if n < 0:
                raise ValueError(f"llama.cpp does not know {self.path.name}'s chat template; send a plain prompt to /v1/completions instead")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
        raise RuntimeError("the chat template's output kept growing")

    @locked
    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (end of text, end of turn)."""
        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    @locked
    def piece(self, token: int, special: bool = False) -> bytes:
        """One token's bytes; `special` writes a control token as its text (<eos>), where otherwise it has none."""
        if not 0 <= token < self.n_vocab:  # llama.cpp aborts the process on an id outside its vocabulary
            raise FvpatchError(f"token id {token} is outside the vocabulary (0 to {self.n_vocab - 1})")
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    @property
    @locked
    def bos(self) -> int | None:
        t = ll.llama_vocab_bos(self._vocab)
        return None if t < 0 else t

    @property
    @locked
    def adds_bos(self) -> bool:
        """Whether the model's tokenizer starts every text with BOS (Gemma, Llama) or not (Qwen)."""
        return bool(ll.llama_vocab_get_add_bos(self._vocab)) and self.bos is not None

    @property
    @locked
    def eos(self) -> int | None:
        t = ll.llama_vocab_eos(self._vocab)
        return None if t < 0 else t

    def piece_text(self, token: int, special: bool = False) -> str:
        """One token as text (a piece that is only part of a UTF-8 character shows as U+FFFD); `special` shows a control
        token by its text (<bos>), which in generated text is nothing."""
        return self.piece(int(token), special).decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # every use of llama.cpp's pointers goes through these: after close, one line instead of a crash in C
    @property
    def _model(self):
        if not getattr(self, "_model_ptr", None):
            raise FvpatchError(f"{self.path.name} is closed")
        return self._model_ptr

    @property
    def _vocab(self):
        return self._model and self._vocab_ptr

    def check_tokens(self, tokens, what: str = "prompt") -> list[int]:
        """`tokens` as a list of token ids of this vocabulary, or one line saying what is wrong: llama.cpp would
        fail the whole decode on an id out of range, and numpy would read a negative one from the end."""
        if isinstance(tokens, (str, bytes, bytearray)) or not hasattr(tokens, "__iter__"):
            raise FvpatchError(f"the {what} must be a list of token ids, got {type(tokens).__name__}")
        tokens = list(tokens)
        for t in tokens:
            if not is_index(t) or not 0 <= t < self.n_vocab:
                raise FvpatchError(f"the {what} holds {t!r}, not a token id from 0 to {self.n_vocab - 1}")
        return [int(t) for t in tokens]

    def close(self):
        if getattr(self, "_model_ptr", None):
            with self._model_lock:  # after any call in progress in another thread
                ll.llama_model_free(self._model_ptr)
                self._model_ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
