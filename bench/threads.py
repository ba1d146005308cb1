"""Which thread count is fastest here: llama.cpp generation and prompt decoding, and a PyTorch forward, at 1..N
threads, alternated round by round so that other work on the machine hits every setting alike.

    .venv/bin/python bench/threads.py [--model gemma-3-270m] [--threads 1,2] [--rounds 5]
"""

import argparse
import statistics
import time

import torch

from fvpatch.models import resolve_model
from fvpatch.session import Session
from train.model import load_model

PROMPT = "Q: France\nA: Paris\n\n" * 12 + "Q: Italy\nA:"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    path = resolve_model(args.model)
    sessions = {t: Session(path, n_threads=t) for t in counts}
    lm = load_model(path, "cpu", "float32")
    ids = torch.tensor([sessions[counts[0]].tokenize(PROMPT)])
    times = {(what, t): [] for t in counts for what in ("generate 32 tokens", "decode the prompt", "torch forward")}
    for _ in range(args.rounds):
        for t in counts:
            s = sessions[t]
            start = time.perf_counter()
            s.run("The history of", max_tokens=32)
            times[("generate 32 tokens", t)].append(time.perf_counter() - start)
            start = time.perf_counter()
            s.run(PROMPT)
            times[("decode the prompt", t)].append(time.perf_counter() - start)
            torch.set_num_threads(t)
            start = time.perf_counter()
            with torch.no_grad():
                lm.model(input_ids=ids)
            times[("torch forward", t)].append(time.perf_counter() - start)
    print(f"{path.name}, median of {args.rounds} alternated rounds, prompt of {ids.shape[1]} tokens\n")
    print("| work | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for what in ("generate 32 tokens", "decode the prompt", "torch forward"):
        print(f"| {what} | " + " | ".join(f"{statistics.median(times[(what, t)]):.2f} s" for t in counts) + " |")


if __name__ == "__main__":
    main()
