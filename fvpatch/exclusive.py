"""One decode at a time per session: llama.cpp's context, the batch and the eval callback's plan are shared state,
so two threads decoding at once would corrupt each other's cache, or crash the process. And no use of llama.cpp's
pointers while another thread frees them: `close` takes the same lock."""

import functools
import threading

from fvpatch.errors import FvpatchError


def exclusive(method):
    """Run `method` holding the session's lock, so threads sharing a session take turns. While `fvpatch.slots.Slots`
    serve from the session, its worker thread alone may decode: another thread's run would clear their cache."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self._in_callback is threading.current_thread():
            raise FvpatchError("run()'s on_token may not use the session it is called from: the run's cache is in use; collect, then call after")
        slots = self._slots
        if slots is not None and threading.current_thread() is not slots.worker:
            raise FvpatchError("this session is serving requests (fvpatch.slots.Slots); close them first, or open another Session")
        with self._lock:
            return method(self, *args, **kwargs)

    return guarded


def locked(method):
    """Run `method` holding the model's own lock, which `close` takes too, so no thread reads a pointer being freed.
    Not the session's decode lock: tokenizing for one request need not wait for another request's decode."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._model_lock:
            return method(self, *args, **kwargs)

    return guarded
