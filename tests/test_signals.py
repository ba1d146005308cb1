"""Ctrl-C during a llama.cpp call that calls back into Python is raised once the call returns, never dropped."""

import signal
import subprocess
import sys

import pytest

from fvpatch import signals

SCRIPT = """
import ctypes, ctypes.util, os, signal, sys
from fvpatch import signals
libc = ctypes.CDLL(ctypes.util.find_library("c"))
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
calls = []
def cmp(a, b):  # a Python callback inside a C call, as llama.cpp's log sink and progress report are
    if not calls:
        os.kill(os.getpid(), signal.SIGINT)
    calls.append(1)
    return a[0] - b[0]
keep = CMP(cmp)
data = (ctypes.c_int * 64)(*range(64, 0, -1))
try:
    if sys.argv[1] == "held":
        with signals.held():
            libc.qsort(data, 64, ctypes.sizeof(ctypes.c_int), keep)
    else:
        libc.qsort(data, 64, ctypes.sizeof(ctypes.c_int), keep)
except KeyboardInterrupt:
    print("interrupted", list(data)[:3], len(calls) > 1)
else:
    print("went on", list(data)[:3])
"""


@pytest.mark.parametrize("how,says", [
    ("bare", "went on"),  # what a load or a quantization did before: ctypes printed the KeyboardInterrupt and dropped it
    ("held", "interrupted [1, 2, 3] True"),  # noted, the C call finished, then raised
])
def test_ctrl_c_inside_a_ctypes_callback(how, says):
    r = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().startswith(says), (r.stdout, r.stderr)


def test_held_notes_signals_and_raises_the_first_on_leaving():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with signals.held() as noted:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            assert noted == [signal.SIGINT, signal.SIGINT]  # noted only: the call in the block would go on
    assert signal.getsignal(signal.SIGINT) is before
    with signals.held() as noted:
        pass
    assert noted == []


def test_held_leaves_an_ignored_signal_ignored():
    """A background job runs with SIGINT ignored: such a signal must not stop a load, nor be raised after it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.held() as noted:
            signal.raise_signal(signal.SIGINT)
        assert noted == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
