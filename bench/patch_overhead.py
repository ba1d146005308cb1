"""Generation speed of the default model with and without an active save+patch, side by side in one run.

Three sessions on the same model file, measured in interleaved rounds so that machine noise hits all
alike: no eval callback at all, the callback installed but idle, and an active save (l_out-9 at the
last prompt token) plus an `add` patch at l_out-6 applied at every generated token. Target: the active
run is at most 3% slower than the plain one.

    .venv/bin/python bench/patch_overhead.py [--tokens 64] [--rounds 5]
"""

import argparse
import statistics
import time

import numpy as np

from fvpatch import Patch, Save, Session
from fvpatch.models import default_model_path
from train.reporting import positive_int

PROMPT = "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA:"


def tokens_per_second(session: Session, n: int, **specs) -> float:
    t0 = time.perf_counter()
    r = session.run(PROMPT, max_tokens=n, **specs)
    dt = time.perf_counter() - t0
    assert len(r.generated) == n, "generation stopped early; the rate would be wrong"
    return n / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: $FVPATCH_THREADS, else $OMP_NUM_THREADS, else half the cores)")
    args = ap.parse_args()
    path = default_model_path()
    plain = Session(path, hooks=False, n_threads=args.threads)
    hooked = Session(path, n_threads=args.threads)
    vector = np.full(hooked.n_embd, 0.01, np.float32)
    active = dict(saves=[Save("l_out-9", (-1,))], patches=[Patch("l_out-6", vector, -1, "add", generated=True)])
    configs = {"no callback": (plain, {}), "callback, idle": (hooked, {}), "save + patch every token": (hooked, active)}
    for s, spec in configs.values():
        tokens_per_second(s, 8, **spec)  # warm-up
    rates = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, (s, spec) in configs.items():
            rates[name].append(tokens_per_second(s, args.tokens, **spec))
    base = statistics.median(rates["no callback"])
    print(f"default model, {args.tokens} generated tokens, {plain.n_threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'configuration':<28} {'tokens/s':>9} {'vs no callback':>15}")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"{name:<28} {m:9.1f} {m / base:14.3f}x")
    slow = 1 - statistics.median(rates["save + patch every token"]) / base
    print(f"active save+patch is {100 * slow:.1f}% slower (target <= 3%)")


if __name__ == "__main__":
    main()
