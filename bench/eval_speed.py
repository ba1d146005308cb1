"""Batched evaluation against one prompt per decode: items/s and accuracy, side by side on one model.

`fvpatch eval task`'s conditions (zero-shot, 10-shot ICL, shuffled-label ICL, zero-shot + the task's shipped FFV,
shuffled + FFV) on the first N test pairs of a task, scored in llama.cpp
  one-at-a-time  one prompt per decode, as `fvpatch patch` runs it (`eval task --one-at-a-time`);
  batched        Session.last_logits: the prompts' shared prefix decoded once and its KV cache copied to each
                 prompt's sequence, the rests packed into as few decodes as fit a batch;
with each query's own demonstrations (`--demos per-query`, Todd et al.'s protocol) and with one draw shared by
all queries (`--demos shared`), whose demonstrations are the prefix batching decodes once. Also: how many
top-1 answers the two ways agree on, and the largest logit difference (quantized kernels group rows by batch).

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_speed.py --model qwen2.5-coder-1.5b [--task country-capital] [--n 59]
"""

import argparse
import time

import numpy as np

from fvpatch import vectorfile
from fvpatch.evaluate import BASE_CONDITIONS, VECTOR_CONDITIONS, build_items, patch_of
from fvpatch.models import resolve_model
from fvpatch.prompts import template
from fvpatch.session import Session
from fvpatch.shipped import find_vector
from fvpatch.tasks import load_task
from train.reporting import positive_int


CONDITIONS = (*BASE_CONDITIONS, *VECTOR_CONDITIONS)


def logits_both_ways(s: Session, items, vf) -> dict[str, dict]:
    """condition -> {way: (seconds, logits list)} for both ways of running."""
    out = {}
    for cond in CONDITIONS:
        prompts = items.tokens[cond.removesuffix("+vector")]
        patches = [patch_of(vf)] if cond.endswith("+vector") else []
        t = time.perf_counter()
        one = [s.run(p, patches=patches).logits for p in prompts]
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        batched = s.last_logits(prompts, patches)
        t_batched = time.perf_counter() - t
        out[cond] = {"one-at-a-time": (t_one, one), "batched": (t_batched, batched)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", default="country-capital")
    ap.add_argument("--n", type=positive_int, default=59)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    task = load_task(args.task)
    with Session(resolve_model(args.model), n_threads=args.threads) as s:
        vf = vectorfile.load(find_vector(f"{args.task}.ffv", s.fingerprint()))
        print(f"{s.path.name}, {args.task}, first {args.n} test pairs, {args.threads} thread(s); vector {vf.tensor}\n")
        print("| demos | condition | items | one-at-a-time items/s | batched items/s | speed-up | top-1 one / batched | same top-1 | max abs logit diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        for demos in ("per-query", "shared"):
            items = build_items(s.tokenize, template("qa"), task.test[: args.n], task.train[:20], 10, 0, shared_demos=demos == "shared")
            answers = np.array(items.answers)
            total = {"one-at-a-time": 0.0, "batched": 0.0}
            for cond, ways in logits_both_ways(s, items, vf).items():
                (t1, one), (tb, bat) = ways["one-at-a-time"], ways["batched"]
                top_one, top_bat = np.array([x.argmax() for x in one]), np.array([x.argmax() for x in bat])
                n = len(answers)
                total["one-at-a-time"] += t1
                total["batched"] += tb
                print(f"| {demos} | {cond} | {n} | {n / t1:.1f} | {n / tb:.1f} | {t1 / tb:.1f}x | {np.mean(top_one == answers):.1%} / "
                      f"{np.mean(top_bat == answers):.1%} | {int((top_one == top_bat).sum())}/{n} | {max(np.abs(a - b).max() for a, b in zip(one, bat)):.2f} |",
                      flush=True)
            n_all = len(answers) * len(CONDITIONS)
            print(f"| {demos} | **all {len(CONDITIONS)}** | {n_all} | {n_all / total['one-at-a-time']:.1f} | {n_all / total['batched']:.1f} | "
                  f"**{total['one-at-a-time'] / total['batched']:.1f}x** | | | |", flush=True)


if __name__ == "__main__":
    main()
