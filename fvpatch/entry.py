"""The `fvpatch` command: the thread settings are checked before llama.cpp loads, because its OpenMP runtime
reads OMP_NUM_THREADS as it loads and prints its own warnings about a bad value before fvpatch could."""

import sys


def main():
    import os

    from fvpatch.errors import FvpatchError
    from fvpatch.threads import parse_threads

    try:
        if os.environ.get("OMP_NUM_THREADS", "").strip():  # refused whatever --threads says: OpenMP itself reads it
            parse_threads(os.environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS")
    except FvpatchError as e:
        sys.stderr.write(f"Error: {e}\n")
        return 1
    import signal

    # a kill (SIGTERM) unwinds like Ctrl-C: the temporary files of half-done writes and downloads are removed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from fvpatch.cli import main as cli

    return cli()
