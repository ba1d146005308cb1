"""A killed command unwinds as Ctrl-C does: exit status 128 + SIGTERM, no traceback, no temporary file left."""

import os
import signal
import subprocess
import sys
import time


def test_sigterm_ends_a_command_cleanly(tiny_gguf, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FVPATCH_THREADS"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fvpatch", "generate", "-m", str(tiny_gguf), "-p", "a b c", "-n", "100000", "--n-ctx", "131072"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(3)  # the model loaded and generating (100000 tokens take the tiny model far longer)
    assert proc.poll() is None, "it finished before the signal: generate more tokens"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert not list(tmp_path.iterdir())
