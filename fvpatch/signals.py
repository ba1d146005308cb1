"""Ctrl-C and kill while llama.cpp runs a long call that calls back into Python (loading, quantizing).

Python runs a signal's handler at the next Python code it executes. During such a call that is a ctypes callback
(the log sink, a progress report), and an exception raised there is printed and dropped by ctypes: the load or the
quantization then ran to its end, and the command went on as if no one had asked it to stop. So for the length of
the call the handlers only note the signal, a progress callback can ask llama.cpp to stop early, and the signal is
raised again, to the handler it was meant for, once the call has returned.
"""

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held():
    """Yield the list of signals noted during the block (empty while none came); raise the first one on leaving."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield []
        return
    noted: list[int] = []
    # a signal the process ignores (a background job's SIGINT) stays ignored: it must not stop a load
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler not set from Python
        if noted:
            signal.raise_signal(noted[0])
