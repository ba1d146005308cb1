"""Why use a function vector at all: time to the first answer token, zero-shot + FFV against the 10-shot prompt.

For each core task, on its first N test pairs, in llama.cpp (one prompt per decode, as a user runs it):
  10-shot ICL       the query after 10 demonstrations from the task's first 20 train pairs
  0-shot + FFV      `Q: x\\nA:` with the task's shipped FFV added at the last prompt token
the wall time from the prompt to the logits of the first answer token (median over the items; the two are run
alternately item by item, so machine load hits both alike), and top-1 of that first token.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ttft.py --model qwen2.5-coder-1.5b [--n 30] [--threads 1]
"""

import argparse
import statistics
import time

import numpy as np

from fvpatch import vectorfile
from fvpatch.evaluate import build_items, patch_of
from fvpatch.models import resolve_model
from fvpatch.prompts import template
from fvpatch.session import Session
from fvpatch.shipped import find_vector
from fvpatch.tasks import CORE_TASKS, load_task
from train.reporting import positive_int


def timed(s: Session, tokens: list[int], patches) -> tuple[float, int]:
    t = time.perf_counter()
    logits = s.run(tokens, patches=patches).logits
    return time.perf_counter() - t, int(np.argmax(logits))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default=",".join(CORE_TASKS))
    ap.add_argument("--n", type=positive_int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    with Session(resolve_model(args.model), n_threads=args.threads) as s:
        print(f"{s.path.name}, first {args.n} test pairs per task, {args.threads} thread(s), llama.cpp, one prompt per decode\n")
        print("| task | ICL prompt tokens | 0-shot tokens | ICL: first token ms | 0-shot + FFV: first token ms | sooner | ICL top-1 | 0-shot + FFV top-1 | FFV >= ICL |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.tasks.split(","):
            task = load_task(name)
            patch = [patch_of(vectorfile.load(find_vector(f"{name}.ffv", s.fingerprint())))]
            items = build_items(s.tokenize, template("qa"), task.test[: args.n], task.train[:20], 10)
            icl, ffv = [], []
            for i in range(len(items.answers)):
                icl.append(timed(s, items.tokens["icl"][i], []))
                ffv.append(timed(s, items.tokens["zero_shot"][i], patch))
            t_icl, t_ffv = statistics.median(t for t, _ in icl), statistics.median(t for t, _ in ffv)
            a_icl = np.mean([p == a for (_, p), a in zip(icl, items.answers)])
            a_ffv = np.mean([p == a for (_, p), a in zip(ffv, items.answers)])
            n_icl = statistics.median(len(t) for t in items.tokens["icl"])
            n_zero = statistics.median(len(t) for t in items.tokens["zero_shot"])
            print(f"| {name} | {n_icl:.0f} | {n_zero:.0f} | {1000 * t_icl:.0f} | {1000 * t_ffv:.0f} | {t_icl / t_ffv:.1f}x | {a_icl:.0%} | {a_ffv:.0%} | "
                  f"{'yes' if a_ffv >= a_icl else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
