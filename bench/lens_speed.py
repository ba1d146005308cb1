"""How long `fvpatch lens --layer all` takes on a ~40-token prompt, end to end, and where the time goes.

End to end is the CLI in a fresh process (imports, model load, the model's fingerprint, one forward
saving l_out at every layer and position, 18 x 40 rows through the final norm and the 262144 x 640
unembedding, printing). The breakdown repeats those steps in this process. --cold also times building
the on-disk unembedding cache from the GGUF (once per model file). Target: under 10 s end to end.

    .venv/bin/python bench/lens_speed.py [--rounds 3] [--cold]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fvpatch import Save, Session
from fvpatch.lens import token_label
from fvpatch.models import default_model_path
from fvpatch.unembed import _load, load_unembed

PROMPT = ("Egypt -> Cairo, Norway -> Oslo, Peru -> Lima, Japan -> Tokyo, Kenya -> Nairobi, Chile -> Santiago, "
          "Canada -> Ottawa, Poland -> Warsaw, Greece -> Athens, Estonia ->")  # 39 tokens
FVPATCH = str(Path(sys.executable).with_name("fvpatch"))


def timed(f):
    """f(), its wall time, and the CPU time it took (this process's threads plus finished children)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = f()
    return out, (time.perf_counter() - t0, cpu_seconds() - c0)


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also time building the unembedding cache from the GGUF")
    args = ap.parse_args()
    path = default_model_path()
    load_unembed(path)  # make sure the on-disk cache exists before timing the warm path
    _load.cache_clear()

    ends = []
    for _ in range(args.rounds):
        r, times = timed(lambda: subprocess.run([FVPATCH, "lens", "-p", PROMPT, "--layer", "all"], capture_output=True, text=True))
        if r.returncode:
            sys.exit(r.stderr)
        ends.append(times)

    steps = {}
    s, steps["open the model"] = timed(lambda: Session(path))
    _, steps["fingerprint (vocabulary hash)"] = timed(lambda: s.fingerprint())
    u, steps["map the cached unembedding"] = timed(lambda: load_unembed(path))
    n = len(s.tokenize(PROMPT))
    names = [f"l_out-{L}" for L in range(s.n_layer)]
    r, steps["forward saving l_out everywhere"] = timed(lambda: s.run(PROMPT, saves=[Save(t, tuple(range(n))) for t in names]))
    rows = np.concatenate([r.saved[t] for t in names])
    (ids, _, _), steps["final norm + unembed + top-k"] = timed(lambda: u.top(rows, 5))
    _, steps["token labels"] = timed(lambda: [token_label(s, t) for t in ids[:, 0]])
    total = sum(wall for wall, _ in steps.values())

    print(f"default model, prompt of {n} tokens, {s.n_layer} layers -> {s.n_layer * n} rows x {u.output.shape[0]} vocab; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    walls, cpus = [w for w, _ in ends], [c for _, c in ends]
    print(f"end to end (`fvpatch lens --layer all`, fresh process), {args.rounds} rounds: wall median {statistics.median(walls):.2f} s, "
          f"best {min(walls):.2f} s ({', '.join(f'{w:.1f}' for w in walls)}); CPU median {statistics.median(cpus):.2f} s; target < 10 s wall")
    print("  (on a busy machine the best round and the CPU time say more than the median; llama.cpp's threads also spin while they wait)")
    print("in-process breakdown:            wall      CPU   share of wall")
    for name, (wall, cpu) in steps.items():
        print(f"  {name:<32} {wall:6.2f} s {cpu:6.2f} s  {100 * wall / total:4.0f}%")
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            _load.cache_clear()
            _, (wall, cpu) = timed(lambda: load_unembed(path, cache_dir=tmp))
        print(f"first use: read + dequantize the GGUF's output matrix and write the cache: {wall:.1f} s wall, {cpu:.1f} s CPU (once per model file)")


if __name__ == "__main__":
    main()
