"""One decode at a time per session: llama.cpp's context, the batch and the eval callback's plan are shared state,
so two threads decoding at once would corrupt each other's cache, or crash the process."""

import functools
import threading

from fvpatch.errors import FvpatchError


def exclusive(method):
    """Run `method` holding the session's lock, so threads sharing a session take turns. While `fvpatch.slots.Slots`
    serve from the session, its worker thread alone may decode: another thread's run would clear their cache."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        slots = self._slots
        if slots is not None and threading.current_thread() is not slots.worker:
            raise FvpatchError("this session is serving requests (fvpatch.slots.Slots); close them first, or open another Session")
        with self._lock:
            return method(self, *args, **kwargs)

    return guarded
