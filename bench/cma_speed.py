"""The batched head map of train/cma.py against one forward per (prompt, head), on the default model.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cma_speed.py [--task capitalize] [--prompts 2]

Both compute P(answer's first token) on the same shuffled-label 10-shot prompts with every one of the
model's heads patched in turn (and unpatched): the same work, the same numbers, side by side.
"""

import argparse
import time

import torch

from fvpatch.prompts import template
from fvpatch.tasks import load_task
from train.cma import cma_prompts, head_effects, head_effects_unbatched, mean_head_outputs
from train.model import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="capitalize")
    ap.add_argument("--prompts", type=int, default=2, help="corrupted prompts scored by both (the loop costs n_layer * n_head forwards each)")
    args = ap.parse_args()

    lm = load_model()
    clean, corrupted, answers = cma_prompts(lm, load_task(args.task), template("qa"), max(args.prompts, 10), 10)
    corrupted, answers = corrupted[: args.prompts], answers[: args.prompts]
    mean_heads, _ = mean_head_outputs(lm, clean)
    n_heads = lm.n_layer * lm.n_head
    n_tokens = sum(len(t) for t in corrupted) / len(corrupted)

    t0 = time.perf_counter()
    batched, base_b = head_effects(lm, corrupted, answers, mean_heads)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop, base_l = head_effects_unbatched(lm, corrupted, answers, mean_heads)
    t_loop = time.perf_counter() - t0

    diff = max(float((batched - loop).abs().max()), float((base_b - base_l).abs().max()))
    aie_b, aie_l = (batched - base_b[:, None, None]).mean(0), (loop - base_l[:, None, None]).mean(0)
    print(f"{args.prompts} prompts of ~{n_tokens:.0f} tokens x {n_heads} heads (+ unpatched), torch threads {torch.get_num_threads()}")
    print("| method | forwards | seconds | per prompt |")
    print("|---|---:|---:|---:|")
    print(f"| one head per forward | {args.prompts * (n_heads + 1)} | {t_loop:.1f} | {t_loop / args.prompts:.2f} |")
    print(f"| batched (cached prefix, all heads in one last-token batch) | {2 * args.prompts} | {t_batched:.1f} | {t_batched / args.prompts:.2f} |")
    print(f"speedup {t_loop / t_batched:.1f}x; max |difference| in P(answer) {diff:.2e}; top head {tuple(divmod(int(aie_b.argmax()), lm.n_head))} "
          f"vs {tuple(divmod(int(aie_l.argmax()), lm.n_head))}")


if __name__ == "__main__":
    main()
