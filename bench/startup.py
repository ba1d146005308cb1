"""How much later than a plain llama.cpp load an fvpatch command answers, on the same model file.

Each round runs, in fresh processes and interleaved so machine load hits both alike:
  plain    llama-cpp-python's own `Llama(path)` then one generated token (what any llama.cpp user waits for)
  fvpatch  `fvpatch generate -m MODEL -p PROMPT -n 1` (CLI start-up, model load, the fingerprint, one token)
  patch    `fvpatch patch ... --vector FILE -n 1` (also reads a vector file and checks it fits the model)
Target: fvpatch within 2 s of plain. Nothing hashes the model file any more (see fvpatch.models.check_fingerprint).

    .venv/bin/python bench/startup.py --model qwen2.5-coder-1.5b [--rounds 5] [--threads 1]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fvpatch import Save, Session, vectorfile
from fvpatch.models import resolve_model
from train.reporting import positive_int

PROMPT = "France ->"
FVPATCH = str(Path(sys.executable).with_name("fvpatch"))
PLAIN = ("import sys; from llama_cpp import Llama; "
         "m = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False); m(sys.argv[3], max_tokens=1)")


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    path = str(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp, Session(path, n_threads=args.threads) as s:
        vec = Path(tmp) / "v.safetensors"
        r = s.run(PROMPT, saves=[Save("l_out-1", (-1,))])
        vectorfile.save(vectorfile.VectorFile("l_out-1", r.saved["l_out-1"], [-1], s.fingerprint(), "add", 0.0), vec)
        cmds = {
            "plain llama.cpp": [sys.executable, "-c", PLAIN, path, str(args.threads), PROMPT],
            "fvpatch generate": [FVPATCH, "generate", "-m", path, "-p", PROMPT, "-n", "1"],
            "fvpatch patch --vector": [FVPATCH, "patch", "-m", path, "-p", PROMPT, "--vector", str(vec), "-n", "1"],
        }
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # fvpatch's thread count
        wall(cmds["plain llama.cpp"])  # page the model file into the OS cache before timing
        times = {k: [] for k in cmds}
        for _ in range(args.rounds):
            for k, cmd in cmds.items():
                times[k].append(wall(cmd))
    base = statistics.median(times["plain llama.cpp"])
    print(f"{Path(path).name}, {args.rounds} interleaved rounds, {args.threads} thread(s), warm OS file cache")
    print(f"{'command':<24} {'median s':>9} {'best s':>8} {'vs plain':>9}")
    for k, ts in times.items():
        print(f"{k:<24} {statistics.median(ts):9.2f} {min(ts):8.2f} {statistics.median(ts) - base:+8.2f}s")


if __name__ == "__main__":
    main()
